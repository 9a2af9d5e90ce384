"""Hostile inputs for the format tests: a real tiny bundle and adapter to spoil, and hypothesis
strategies for near-valid JSON documents and safetensors files."""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from hypothesis import strategies as st
from tiny import make_tiny_checkpoint

from offsite.fileio import canonical_json, sha256_bytes, sha256_file

HEX = "0123456789abcdef"


def build_bundle_and_adapter(root: Path, family: str = "gpt2", lora: int | None = None) -> dict[str, Path]:
    """A real model, bundle and (untrained) adapter under ``root``."""
    from offsite.formats.adapter import write_adapter
    from offsite.formats.bundle import Bundle
    from offsite.prepare import PrepareOptions, prepare
    from offsite.tune import adapter_tensors_for_export

    model = make_tiny_checkpoint(root / "model", family, layers=6)
    prepare(model, root / "bundle", PrepareOptions(lora_rank=lora))
    with Bundle.open(root / "bundle") as bundle:
        _, view = bundle.load_emulator()
        (root / "adapter").mkdir()
        write_adapter(
            root / "adapter",
            adapter_tensors_for_export(view, bundle),
            spec=bundle.spec,
            bundle_id=bundle.id,
            source_fingerprint=bundle.source_fingerprint,
            hyperparameters={"epochs": 1, "lr": 0.001, "dp": False},
        )
    return {"model": model, "bundle": root / "bundle", "adapter": root / "adapter"}


def copy_tree(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def rewrite_manifest(bundle: Path, change) -> None:
    """Apply ``change(manifest_dict)`` (which may return a replacement) and write it back."""
    path = bundle / "manifest.json"
    doc = json.loads(path.read_text())
    doc = change(doc) or doc
    path.write_bytes(json.dumps(doc, allow_nan=True).encode())


def rehash(bundle: Path, rel: str) -> None:
    """Make the manifest list ``rel``'s current sha256 (as a hostile sender would)."""

    def set_hash(doc):
        doc["files"][rel] = sha256_file(bundle / rel)

    rewrite_manifest(bundle, set_hash)


def rewrite_adapter_meta(adapter: Path, change) -> None:
    path = adapter / "adapter.json"
    doc = json.loads(path.read_text())
    doc = change(doc) or doc
    path.write_bytes(json.dumps(doc, allow_nan=True).encode())


def replace_adapter_tensors(adapter: Path, data: bytes) -> None:
    """Put ``data`` in adapter.safetensors and make adapter.json list its hash."""
    (adapter / "adapter.safetensors").write_bytes(data)

    def set_hash(doc):
        doc["sha256"]["adapter.safetensors"] = sha256_bytes(data)

    rewrite_adapter_meta(adapter, set_hash)


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# -- synthetic valid documents (no model needed) ----------------------------------------------------
def valid_manifest() -> dict:
    digest = "a" * 64
    tensors = {f"layers.{i}.mlp.c_fc.weight": {"shape": [4, 8], "dtype": "float32"} for i in (0, 1, 4, 5)}
    return {
        "format": "offsite-bundle",
        "format_version": 1,
        "source": {
            "fingerprint": digest,
            "family": "gpt2",
            "model_type": "gpt2",
            "model_class": "GPT2LMHeadModel",
            "task": "causal-lm",
            "num_labels": None,
            "total_layers": 6,
            "dtype": "float32",
            "config": {"n_layer": 6, "n_embd": 8, "architectures": ["GPT2LMHeadModel"]},
        },
        "emulator": {"layer_map": [0, 1, 2, 4, 5], "num_layers": 5},
        "adapter": {
            "spec": {"kind": "blocks", "layers": [0, 1, 4, 5], "lora_rank": None, "lora_alpha": None,
                     "trains_head": False},
            "tensors": tensors,
        },
        "distillation": None,
        "files": {
            "emulator/config.json": digest,
            "emulator/model.safetensors": "b" * 64,
            "initial_adapter.safetensors": "c" * 64,
            "tokenizer/tokenizer.json": "d" * 64,
        },
        "created_with": {"offsite": "0.1.0", "torch": "2.13.0", "transformers": "5.0.0"},
    }  # fmt: skip


def valid_adapter_meta(manifest: dict | None = None) -> dict:
    m = manifest or valid_manifest()
    return {
        "format": "offsite-adapter",
        "format_version": 1,
        "bundle_id": "e" * 64,
        "source_fingerprint": m["source"]["fingerprint"],
        "spec": copy.deepcopy(m["adapter"]["spec"]),
        "tensors": copy.deepcopy(m["adapter"]["tensors"]),
        "sha256": {"adapter.safetensors": "f" * 64},
        "hyperparameters": {"epochs": 3, "lr": 0.001, "dp": True, "delta": 1e-5},
    }


# -- hypothesis strategies ----------------------------------------------------------------------------
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-3, 12)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["abc", "../x", "/etc/passwd", "a" * 64, "A" * 64, "lora", "blocks", "seq-cls", "F32"])
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)


