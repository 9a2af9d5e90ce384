"""Hostile bundles and adapters: clear errors that name what is wrong, never a traceback; files read
once; only regular files; bounded sizes; docs/formats.md generated from the schemas."""

from __future__ import annotations

import json
import os
import pickle
import struct
import threading

import pytest
import torch
from hostile import (
    copy_tree,
    rehash,
    replace_adapter_tensors,
    rewrite_adapter_meta,
    rewrite_manifest,
    safetensors_bytes,
    tensor_file_parts,
    valid_adapter_meta,
    valid_manifest,
)
from safetensors.torch import load_file, save_file

import offsite.formats.adapter as adapter_module
from offsite.errors import FormatError, IntegrityError, MismatchError
from offsite.fileio import canonical_json, sha256_bytes
from offsite.formats.adapter import parse_adapter_meta, read_adapter, read_adapter_bytes
from offsite.formats.bundle import Bundle
from offsite.formats.issued import manifest_from_bytes
from offsite.formats.manifest import parse_manifest
from offsite.formats.safetensors_file import load_tensors_bytes
from offsite.plug import manifest_from_bundle_dir, plug


@pytest.fixture
def bundle(made, tmp_path):
    return copy_tree(made["bundle"], tmp_path / "bundle")


@pytest.fixture
def adapter(made, tmp_path):
    return copy_tree(made["adapter"], tmp_path / "adapter")


def _read(adapter_dir, made):
    with Bundle.open(made["bundle"]) as b:
        return read_adapter(
            adapter_dir,
            expected_tensors=b.expected_tensors,
            bundle_id=b.id,
            source_fingerprint=b.source_fingerprint,
        )


# -- clear errors ---------------------------------------------------------------------------------------
def _set(path, value):
    def change(doc):
        *parents, last = path
        for p in parents:
            doc = doc[p]
        if value is KeyError:
            del doc[last]
        else:
            doc[last] = value

    return change


MANIFEST_CASES = [
    (_set(["emulator", "num_layers"], 7), r"emulator: .*num_layers is 7 but the layer map has 5"),
    (_set(["emulator", "layer_map"], "0,1,2"), r"emulator\.layer_map: Input should be a valid array"),
    (_set(["emulator", "layer_map"], [0, 1, 2, 4, 9]), r"layer_map names layer 9 of a 6-layer model"),
    (_set(["emulator", "layer_map"], [0, 1, 4, 2, 5]), r"layer_map must be strictly increasing"),
    (_set(["emulator", "layer_map"], [0, 1, 2, 3, 4]), r"adapter layers \[5\] are not in the emulator"),
    (
        _set(["emulator", "layer_map"], [0, 1.5, 2, 4, 5]),
        r"emulator\.layer_map\[1\]: Input should be a valid integer",
    ),
    (
        _set(["source", "task"], "regression"),
        r"source\.task: Input should be 'causal-lm', 'seq-cls' or 'masked-lm'",
    ),
    (_set(["source", "fingerprint"], KeyError), r"source\.fingerprint: Field required"),
    (_set(["source"], ["gpt2"]), r"manifest.json\.source: Input should be an object"),
    (
        _set(["files", "emulator/config.json"], "abc"),
        r"files\['emulator/config\.json'\]: String should match pattern",
    ),
    (
        _set(["files", "../../etc/passwd"], "a" * 64),
        r"files\['\.\./\.\./etc/passwd'\]: Value error, must be a plain",
    ),
    (_set(["files", "/abs"], "a" * 64), r"files\['/abs'\]: Value error"),
    (
        _set(["adapter", "tensors", "layers.0.mlp.c_fc.weight", "shape"], KeyError),
        r"adapter\.tensors\['layers\.0\.mlp\.c_fc\.weight'\]\.shape: Field required",
    ),
    (
        _set(["adapter", "tensors", "layers.3.attn.c_attn.weight"], {"shape": [1], "dtype": "float32"}),
        r"tensor 'layers\.3\.attn\.c_attn\.weight' is not named",
    ),
    (_set(["adapter", "spec", "kind"], "lora"), r"a LoRA spec needs lora_rank and lora_alpha"),
    (
        _set(["adapter", "spec", "trains_head"], 1),
        r"adapter\.spec\.trains_head: Input should be a valid boolean",
    ),
    (_set(["format_version"], 2), r"format_version: Input should be 1"),
    (_set(["distillation"], {"steps": float("nan")}), r"distillation\.steps"),
    (
        _set(["source", "config", "x"], float("inf")),
        r"source\.config: Value error, holds a non-finite number",
    ),
    (_set(["surprise"], 1), r"surprise: Extra inputs are not permitted"),
    (lambda doc: [doc], r"manifest\.json: Input should be an object"),
]


