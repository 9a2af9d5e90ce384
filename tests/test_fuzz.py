"""Fuzzing every parser of untrusted input in the formats: whatever the bytes, the outcome is a parsed
document or an ``OffsiteError``; any other exception fails.

Each parser gets at least 500 examples: near-valid documents (a valid one with a few hostile edits:
values replaced, keys dropped or added, numbers nudged, lists grown or shrunk), byte-level edits of a
valid file, and raw bytes.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import pytest
from hostile import (
    as_bytes,
    byte_mutations,
    documents,
    json_values,
    near_valid,
    safetensors_files,
    valid_adapter_meta,
    valid_manifest,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offsite.data import KINDS, read_records
from offsite.errors import OffsiteError
from offsite.fileio import canonical_json, sha256_bytes
from offsite.formats.adapter import AdapterMeta, parse_adapter_meta, read_adapter, read_adapter_bytes
from offsite.formats.bundle import Bundle
from offsite.formats.issued import manifest_from_bytes
from offsite.formats.manifest import Manifest, parse_manifest
from offsite.formats.safetensors_file import load_tensors, load_tensors_bytes
from offsite.formats.spec import AdapterSpec
from offsite.training.distill import DistillIdentity, DistillSettings, check_resumable

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))


def _accepts_or_refuses(parse, data):
    """The parser's result, or None if it refused with an OffsiteError (anything else propagates)."""
    try:
        return parse(data)
    except OffsiteError:
        return None


@FUZZ
@given(documents(valid_manifest()))
def test_fuzz_manifest(data):
    doc = _accepts_or_refuses(lambda d: parse_manifest(d, "m"), data)
    if doc is not None:  # what parses is consistent and round-trips
        assert isinstance(doc, Manifest)
        assert set(doc.adapter.spec.layers) <= set(doc.emulator.layer_map)
        assert parse_manifest(canonical_json(doc.model_dump(mode="json")), "m") == doc


@FUZZ
@given(documents(valid_adapter_meta()))
def test_fuzz_adapter_meta(data):
    doc = _accepts_or_refuses(lambda d: parse_adapter_meta(d, "a"), data)
    if doc is not None:
        assert isinstance(doc, AdapterMeta)
        assert parse_adapter_meta(canonical_json(doc.model_dump(mode="json", by_alias=True)), "a") == doc


@FUZZ
@given(near_valid(valid_manifest()["adapter"]["spec"]) | json_values)
def test_fuzz_adapter_spec_from_json(doc):
    spec = _accepts_or_refuses(AdapterSpec.from_json, doc)
    assert spec is None or AdapterSpec.from_json(spec.to_json()) == spec


@FUZZ
@given(safetensors_files())
def test_fuzz_safetensors_bytes(data):
    tensors = _accepts_or_refuses(lambda d: load_tensors_bytes(d, "t.safetensors"), data)
    assert tensors is None or isinstance(tensors, dict)


@FUZZ
@given(safetensors_files())
def test_fuzz_safetensors_file(data):
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        tensors = _accepts_or_refuses(lambda p: load_tensors(p, "t.safetensors"), f.name)
    assert tensors is None or isinstance(tensors, dict)


def _identity() -> DistillIdentity:
    return DistillIdentity(
        teacher="a" * 64,
        layer_map=[0, 1, 2, 5, 6, 7],
        adapter_bottom=2,
        adapter_top=2,
        use_lm=True,
        data_sha256="b" * 64,
        settings=DistillSettings(
            steps=6, lr=1e-3, batch_size=8, warmup_steps=2, lm_weight=1.0, kd_weight=30.0, seed=0
        ),
    )


