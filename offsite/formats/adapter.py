"""The adapter format: what a data owner sends back.

``ADAPTER/adapter.safetensors`` holds tensors named by full-model layer index;
``ADAPTER/adapter.json`` describes them. ``adapter.json`` carries nothing derived from
the private data (no losses, no counts): it leaves the data owner's machine.

``read_adapter`` is the one validator for received adapters (plug-in and, later, the
server): it checks the file hash before parsing, then every tensor's name, shape, dtype
and finiteness against what the bundle expects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from offsite.errors import FormatError, IntegrityError, MismatchError
from offsite.fileio import SAFETENSORS_DTYPES, canonical_json, read_json, sha256_file, write_bytes_atomic
from offsite.models.adapters import AdapterSpec

FORMAT = "offsite-adapter"
FORMAT_VERSION = 1
TENSORS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"


@dataclass
class Adapter:
    path: Path
    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def spec(self) -> AdapterSpec:
        return AdapterSpec.from_json(self.meta["spec"])

    @property
    def bundle_id(self) -> str:
        return self.meta["bundle_id"]


def tensor_table(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    return {
        name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for name, t in sorted(tensors.items())
    }


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
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out_dir / TENSORS_FILE))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bundle_id": bundle_id,
        "source_fingerprint": source_fingerprint,
        "spec": spec.to_json(),
        "tensors": tensor_table(tensors),
        "sha256": {TENSORS_FILE: sha256_file(out_dir / TENSORS_FILE)},
        "hyperparameters": dict(hyperparameters),
    }
    write_bytes_atomic(out_dir / META_FILE, canonical_json(meta))
    return meta


def check_tensor_table(found: Mapping[str, dict], expected: Mapping[str, dict], where: str) -> None:
    """Names, shapes and dtypes must match ``expected`` exactly."""
    unexpected = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    if unexpected:
        raise FormatError(
            f"{where}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    if missing:
        raise FormatError(f"{where}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, exp in expected.items():
        got = found[name]
        if list(got["shape"]) != list(exp["shape"]):
            raise FormatError(f"{where}: tensor {name} has shape {got['shape']}, expected {exp['shape']}")
        if got["dtype"] != exp["dtype"]:
            raise FormatError(f"{where}: tensor {name} has dtype {got['dtype']}, expected {exp['dtype']}")


def read_adapter(
    path: str | os.PathLike,
    *,
    expected_tensors: Mapping[str, dict],
    bundle_id: str,
    source_fingerprint: str,
) -> Adapter:
    """Validate and load an adapter directory received from a data owner.

    Order matters: metadata, identity, file hash, header (names/shapes/dtypes), and only
    then the tensor data, which must be finite.
    """
    path = Path(path)
    meta = read_json(path / META_FILE, "adapter metadata")
    if meta.get("format") != FORMAT:
        raise FormatError(f"{path / META_FILE}: not an offsite adapter (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{path / META_FILE}: unsupported adapter format version {meta.get('format_version')!r}"
        )
    if meta.get("bundle_id") != bundle_id:
        raise MismatchError(f"adapter {path} was trained on bundle {meta.get('bundle_id')}, not {bundle_id}")
    if meta.get("source_fingerprint") != source_fingerprint:
        raise MismatchError(f"adapter {path} belongs to a different model (fingerprint mismatch)")
    declared = meta.get("sha256", {}).get(TENSORS_FILE)
    tensors_path = path / TENSORS_FILE
    if not tensors_path.is_file():
        raise FormatError(f"{tensors_path} is missing")
    actual = sha256_file(tensors_path)
    if declared != actual:
        raise IntegrityError(f"{tensors_path}: sha256 {actual} does not match adapter.json ({declared})")
    if not isinstance(meta.get("tensors"), dict):
        raise FormatError(f"{path / META_FILE}: 'tensors' must be an object")
    check_tensor_table(meta["tensors"], expected_tensors, f"{path / META_FILE}")
    try:
        with safe_open(str(tensors_path), framework="pt") as f:
            header = {}
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                sl = f.get_slice(name)
                header[name] = {
                    "shape": list(sl.get_shape()),
                    "dtype": SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()),
                }
            check_tensor_table(header, expected_tensors, str(tensors_path))
            tensors = {name: f.get_tensor(name) for name in header}
    except FormatError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise FormatError(f"{tensors_path}: not a valid safetensors file ({e})") from e
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise FormatError(f"{tensors_path}: tensor {name} contains NaN or infinite values")
    return Adapter(path=path, meta=meta, tensors=tensors)