@pytest.mark.parametrize("change, message", MANIFEST_CASES)
def test_a_malformed_manifest_is_refused_with_the_field_named(bundle, change, message):
    rewrite_manifest(bundle, change)
    with pytest.raises(FormatError, match=message):
        Bundle.open(bundle)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\xff\xfe{", "Invalid JSON"),
        (b'{"format": "offsite-bundle", ', "Invalid JSON"),
        (b"[" * 5000 + b"]" * 5000, "recursion limit"),
        (b" " * (1 << 20) + b"{}", "more than the 1048576-byte limit"),
    ],
)
def test_unreadable_or_oversized_manifest_bytes_are_refused(bundle, data, message):
    (bundle / "manifest.json").write_bytes(data)
    with pytest.raises(FormatError, match=message):
        Bundle.open(bundle)


ADAPTER_META_CASES = [
    (_set(["sha256"], "abc"), r"adapter\.json\.sha256: Input should be an object"),
    (
        _set(["sha256", "adapter.safetensors"], "abc"),
        r"sha256\['adapter\.safetensors'\]: String should match pattern",
    ),
    (
        _set(["tensors", "layers.0.mlp.c_fc.weight", "shape"], KeyError),
        r"tensors\['layers\.0\.mlp\.c_fc\.weight'\]\.shape: Field required",
    ),
    (
        _set(["tensors", "layers.0.mlp.c_fc.weight", "shape"], [-1, 4]),
        r"shape\[0\]: Input should be greater than or equal to 0",
    ),
    (_set(["tensors", "layers.0.mlp.c_fc.weight", "dtype"], "complex64"), r"dtype: Input should be"),
    (_set(["spec", "layers"], [0, 1, 4]), r"no tensors for adapter layers|not named layers"),
    (_set(["spec"], None), r"adapter\.json\.spec: Input should be an object"),
    (_set(["bundle_id"], 7), r"bundle_id: Input should be a valid string"),
    (
        _set(["hyperparameters", "lr"], float("nan")),
        r"hyperparameters: Value error, holds a non-finite number",
    ),
    (_set(["format"], "offsite-bundle"), r"format: Input should be 'offsite-adapter'"),
    (lambda doc: "adapter", r"adapter\.json: Input should be an object"),
]


@pytest.mark.parametrize("change, message", ADAPTER_META_CASES)
def test_malformed_adapter_metadata_is_refused_with_the_field_named(made, adapter, change, message):
    rewrite_adapter_meta(adapter, change)
    with pytest.raises(FormatError, match=message):
        _read(adapter, made)


def test_adapter_for_another_bundle_or_model_is_a_mismatch(made, adapter):
    rewrite_adapter_meta(adapter, _set(["bundle_id"], "0" * 64))
    with pytest.raises(MismatchError, match="trained on bundle 0000"):
        _read(adapter, made)


def _header_file(header: dict, data: bytes) -> bytes:
    return safetensors_bytes(header, data)


def _overlapping() -> bytes:
    header, data = tensor_file_parts()
    header["b"]["data_offsets"] = [16, 48]
    return _header_file(header, data[:48])


def _gap() -> bytes:
    header, data = tensor_file_parts()
    header["b"]["data_offsets"] = [32, 64]
    return _header_file(header, data + b"\0" * 8)


def _wrong_size() -> bytes:
    header, data = tensor_file_parts()
    header["a"]["shape"] = [3, 3]
    return _header_file(header, data)


def _short_data() -> bytes:
    header, data = tensor_file_parts()
    return _header_file(header, data[:-4])


def _unknown_dtype() -> bytes:
    header, data = tensor_file_parts()
    header["a"]["dtype"] = "C64"
    return _header_file(header, data)


