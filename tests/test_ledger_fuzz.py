"""Fuzzing the ledger's parsers and the ledger audit: whatever an owner, a server or a tamperer hands an
auditor (an entry, a checkpoint, an export), the outcome is a parsed document, a report or an
``OffsiteError``; any other exception fails.

The three parsers get 500 examples each (near-valid documents, canonical or not, byte edits, raw bytes);
the whole audit, which also accounts every readable receipt, gets 150 near-valid exports.
"""

from __future__ import annotations

import json

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


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict:
    """A real owner state with one accepted receipt: its export, last entry and a checkpoint, with the
    hostile inputs derived from each (built when a test here runs, not at import, under pytest's tmp)."""
    root = tmp_path_factory.mktemp("ledger-fuzz")
    with OwnerState(new_owner(root / "owner")) as state:
        alice = enrol(state, "alice")
        grant(state, "alice", "clinic", 3.5)
        accept(state, "alice", "clinic", receipt(alice, "clinic", [("run-a", 1.0, 8)]))
        export = export_bytes(state)
        checkpoint = state.ledger.checkpoint()
    doc = json.loads(export)
    docs = {"export": doc, "entry": doc["entries"][-1]["entry"], "checkpoint": json.loads(checkpoint)}
    return {
        "docs": docs,
        "hostile": {name: hostile(base) for name, base in docs.items()},
        "audit": near_valid(doc).map(canonical_json) | documents(doc),
        "scratch": root,
    }


def hostile(base: dict) -> st.SearchStrategy[bytes]:
    return documents(base) | near_valid(base).map(canonical_json)


def _accepts_or_refuses(parse, data):
    try:
        return parse(data)
    except OffsiteError:
        return None


@FUZZ
@given(st.data())
def test_fuzz_ledger_entry(valid, data):
    entry = _accepts_or_refuses(fmt.parse_entry, data.draw(valid["hostile"]["entry"]))
    assert entry is None or fmt.parse_entry(canonical_json(entry.model_dump(mode="json"))) == entry


@FUZZ
@given(st.data())
def test_fuzz_ledger_checkpoint(valid, data):
    checkpoint = _accepts_or_refuses(fmt.parse_checkpoint, data.draw(valid["hostile"]["checkpoint"]))
    assert checkpoint is None or isinstance(checkpoint, fmt.Checkpoint)


@FUZZ
@given(st.data())
def test_fuzz_ledger_export(valid, data):
    export = _accepts_or_refuses(fmt.parse_export, data.draw(valid["hostile"]["export"]))
    assert export is None or isinstance(export, fmt.LedgerExport)


@AUDIT_FUZZ
@given(st.data())
def test_fuzz_ledger_audit_of_an_export(valid, data):
    blob = data.draw(valid["audit"])
    path = valid["scratch"] / "export.json"
    path.write_bytes(blob)
    report = _accepts_or_refuses(audit_ledger, path)
    if report is not None:
        assert isinstance(report, LedgerReport)
        assert report.ok == (blob == canonical_json(valid["docs"]["export"]))  # any change is a finding
        render_html(report)  # and the report renders whatever it found
