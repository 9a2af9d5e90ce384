"""Fuzzing the ledger's parsers and the ledger audit: whatever an owner, a server or a tamperer hands an
auditor (an entry, a checkpoint, an export), the outcome is a parsed document, a report or an
``OffsiteError``; any other exception fails.

The three parsers get 500 examples each (near-valid documents, canonical or not, byte edits, raw bytes);
the whole audit, which also accounts every readable receipt, gets 150 near-valid exports.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hostile import documents, near_valid
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_kit import accept, enrol, export_bytes, grant, new_owner, receipt

from offsite.errors import OffsiteError
from offsite.fileio import canonical_json
from offsite.formats import ledger as fmt
from offsite.privacy.ledger_audit import LedgerReport, audit_ledger
from offsite.privacy.ledger_report import render_html
from offsite.server.owner_state import OwnerState

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
AUDIT_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


def _build() -> dict:
    root = Path(tempfile.mkdtemp(prefix="offsite-ledger-fuzz-"))
    with OwnerState(new_owner(root / "owner")) as state:
        alice = enrol(state, "alice")
        grant(state, "alice", "clinic", 3.5)
        accept(state, "alice", "clinic", receipt(alice, "clinic", [("run-a", 1.0, 8)]))
        export = export_bytes(state)
        checkpoint = state.ledger.checkpoint()
    doc = json.loads(export)
    return {"export": doc, "entry": doc["entries"][-1]["entry"], "checkpoint": json.loads(checkpoint)}


VALID = _build()


def hostile(base: dict) -> st.SearchStrategy[bytes]:
    return documents(base) | near_valid(base).map(canonical_json)


def _accepts_or_refuses(parse, data):
    try:
        return parse(data)
    except OffsiteError:
        return None


@FUZZ
@given(hostile(VALID["entry"]))
def test_fuzz_ledger_entry(data):
    entry = _accepts_or_refuses(fmt.parse_entry, data)
    assert entry is None or fmt.parse_entry(canonical_json(entry.model_dump(mode="json"))) == entry


@FUZZ
@given(hostile(VALID["checkpoint"]))
def test_fuzz_ledger_checkpoint(data):
    checkpoint = _accepts_or_refuses(fmt.parse_checkpoint, data)
    assert checkpoint is None or isinstance(checkpoint, fmt.Checkpoint)


@FUZZ
@given(hostile(VALID["export"]))
def test_fuzz_ledger_export(data):
    export = _accepts_or_refuses(fmt.parse_export, data)
    assert export is None or isinstance(export, fmt.LedgerExport)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@AUDIT_FUZZ
@given(near_valid(VALID["export"]).map(canonical_json) | documents(VALID["export"]))
def test_fuzz_ledger_audit_of_an_export(scratch, data):
    path = scratch / "export.json"
    path.write_bytes(data)
    report = _accepts_or_refuses(audit_ledger, path)
    if report is not None:
        assert isinstance(report, LedgerReport)
        assert report.ok == (data == canonical_json(VALID["export"]))  # any change is a finding
        render_html(report)  # and the report renders whatever it found
