"""The demo's mission over the wire, with two data owners: the code `offsite demo` runs (with one), on a
tiny GPT-2. Real PKI, a real gRPC server with mutual TLS on loopback, real Opacus, real SQLite."""

from __future__ import annotations

import socket
import sqlite3

import pytest
from tiny import make_tiny_checkpoint
from world import training_data

from offsite.cli.demo_mission import DataOwner, Layout, Policy, Timings, audit, audit_passed, run_mission
from offsite.errors import OffsiteError
from offsite.formats import ledger as fmt
from offsite.prepare import PrepareOptions
from offsite.server import admin
from offsite.server.owner_state import OwnerState
from offsite.server.storage.base import SubmissionState

POLICY = Policy(job_id="demo-job", epsilon=8.0, delta=1e-3, train={"epochs": 1, "batch_size": 16})
PREPARE = PrepareOptions(adapter_bottom=1, adapter_top=1)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("mission") / "model", "gpt2", layers=4, hidden=32)


def test_two_data_owners_enrol_fetch_train_submit_and_the_ledger_audit_passes(tmp_path, model):
    owners = [
        DataOwner("clinic-a", training_data(tmp_path / "a.jsonl", seed=1), "notes-a"),
        DataOwner("clinic-b", training_data(tmp_path / "b.jsonl", seed=2), "notes-b"),
    ]
    layout = Layout(tmp_path / "work")
    seconds: dict[str, float] = {}
    ports = []
    mission = run_mission(layout, model, PREPARE, owners, POLICY, Timings(seconds), on_server=ports.append)

    assert mission.port == ports[0] > 0
    assert not _listening(mission.port)  # stopped once the owner has plugged
    assert set(mission.owners) == {"clinic-a", "clinic-b"}
    for cid, trained in mission.owners.items():
        assert trained.state == "accepted"
        assert trained.limits["epsilon"] == 8.0 and trained.limits["delta"] == 1e-3
        assert (
            trained.receipt["delta"] == 1e-3 and trained.receipt["epsilon"]["cumulative"]["prv_upper"] <= 8.0
        )
        assert (layout.fetched(cid) / "manifest.sig").is_file()  # fetched signed over the wire
        assert trained.checkpoint is not None and trained.checkpoint.is_relative_to(layout.keys(cid))
    assert mission.plugged == mission.owners["clinic-a"].submission_id
    assert (layout.merged / "config.json").is_file()
    with OwnerState(layout.owner) as state:
        states = {s.client_id: s.state for s in admin.submissions(state, "demo-job")}
    assert states == {"clinic-a": SubmissionState.PLUGGED, "clinic-b": SubmissionState.ACCEPTED}
    for stage in ("server start (mutual TLS on loopback)", "enrol (keys, request, certificate, package)"):
        assert seconds[stage] > 0
    assert "fetch (job list, owner signature, every hash)" in seconds
    assert "submit + verify (upload, server checks, ledger)" in seconds

    report = audit(layout, list(mission.owners))
    assert audit_passed(report, 2), report.to_dict()
    assert report.owner_key_pinned and report.checkpoints_checked >= 2
    assert {d.dataset_id for d in report.datasets()} == {"notes-a", "notes-b"}
    assert all(d.verdict == "ok" and d.accepted == 1 for d in report.datasets())
    assert sorted(p.name for p in (layout.auditor / "checkpoints").iterdir()) == ["clinic-a", "clinic-b"]

    # The verdict can fail: the ledger cut off at clinic-b's acceptance, which its checkpoint names.
    index = fmt.parse_checkpoint(mission.owners["clinic-b"].checkpoint.read_bytes()).index
    db = sqlite3.connect(layout.owner / "offsite.db")
    db.execute("DROP TRIGGER ledger_no_delete")
    db.execute("DELETE FROM ledger WHERE seq >= ?", (index,))
    db.commit()
    db.close()
    report = audit(layout, list(mission.owners))
    assert not audit_passed(report, 2) and report.first_bad.kind == "truncated"


def test_the_server_is_stopped_when_a_step_fails(tmp_path, model):
    ports = []
    missing = DataOwner("clinic-a", tmp_path / "no-such-file.jsonl", "notes-a")
    with pytest.raises(OffsiteError):
        run_mission(
            Layout(tmp_path / "work"), model, PREPARE, [missing], POLICY, Timings({}), on_server=ports.append
        )
    assert ports and not _listening(ports[0])


def test_a_work_directory_in_use_is_refused(tmp_path, model):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "something").write_text("x")
    with pytest.raises(OffsiteError, match="not an empty directory"):
        owner = DataOwner("clinic-a", tmp_path / "a.jsonl", "notes-a")
        run_mission(Layout(tmp_path / "work"), model, PREPARE, [owner], POLICY, Timings({}))


def test_demo_keep_refuses_a_directory_in_use_before_any_work(tmp_path, capsys, monkeypatch):
    from offsite.cli.main import main

    monkeypatch.setenv("OFFSITE_CACHE_DIR", str(tmp_path / "empty-cache"))  # a cold cache: would pretrain
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "owner").mkdir()
    assert main(["demo", "--quick", "--keep", str(tmp_path / "kept")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert not (tmp_path / "empty-cache").exists()
