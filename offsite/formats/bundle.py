"""The bundle format: what a model owner ships to data owners.

A bundle is a directory::

    manifest.json                   format version, source fingerprint, architecture, config,
                                    layer map, adapter spec and tensor table, sha256 of every file
    emulator/                       a Hugging Face checkpoint of the same class, fewer blocks
    initial_adapter.safetensors     the adapter the data owner starts from
    tokenizer/                      the source model's tokenizer

The bundle id is the sha256 of ``manifest.json``'s bytes, so it pins every file. Opening
a bundle checks every hash before anything is loaded, and the owner's detached signature
``manifest.sig`` by the rules of ``offsite.formats.signing``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors.torch import load_file, save_file
from torch import nn

from offsite.errors import FormatError, IntegrityError
from offsite.fileio import canonical_json, read_json, sha256_bytes, sha256_file, write_bytes_atomic
from offsite.formats.adapter import check_tensor_table, tensor_table
from offsite.formats.signing import MANIFEST_SIGNATURE, check_bundle_signature
from offsite.models.adapters import AdapterSpec, AdapterView, positions_from_layer_map
from offsite.models.registry import Task

FORMAT = "offsite-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMULATOR_DIR = "emulator"
TOKENIZER_DIR = "tokenizer"
INITIAL_ADAPTER = "initial_adapter.safetensors"


def _file_table(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in (MANIFEST, MANIFEST_SIGNATURE)
    }


def write_bundle(
    stage: Path,
    *,
    emulator: nn.Module,
    tokenizer,
    view: AdapterView,
    layer_map: list[int],
    source: dict,
    distillation: dict | None,
) -> str:
    """Write a complete bundle into ``stage`` (a staging directory); return the bundle id."""
    import transformers

    import offsite

    emulator.save_pretrained(stage / EMULATOR_DIR, safe_serialization=True)
    tokenizer.save_pretrained(stage / TOKENIZER_DIR)
    initial = view.state_dict()
    save_file(initial, str(stage / INITIAL_ADAPTER))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source,
        "emulator": {"layer_map": list(layer_map), "num_layers": len(layer_map)},
        "adapter": {"spec": view.spec.to_json(), "tensors": tensor_table(initial)},
        "distillation": distillation,
        "files": _file_table(stage),
        "created_with": {
            "offsite": offsite.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    data = canonical_json(manifest)
    write_bytes_atomic(stage / MANIFEST, data)
    return sha256_bytes(data)


@dataclass
class Bundle:
    path: Path
    manifest: dict
    id: str

    @classmethod
    def open(cls, path: str | os.PathLike, owner_key: Ed25519PublicKey | None = None) -> Bundle:
        """Parse the manifest and verify every file's sha256 before anything is loaded.

        ``owner_key``: the model owner's key (from the enrolment package) to check ``manifest.sig``.
        """
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise FormatError(f"{path} is not a bundle (no {MANIFEST})")
        data = manifest_path.read_bytes()
        check_bundle_signature(path, data, owner_key)
        manifest = read_json(manifest_path, "bundle manifest")
        _check_manifest(manifest, manifest_path)
        on_disk = _file_table(path)
        declared = manifest["files"]
        for rel, digest in declared.items():
            if rel not in on_disk:
                raise IntegrityError(f"bundle file {rel} is missing")
            if on_disk[rel] != digest:
                raise IntegrityError(f"bundle file {rel} does not match its sha256 in the manifest")
        extra = sorted(set(on_disk) - set(declared))
        if extra:
            raise IntegrityError(f"bundle holds files the manifest does not list: {extra[:5]}")
        return cls(path=path, manifest=manifest, id=sha256_bytes(data))

    # -- what the manifest says ------------------------------------------------
    @property
    def spec(self) -> AdapterSpec:
        return AdapterSpec.from_json(self.manifest["adapter"]["spec"])

    @property
    def layer_map(self) -> list[int]:
        return list(self.manifest["emulator"]["layer_map"])

    @property
    def source_fingerprint(self) -> str:
        return self.manifest["source"]["fingerprint"]

    @property
    def task(self) -> Task:
        return Task(self.manifest["source"]["task"])

    @property
    def expected_tensors(self) -> dict[str, dict]:
        return self.manifest["adapter"]["tensors"]

    # -- loading ---------------------------------------------------------------
    def load_emulator(self, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, AdapterView]:
        """The emulator with the initial adapter attached (LoRA injected, only adapter trainable)."""
        from offsite.models.loading import load_model

        model = load_model(self.path / EMULATOR_DIR, task=self.task, dtype=dtype)
        view = AdapterView(model, self.spec, positions_from_layer_map(self.layer_map))
        view.attach()
        initial = load_file(str(self.path / INITIAL_ADAPTER))
        check_tensor_table(tensor_table(initial), self.expected_tensors, str(self.path / INITIAL_ADAPTER))
        view.load_state_dict(initial)
        return model, view

    def load_tokenizer(self):
        from offsite.models.loading import load_tokenizer

        return load_tokenizer(self.path / TOKENIZER_DIR)


def _check_manifest(m: dict, where: Path) -> None:
    if m.get("format") != FORMAT:
        raise FormatError(f"{where}: not an offsite bundle manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{where}: unsupported bundle format version {m.get('format_version')!r}")
    for key in ("source", "emulator", "adapter", "files"):
        if not isinstance(m.get(key), dict):
            raise FormatError(f"{where}: missing or malformed '{key}'")
    for rel in m["files"]:
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise FormatError(f"{where}: file path {rel!r} escapes the bundle")


def manifest_from_bytes(data: bytes, bundle_id: str, where: str) -> dict:
    """The manifest of bundle ``bundle_id`` from its exact bytes: the bytes must hash to the id."""
    if sha256_bytes(data) != bundle_id:
        raise IntegrityError(f"{where} is not the manifest of bundle {bundle_id[:12]}…")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise FormatError(f"{where}: must hold a JSON object")
    _check_manifest(manifest, Path(where))
    return manifest