SAFETENSORS_CASES = [
    (pickle.dumps({"weight": [1.0, 2.0]}), "not a safetensors file"),
    (b"\x01\x02", "too short to be a safetensors file"),
    (struct.pack("<Q", 2**63) + b"{}", r"header length 9223372036854775808 is over"),
    (struct.pack("<Q", 1000) + b'{"a": 1}', "runs past the end of the file"),
    (struct.pack("<Q", 8) + b"garbage!", "header: Invalid JSON"),
    (struct.pack("<Q", 2) + b"[]", "header: Input should be an object"),
    (_overlapping(), "tensor 'b' overlaps the tensor before it"),
    (_gap(), "tensor 'b' leaves a gap before it"),
    (_wrong_size(), r"24 bytes do not hold shape \[3, 3\] of F32"),
    (_short_data(), "the header describes 56 bytes of tensor data, the file holds 52"),
    (_unknown_dtype(), r"tensors\.a\.dtype: Input should be"),
]


@pytest.mark.parametrize("data, message", SAFETENSORS_CASES)
def test_malformed_safetensors_are_refused_before_the_library_sees_them(data, message):
    with pytest.raises(FormatError, match=message):
        load_tensors_bytes(data, "t.safetensors")


@pytest.mark.parametrize("data, message", SAFETENSORS_CASES[:1] + SAFETENSORS_CASES[6:8])
def test_a_hostile_adapter_tensor_file_is_refused(made, adapter, data, message):
    replace_adapter_tensors(adapter, data)
    with pytest.raises(FormatError, match=message):
        _read(adapter, made)


@pytest.mark.parametrize("rel", ["initial_adapter.safetensors", "emulator/model.safetensors"])
def test_a_pickle_renamed_safetensors_in_a_bundle_is_refused_on_open(bundle, rel):
    (bundle / rel).write_bytes(pickle.dumps({"weight": torch.zeros(2).tolist()}))
    rehash(bundle, rel)
    with pytest.raises(FormatError, match=f"bundle file {rel}: not a safetensors file"):
        Bundle.open(bundle)


def test_a_valid_manifest_and_adapter_meta_parse_and_round_trip():
    m = parse_manifest(canonical_json(valid_manifest()), "m")
    assert parse_manifest(canonical_json(m.model_dump(mode="json")), "m") == m
    a = parse_adapter_meta(canonical_json(valid_adapter_meta()), "a")
    assert parse_adapter_meta(canonical_json(a.model_dump(mode="json", by_alias=True)), "a") == a


def test_the_writers_refuse_what_the_readers_would_refuse(made, tmp_path):
    from offsite.formats.adapter import write_adapter

    with Bundle.open(made["bundle"]) as b:
        tensors = load_file(str(made["adapter"] / "adapter.safetensors"))
        with pytest.raises(
            FormatError, match=r"adapter metadata being written\.hyperparameters: .*non-finite"
        ):
            write_adapter(
                tmp_path,
                tensors,
                spec=b.spec,
                bundle_id=b.id,
                source_fingerprint=b.source_fingerprint,
                hyperparameters={"lr": float("inf")},
            )


# -- read once ------------------------------------------------------------------------------------------
def test_bundle_files_swapped_after_open_are_never_loaded(made, bundle, tmp_path):
    opened = Bundle.open(bundle)
    _, view = opened.load_emulator()
    expected = {k: v.clone() for k, v in view.state_dict().items()}
    # Swap the initial adapter for other (well-formed) tensors after the check.
    swapped = {
        k: torch.full_like(v, 7.0) for k, v in load_file(str(bundle / "initial_adapter.safetensors")).items()
    }
    save_file(swapped, str(bundle / "initial_adapter.safetensors"))
    emu = load_file(str(bundle / "emulator" / "model.safetensors"))
    save_file(
        {k: torch.full_like(v, 3.0) for k, v in emu.items()}, str(bundle / "emulator" / "model.safetensors")
    )
    model, view = opened.load_emulator()
    for k, v in view.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert not any(bool((p == 3.0).all()) for p in model.parameters())
    opened.close()
    assert not opened.staged.exists()