def _slots(doc: Any, out: list) -> list:
    """Every (container, key) in a JSON tree."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append((doc, k))
            _slots(v, out)
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.append((doc, i))
            _slots(v, out)
    return out


@st.composite
def near_valid(draw, base: dict) -> Any:
    """``base`` with one to three small hostile edits: a value replaced, a key dropped or added, a
    number nudged, a list grown or shrunk."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(doc, [])
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        op = draw(st.sampled_from(["replace", "delete", "add", "nudge", "grow"]))
        value = container[key]
        if op == "replace":
            container[key] = draw(json_values)
        elif op == "delete":
            del container[key]
        elif op == "add" and isinstance(value, dict):
            value[draw(st.text(max_size=8) | st.sampled_from(["extra", "__metadata__", "layers.9.x"]))] = (
                draw(json_values)
            )
        elif op == "nudge" and isinstance(value, (int, float)) and not isinstance(value, bool):
            container[key] = value + draw(st.sampled_from([-1, 1, 2, 1000, -(2**40), 0.5]))
        elif op == "grow" and isinstance(value, list):
            if value and draw(st.booleans()):
                value.pop(draw(st.integers(0, len(value) - 1)))
            else:
                value.append(draw(json_values | st.integers(0, 8)))
        else:
            container[key] = draw(json_values)
    return doc


def as_bytes(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    """``data`` truncated, or with bytes flipped, inserted or deleted."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return bytes(data)


def documents(base: dict) -> st.SearchStrategy[bytes]:
    """Bytes of hostile documents near ``base``: structured edits, byte edits and raw bytes."""
    valid = canonical_json(base)
    return st.one_of(
        near_valid(base).map(as_bytes),
        byte_mutations(valid),
        st.binary(max_size=64),
        json_values.map(as_bytes),
    )


def tensor_file_parts() -> tuple[dict, bytes]:
    """A valid two-tensor safetensors header and its data."""
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.arange(4, dtype=torch.int64)
    header = {
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "I64", "shape": [4], "data_offsets": [24, 56]},
        "__metadata__": {"format": "pt"},
    }
    return header, a.numpy().tobytes() + b.numpy().tobytes()


@st.composite
def safetensors_files(draw) -> bytes:
    """Near-valid safetensors files: header edits (offsets, shapes, dtypes, names), wrong length
    prefixes, truncations, and raw bytes."""
    header, data = tensor_file_parts()
    kind = draw(st.sampled_from(["valid", "header", "header", "prefix", "bytes", "raw"]))
    if kind == "valid":
        return safetensors_bytes(header, data)
    if kind == "header":
        edited = draw(near_valid(header))
        data = data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data
        return safetensors_bytes(edited, data) if isinstance(edited, dict) else as_bytes(edited)
    if kind == "prefix":
        raw = json.dumps(header).encode()
        n = draw(st.sampled_from([0, 1, len(raw) - 1, len(raw) + 1, 2**63, 2**64 - 1, 100_000_001]))
        return struct.pack("<Q", n) + raw + data
    if kind == "bytes":
        return draw(byte_mutations(safetensors_bytes(header, data)))
    return draw(st.binary(max_size=96))
