"""The adapter format: what a data owner sends back.

``ADAPTER/adapter.safetensors`` holds tensors named by full-model layer index;
``ADAPTER/adapter.json`` describes them (``AdapterMeta``). ``adapter.json`` carries nothing
derived from the private data (no losses, no counts): it leaves the data owner's machine.

``read_adapter`` is the one validator for received adapters (plug-in, evaluation, the server):
it reads ``adapter.json`` once and parses those bytes, copies ``adapter.safetensors`` into a
private directory while hashing it, and checks the hash, then the header's names, shapes and
dtypes against the bundle's table, and only then loads the copy's data, which must be finite.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import save_file

from offsite.device import to_cpu
from offsite.errors import FormatError, IntegrityError, MismatchError
from offsite.fileio import read_bounded, sha256_bytes, sha256_file, write_bytes_atomic
from offsite.formats.safetensors_file import load_tensors, load_tensors_bytes
from offsite.formats.schema import MAX_METADATA_BYTES, JsonObject, Schema, Sha256Hex, dump, parse, validate
from offsite.formats.spec import AdapterSpec, TensorTable, check_spec_and_table, check_tensor_table, table_of
from offsite.formats.staging import PrivateStaging, copy_hashing, open_dir, walk_files

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Adapter",
    "AdapterMeta",
    "read_adapter",
    "read_adapter_bytes",
    "write_adapter",
]

FORMAT = "offsite-adapter"
FORMAT_VERSION = 1
TENSORS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
#: The tensor file's size limit when none is given: far above any adapter of a model that fits a
#: single machine, and a bound on what a peer can make the receiver copy.
DEFAULT_MAX_TENSOR_BYTES = 64 << 30


class AdapterHashes(Schema):
    adapter_safetensors: Sha256Hex = Field(
        alias="adapter.safetensors", description="sha256 of `adapter.safetensors`"
    )


class AdapterMeta(Schema):
    """``adapter.json``."""

    format: Literal["offsite-adapter"] = Field(description="always `offsite-adapter`")
    format_version: Literal[1] = Field(description="1")
    bundle_id: Sha256Hex = Field(description="the bundle the adapter was trained from")
    source_fingerprint: Sha256Hex = Field(description="that bundle's `source.fingerprint`")
    spec: AdapterSpec = Field(description="the bundle's adapter spec (fields as in the manifest)")
    tensors: TensorTable = Field(
        description="name → `shape`, `dtype` of every tensor in `adapter.safetensors`"
    )
    sha256: AdapterHashes = Field(description="file name → sha256 (one entry: `adapter.safetensors`)")
    hyperparameters: JsonObject = Field(
        description="the training settings (epochs, lr, DP settings, ...); informational, nothing derived from the data"
    )

    @model_validator(mode="after")
    def _names(self) -> AdapterMeta:
        check_spec_and_table(self.spec, self.tensors)
        return self


@dataclass
class Adapter:
    path: Path
    document: AdapterMeta
    tensors: dict[str, torch.Tensor]

    @property
    def meta(self) -> dict:
        return self.document.model_dump(mode="json", by_alias=True)

    @property
    def spec(self) -> AdapterSpec:
        return self.document.spec

    @property
    def bundle_id(self) -> str:
        return self.document.bundle_id

    @property
    def sha256(self) -> str:
        return self.document.sha256.adapter_safetensors


def tensor_table(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    return table_of(tensors)


def write_adapter(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    spec: AdapterSpec,
    bundle_id: str,
    source_fingerprint: str,
    hyperparameters: Mapping,
) -> dict:
    """Write the two adapter files into an existing (staging) directory; return the metadata."""
    out_dir = Path(out_dir)
    tensors = {k: to_cpu(v.detach()).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out_dir / TENSORS_FILE))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bundle_id": bundle_id,
        "source_fingerprint": source_fingerprint,
        "spec": spec.to_json(),
        "tensors": table_of(tensors),
        "sha256": {TENSORS_FILE: sha256_file(out_dir / TENSORS_FILE)},
        "hyperparameters": dict(hyperparameters),
    }
    document = validate(AdapterMeta, meta, "the adapter metadata being written")
    write_bytes_atomic(out_dir / META_FILE, dump(document))
    return document.model_dump(mode="json", by_alias=True)


def parse_adapter_meta(data: bytes, what: str) -> AdapterMeta:
    """Validate ``adapter.json`` bytes (at most 1 MiB); FormatError naming the field if not."""
    return parse(AdapterMeta, data, what)


def _check_claims(
    meta: AdapterMeta,
    where: str,
    expected_tensors: Mapping[str, dict],
    bundle_id: str,
    source_fingerprint: str,
    expected_spec: AdapterSpec | None,
) -> None:
    if meta.bundle_id != bundle_id:
        raise MismatchError(f"adapter {where} was trained on bundle {meta.bundle_id}, not {bundle_id}")
    if meta.source_fingerprint != source_fingerprint:
        raise MismatchError(f"adapter {where} belongs to a different model (fingerprint mismatch)")
    if expected_spec is not None and meta.spec != expected_spec:
        raise MismatchError(
            f"adapter {where}: its spec {meta.spec.to_json()} is not the bundle's {expected_spec.to_json()}"
        )
    check_tensor_table(meta.tensors, expected_tensors, f"{where}/{META_FILE}")


#: Elements checked for NaN/Inf at a time: the check's scratch memory stays at a few MiB however large
#: the adapter (the owner's server checks every upload; docs/service.md bounds its memory).
_FINITE_BLOCK = 1 << 20


def _check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        flat = t.reshape(-1)  # a view: the tensors are contiguous
        for start in range(0, flat.numel(), _FINITE_BLOCK):
            if not torch.isfinite(flat[start : start + _FINITE_BLOCK]).all():
                raise FormatError(f"{where}: tensor {name} contains NaN or infinite values")


def read_adapter_meta(path: str | os.PathLike) -> AdapterMeta:
    """Only ``adapter.json`` of the adapter directory ``path``, validated (to find the bundle it claims)."""
    path = Path(path)
    return parse_adapter_meta(
        read_bounded(path / META_FILE, str(path / META_FILE), MAX_METADATA_BYTES), str(path / META_FILE)
    )


def read_adapter(
    path: str | os.PathLike,
    *,
    expected_tensors: Mapping[str, dict],
    bundle_id: str,
    source_fingerprint: str,
    expected_spec: AdapterSpec | None = None,
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
) -> Adapter:
    """Validate and load an adapter directory received from a data owner.

    Order matters: the directory holds only regular files; metadata (read once, at most 1 MiB);
    identity (bundle, model); the spec, if ``expected_spec`` is given (the bundle's); tensor table; the tensor file's sha256 (computed while copying it
    to a private directory, at most ``max_tensor_bytes``); its header (names, shapes, dtypes,
    layout); and only then the tensor data, which must be finite.
    """
    path = Path(path)
    root = open_dir(path, f"adapter {path}", follow=True)
    try:
        for _ in walk_files(root, f"adapter {path}"):
            pass  # refuses symlinks, FIFOs, devices anywhere in the directory (receipt files included)
        meta_path = path / META_FILE
        meta = parse_adapter_meta(
            read_bounded(META_FILE, str(meta_path), MAX_METADATA_BYTES, dir_fd=root), str(meta_path)
        )
        _check_claims(meta, str(path), expected_tensors, bundle_id, source_fingerprint, expected_spec)
        with PrivateStaging("adapter") as staging:
            copy = staging.path / TENSORS_FILE
            actual = copy_hashing(root, TENSORS_FILE, copy, str(path / TENSORS_FILE), max_tensor_bytes)
            declared = meta.sha256.adapter_safetensors
            if declared != actual:
                raise IntegrityError(
                    f"{path / TENSORS_FILE}: sha256 {actual} does not match {META_FILE} ({declared})"
                )
            tensors = load_tensors(copy, str(path / TENSORS_FILE), expected_tensors)
    finally:
        os.close(root)
    _check_finite(tensors, str(path / TENSORS_FILE))
    return Adapter(path=path, document=meta, tensors=tensors)


def read_adapter_bytes(
    meta_bytes: bytes,
    tensor_bytes: bytes,
    *,
    expected_tensors: Mapping[str, dict],
    bundle_id: str,
    source_fingerprint: str,
    expected_spec: AdapterSpec | None = None,
    where: str = "adapter",
) -> Adapter:
    """``read_adapter`` for the two files' bytes in memory (for example as received): the bytes
    hashed are the bytes parsed."""
    if len(tensor_bytes) > DEFAULT_MAX_TENSOR_BYTES:
        raise FormatError(f"{where}/{TENSORS_FILE}: larger than {DEFAULT_MAX_TENSOR_BYTES} bytes")
    meta = parse_adapter_meta(meta_bytes, f"{where}/{META_FILE}")
    _check_claims(meta, where, expected_tensors, bundle_id, source_fingerprint, expected_spec)
    actual = sha256_bytes(tensor_bytes)
    declared = meta.sha256.adapter_safetensors
    if declared != actual:
        raise IntegrityError(
            f"{where}/{TENSORS_FILE}: sha256 {actual} does not match {META_FILE} ({declared})"
        )
    tensors = load_tensors_bytes(tensor_bytes, f"{where}/{TENSORS_FILE}", expected_tensors)
    _check_finite(tensors, f"{where}/{TENSORS_FILE}")
    return Adapter(path=Path(where), document=meta, tensors=tensors)