def test_an_adapter_swapped_between_hash_and_load_is_never_loaded(made, adapter, monkeypatch):
    original = load_file(str(adapter / "adapter.safetensors"))
    bad = {k: torch.full_like(v, 5.0) for k, v in original.items()}

    def swap():
        save_file(bad, str(adapter / "adapter.safetensors"))

    # Swap the file right after it is hashed, whichever way the hash is taken.
    real_copy, real_hash = adapter_module.copy_hashing, adapter_module.sha256_file

    def copy_then_swap(*args, **kwargs):
        digest = real_copy(*args, **kwargs)
        swap()
        return digest

    def hash_then_swap(path):
        digest = real_hash(path)
        swap()
        return digest

    monkeypatch.setattr(adapter_module, "copy_hashing", copy_then_swap)
    monkeypatch.setattr(adapter_module, "sha256_file", hash_then_swap)
    loaded = _read(adapter, made)
    for k, v in loaded.tensors.items():
        assert torch.equal(v, original[k]), k


def test_read_adapter_bytes_hashes_and_loads_the_same_bytes(made):
    with Bundle.open(made["bundle"]) as b:
        a = read_adapter_bytes(
            (made["adapter"] / "adapter.json").read_bytes(),
            (made["adapter"] / "adapter.safetensors").read_bytes(),
            expected_tensors=b.expected_tensors,
            bundle_id=b.id,
            source_fingerprint=b.source_fingerprint,
        )
        assert set(a.tensors) == set(b.expected_tensors)
        with pytest.raises(IntegrityError, match="does not match adapter.json"):
            read_adapter_bytes(
                (made["adapter"] / "adapter.json").read_bytes(),
                (made["adapter"] / "adapter.safetensors").read_bytes() + b" ",
                expected_tensors=b.expected_tensors,
                bundle_id=b.id,
                source_fingerprint=b.source_fingerprint,
            )


# -- only regular files ------------------------------------------------------------------------------------
def test_a_symlink_in_a_bundle_is_refused_even_to_identical_content(bundle, tmp_path):
    target = tmp_path / "elsewhere.json"
    rel = "tokenizer/tokenizer_config.json"
    target.write_bytes((bundle / rel).read_bytes())
    (bundle / rel).unlink()
    (bundle / rel).symlink_to(target)
    with pytest.raises(FormatError, match=f"{rel} is a symlink"):
        Bundle.open(bundle)


def test_a_symlinked_directory_in_a_bundle_is_refused(bundle, tmp_path):
    os.rename(bundle / "tokenizer", tmp_path / "tok")
    (bundle / "tokenizer").symlink_to(tmp_path / "tok")
    with pytest.raises(FormatError, match="tokenizer is a symlink"):
        Bundle.open(bundle)


def test_a_fifo_in_a_bundle_is_refused(bundle):
    os.mkfifo(bundle / "emulator" / "pipe")
    with pytest.raises(FormatError, match="emulator/pipe is a FIFO"):
        Bundle.open(bundle)


def test_a_hard_linked_bundle_file_is_refused(bundle, tmp_path):
    os.link(bundle / "emulator" / "config.json", tmp_path / "other-name")
    with pytest.raises(FormatError, match="emulator/config.json has 2 hard links"):
        Bundle.open(bundle)


def test_a_symlinked_adapter_file_is_refused(made, adapter, tmp_path):
    os.rename(adapter / "adapter.safetensors", tmp_path / "real.safetensors")
    (adapter / "adapter.safetensors").symlink_to(tmp_path / "real.safetensors")
    with pytest.raises(FormatError, match="adapter.safetensors is a symlink"):
        _read(adapter, made)


