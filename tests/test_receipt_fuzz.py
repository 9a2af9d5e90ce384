"""Fuzzing the receipt parser (untrusted input): whatever the bytes, the only exception is an OffsiteError.

Three kinds of input, 500 examples each: near-valid receipts (a real version-1 or version-2 receipt with
one to three structural mutations: a field deleted, replaced by another JSON value or an edge value, an
extra field, a list item duplicated), byte-level corruptions of a real receipt, and raw bytes. Receipts
that still parse also go through the audit's checks that need no accountant.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from offsite import crypto
from offsite.errors import OffsiteError
from offsite.fileio import sha256_file
from offsite.privacy import receipt_audit
from offsite.privacy.accounting import make_entry
from offsite.privacy.receipt import build_receipt, first_run_budget
from offsite.privacy.receipt_schema import parse_receipt, uncovered

FUZZ = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

EDGES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**63,
    10**400,
    0.0,
    -0.0,
    1e-320,
    1e308,
    float("inf"),
    float("nan"),
    "",
    "x" * 300,
    "../..",
    "2025-13-40T99:99:99Z",
    [],
    {},
    [None],
    {"": None},
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def receipts(tmp_path_factory) -> list[dict]:
    d = tmp_path_factory.mktemp("fuzz")
    save_file({"w": torch.zeros(2)}, str(d / "adapter.safetensors"))
    pub = crypto.load_public_key(crypto.init_client_keys(d / "keys").public_key)
    run = [make_entry(1.0, 8 / 512, 40)]
    v2 = build_receipt(
        run_history=run,
        cumulative_history=[dict(make_entry(1.2, 0.02, 60), run_id="run-1"), dict(run[0], run_id="run-2")],
        delta=1e-5,
        max_grad_norm=1.0,
        size_bucket=512,
        nominal_batch=8,
        budget=first_run_budget(8.0, 1e-5, at="2025-06-01T12:00:00Z"),
        dataset_id="ds1",
        dataset_fingerprint="ab" * 32,
        adapter_sha256=sha256_file(d / "adapter.safetensors"),
        bundle_id="bundle-123",
        signer_public_key=pub,
        run_id="run-2",
    )
    v1 = json.loads((Path(__file__).parent / "data" / "receipt-v1" / "receipt.json").read_text())
    return [v2, v1]


def _parse_and_check(data: bytes) -> None:
    try:
        version, doc = parse_receipt(data)
    except OffsiteError:
        return
    # What the audit does with a parsed receipt before (and besides) accounting must not crash either.
    uncovered(doc["run_history"], doc["cumulative_history"])
    receipt_audit._noise_source(version, doc)
    if version == 2:
        receipt_audit._sampling_grid(doc)
        receipt_audit._delta_vs_bucket(doc)
        receipt_audit._budget(doc, 1.0)
        receipt_audit._budget(doc, None)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _mutate(doc, data) -> None:
    paths = [p for p in _paths(doc) if p]
    path = data.draw(st.sampled_from(paths))
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    key = path[-1]
    op = data.draw(st.sampled_from(["delete", "replace", "edge", "extra", "duplicate"]))
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = data.draw(JSON)
    elif op == "edge":
        parent[key] = copy.deepcopy(data.draw(st.sampled_from(EDGES)))  # EDGES must never be mutated
    elif op == "extra" and isinstance(parent, dict):
        parent[data.draw(st.text(max_size=8))] = data.draw(JSON)
    elif op == "duplicate" and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[key]))


@FUZZ
@given(data=st.data())
def test_near_valid_receipts(receipts, data):
    doc = json.loads(json.dumps(data.draw(st.sampled_from(receipts))))
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(doc, data)
    # Mostly canonical (as receipts are written), so that mutations reach the checks after parsing.
    layout = data.draw(st.sampled_from(["canonical", "canonical", "canonical", "compact", "unsorted"]))
    if layout == "canonical":
        text = json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=True) + "\n"
    else:
        text = json.dumps(doc, separators=(",", ":") if layout == "compact" else None, allow_nan=True)
    _parse_and_check(text.encode())


@FUZZ
@given(data=st.data())
def test_corrupted_receipt_bytes(receipts, data):
    raw = bytearray(json.dumps(data.draw(st.sampled_from(receipts)), indent=2).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        if op == "flip":
            raw[i] ^= data.draw(st.integers(1, 255))
        elif op == "delete":
            del raw[i : i + data.draw(st.integers(1, 8))]
        elif op == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del raw[i:]
        if not raw:
            break
    _parse_and_check(bytes(raw))


@FUZZ
@given(raw=st.binary(max_size=512) | st.text(max_size=256).map(str.encode))
def test_raw_bytes(raw):
    _parse_and_check(raw)