@FUZZ
@given(
    near_valid({"step": 3, "kd_loss": 0.5, "identity": _identity().model_dump(mode="json")})
    | documents({"step": 3, "kd_loss": 0.5, "identity": _identity().model_dump(mode="json")}).map(
        lambda b: json.loads(b) if _is_json(b) else b
    )
)
def test_fuzz_distillation_checkpoint_meta(meta):
    found = _accepts_or_refuses(lambda m: check_resumable(m, _identity(), Path("ckpt")), meta)
    assert found is None or found.identity == _identity()


def _is_json(b: bytes) -> bool:
    try:
        json.loads(b)
        return True
    except ValueError:
        return False


# -- whole readers on disk: bundles, adapters, the owner's record, records ---------------------------------
@pytest.fixture(scope="module")
def fake_bundle(tmp_path_factory):
    """A small bundle directory whose files the fuzzed manifests list (nothing is loaded from it)."""
    root = tmp_path_factory.mktemp("fake") / "bundle"
    manifest = valid_manifest()
    files = {}
    for rel in manifest["files"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
        files[rel] = sha256_bytes(rel.encode())
    manifest["files"] = files
    return root, manifest


@FUZZ
@given(st.data())
def test_fuzz_bundle_open(fake_bundle, data):
    root, manifest = fake_bundle
    raw = data.draw(documents(manifest))
    (root / "manifest.json").write_bytes(raw)
    bundle = _accepts_or_refuses(Bundle.open, root)
    if bundle is not None:
        bundle.close()


@FUZZ
@given(st.data())
def test_fuzz_issued_record(data):
    raw = data.draw(documents(valid_manifest()))
    _accepts_or_refuses(lambda d: manifest_from_bytes(d, sha256_bytes(d), "record"), raw)


@FUZZ
@given(st.data())
def test_fuzz_read_adapter(made, data):
    meta_valid = json.loads((made["adapter"] / "adapter.json").read_text())
    tensors_valid = (made["adapter"] / "adapter.safetensors").read_bytes()
    meta = data.draw(
        st.one_of(
            near_valid(meta_valid).map(as_bytes),
            byte_mutations(canonical_json(meta_valid)),
            st.just(canonical_json(meta_valid)),
        )
    )
    tensors = data.draw(st.one_of(st.just(tensors_valid), byte_mutations(tensors_valid), safetensors_files()))
    if data.draw(st.booleans()):  # make the hash match, so the tensor file itself is parsed
        with contextlib.suppress(Exception):
            doc = json.loads(meta)
            doc["sha256"]["adapter.safetensors"] = sha256_bytes(tensors)
            meta = as_bytes(doc)
    expected = {k: v for k, v in meta_valid["tensors"].items()}
    kwargs = dict(
        expected_tensors=expected,
        bundle_id=meta_valid["bundle_id"],
        source_fingerprint=meta_valid["source_fingerprint"],
    )
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "adapter.json").write_bytes(meta)
        (Path(d) / "adapter.safetensors").write_bytes(tensors)
        from_dir = _accepts_or_refuses(lambda p: read_adapter(p, **kwargs), d)
    from_bytes = _accepts_or_refuses(lambda m: read_adapter_bytes(m, tensors, **kwargs), meta)
    assert (from_dir is None) == (from_bytes is None)  # the two entry points agree


@FUZZ
@given(
    st.sampled_from(KINDS),
    st.sampled_from([".jsonl", ".csv", ".txt"]),
    st.one_of(
        st.binary(max_size=200),
        st.lists(st.text(max_size=30), max_size=5).map(lambda ls: "\n".join(ls).encode()),
        st.lists(
            st.dictionaries(
                st.sampled_from(["text", "prompt", "completion", "question", "choices", "answer", "label"]),
                st.one_of(st.text(max_size=8), st.integers(-3, 3), st.lists(st.text(max_size=3), max_size=3)),
                max_size=4,
            ),
            max_size=4,
        ).map(lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode()),
    ),
)
def test_fuzz_record_reader(kind, suffix, content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes(content)
        records = _accepts_or_refuses(lambda p: read_records(p, kind), path)
    assert records is None or len(records) >= 1