def test_a_fifo_for_adapter_json_is_refused_without_blocking(made, adapter):
    (adapter / "adapter.json").unlink()
    os.mkfifo(adapter / "adapter.json")
    outcome = {}

    def attempt():
        try:
            _read(adapter, made)
        except Exception as e:  # recorded, checked below
            outcome["error"] = e

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout=20)
    if t.is_alive():  # unblock the reader so the test process can end, then fail
        fd = os.open(adapter / "adapter.json", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("reading a FIFO blocked")
    assert isinstance(outcome.get("error"), FormatError)
    assert "adapter.json is a FIFO" in str(outcome["error"])


def test_oversized_adapter_json_is_refused_before_parsing(made, adapter):
    data = (adapter / "adapter.json").read_bytes()
    (adapter / "adapter.json").write_bytes(data + b" " * (1 << 20))
    with pytest.raises(FormatError, match="more than the 1048576-byte limit"):
        _read(adapter, made)


def test_plug_refuses_a_hostile_adapter_without_a_traceback(made, adapter, tmp_path):
    rewrite_adapter_meta(adapter, _set(["sha256"], "abc"))
    with pytest.raises(FormatError, match="sha256"):
        plug(made["model"], adapter, tmp_path / "merged", manifest_from_bundle_dir(made["bundle"]))
    assert not (tmp_path / "merged").exists()


# -- the owner's record --------------------------------------------------------------------------------
def test_issued_record_is_trusted_only_under_its_own_hash(made):
    data = (made["bundle"] / "manifest.json").read_bytes()
    bundle_id = sha256_bytes(data)
    assert manifest_from_bytes(data, bundle_id, "record").source.task == "causal-lm"
    with pytest.raises(IntegrityError, match="is not the manifest of bundle"):
        manifest_from_bytes(data.replace(b'"causal-lm"', b'"seq-cls"'), bundle_id, "record")
    bad = b'{"format": "offsite-bundle"}'
    with pytest.raises(FormatError, match="Field required"):
        manifest_from_bytes(bad, sha256_bytes(bad), "record")
    with pytest.raises(FormatError, match="malformed bundle id"):
        manifest_from_bytes(data, ["not", "an", "id"], "record")


# -- the doc -------------------------------------------------------------------------------------------------
def test_docs_formats_tables_are_generated_from_the_current_schemas():
    from offsite.formats.doc import main, render, tables

    assert main(["--check"]) == 0
    doc = (adapter_module.Path(__file__).resolve().parents[1] / "docs" / "formats.md").read_text()
    for name in tables():
        assert f"<!-- schema: {name} -->" in doc
    # and the check can fail: a field dropped from a table is noticed
    assert render(doc.replace("| `emulator.layer_map` |", "| `emulator.layers` |")) != doc.replace(
        "| `emulator.layer_map` |", "| `emulator.layers` |"
    )


def test_manifest_json_error_names_the_file(bundle):
    (bundle / "manifest.json").write_bytes(json.dumps({"format": 1}).encode())
    with pytest.raises(FormatError, match=r"bundle/manifest\.json\.format: Input should be 'offsite-bundle'"):
        Bundle.open(bundle)


def test_an_emulator_of_another_architecture_is_refused(bundle):
    config = json.loads((bundle / "emulator" / "config.json").read_text())
    config["model_type"] = "opt"  # loads as a randomly initialised OPT otherwise
    (bundle / "emulator" / "config.json").write_text(json.dumps(config))
    rehash(bundle, "emulator/config.json")
    with Bundle.open(bundle) as b, pytest.raises(FormatError, match="the emulator is a 'opt' model"):
        b.load_emulator()


def test_a_directory_without_a_manifest_or_a_file_is_not_a_bundle(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match=r"empty is not a bundle \(no manifest.json\)"):
        Bundle.open(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FormatError, match="file is not a directory"):
        Bundle.open(tmp_path / "file")


def test_an_adapter_whose_spec_is_not_the_bundles_is_a_mismatch(tmp_path):
    from hostile import build_bundle_and_adapter

    lora = build_bundle_and_adapter(tmp_path, "llama", lora=2)
    rewrite_adapter_meta(lora["adapter"], _set(["spec", "lora_alpha"], 1000.0))
    with Bundle.open(lora["bundle"]) as b, pytest.raises(MismatchError, match="is not the bundle's"):
        read_adapter(
            lora["adapter"],
            expected_tensors=b.expected_tensors,
            bundle_id=b.id,
            source_fingerprint=b.source_fingerprint,
            expected_spec=b.spec,
        )
    with pytest.raises(MismatchError, match="is not the bundle's"):
        plug(lora["model"], lora["adapter"], tmp_path / "merged", manifest_from_bundle_dir(lora["bundle"]))


def test_non_finite_values_are_found_in_any_block_of_a_large_tensor():
    """The finite check runs block by block (bounded memory on the server); a bad value in the last
    block of a tensor, or in a tensor after a clean one, is found all the same."""
    n = adapter_module._FINITE_BLOCK * 2 + 3
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for bad in (float("nan"), float("inf"), float("-inf")):
            t = torch.zeros(n, dtype=dtype)
            t[-1] = bad
            tensors = {"a.clean": torch.zeros(5, 7), "b.bad": t}
            with pytest.raises(FormatError, match="tensor b.bad contains NaN or infinite values"):
                adapter_module._check_finite(tensors, "adapter")
    adapter_module._check_finite({"w": torch.zeros(n), "steps": torch.zeros(3, dtype=torch.int64)}, "adapter")
