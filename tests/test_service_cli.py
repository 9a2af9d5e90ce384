"""The whole mission through the commands, with `offsite serve` as a separate process: owner init,
enrol, publish, grant; the data owner fetches, trains with DP under the smallest of its limits (`offsite
client train --server --job`), submits and asks what the ledger holds; the owner sees it accepted and
plugs it in; a revoked data owner is turned away; an auditor checks the exported ledger."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny import make_tiny_checkpoint
from world import ServerProcess, free_port, training_data

from offsite.cli.main import main

NEW_COMMANDS = [
    ["serve"],
    ["owner", "init"],
    ["owner", "enrol"],
    ["owner", "revoke"],
    ["owner", "publish"],
    ["owner", "submissions"],
    ["owner", "plug"],
    ["owner", "grant"],
    ["owner", "export-ledger"],
    ["audit", "ledger"],
    ["client", "jobs"],
    ["client", "fetch"],
    ["client", "submit"],
    ["client", "status"],
    ["client", "keys", "request"],
    ["client", "keys", "install"],
]


@pytest.mark.parametrize("command", NEW_COMMANDS, ids=" ".join)
def test_every_service_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: offsite" in text and len(text) > 300


def offsite(capsys, *args, code: int = 0) -> dict:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert rc == code, captured.err
    return (
        json.loads(captured.out)
        if "--json" in args and code == 0
        else {"out": captured.out, "err": captured.err}
    )


def test_mission_over_the_wire(tmp_path, capsys, monkeypatch):
    from offsite.cli import ui

    monkeypatch.setattr(ui.console, "width", 200)
    owner_dir, client_dir = os.environ["OFFSITE_OWNER_DIR"], os.environ["OFFSITE_CLIENT_DIR"]
    port = free_port()
    model = make_tiny_checkpoint(tmp_path / "model", "gpt2", layers=4)
    data = training_data(tmp_path / "train.jsonl")

    offsite(capsys, "owner", "init", "--server-name", "localhost", "--port", port, "--json")
    offsite(
        capsys,
        "owner",
        "prepare",
        model,
        "--out",
        tmp_path / "bundle",
        "--adapter-bottom",
        1,
        "--adapter-top",
        1,
        "--json",
    )
    keys = offsite(capsys, "client", "keys", "init", "--json")
    offsite(
        capsys,
        "owner",
        "enrol",
        keys["enrolment_request"],
        "--client-id",
        "alice",
        "--out",
        tmp_path / "pkg",
        "--json",
    )
    offsite(capsys, "client", "keys", "install", tmp_path / "pkg", "--json")
    job = offsite(
        capsys,
        "owner",
        "publish",
        tmp_path / "bundle",
        "--job",
        "j1",
        "--clients",
        "alice",
        "--max-epsilon",
        10,
        "--max-delta",
        1e-3,
        "--json",
    )
    assert job["clients"] == ["alice"] and not job["allow_no_dp"]
    granted = offsite(capsys, "owner", "grant", "alice", "clinic", "--epsilon", 6, "--delta", 1e-4, "--json")
    assert (granted["epsilon"], granted["spent_epsilon"]) == (6, 0)

    server = ServerProcess(owner_dir, port).start()
    try:
        jobs = offsite(capsys, "client", "jobs", "--json")["jobs"]
        assert [(j["job_id"], j["signature"]) for j in jobs] == [("j1", "ok")]
        fetched = offsite(capsys, "client", "fetch", "j1", "--out", tmp_path / "fetched", "--json")
        assert fetched["bundle_id"] == job["bundle_id"]
        shown = offsite(capsys, "client", "fetch", "j1", "--out", tmp_path / "fetched-again")["err"]
        files = json.loads((tmp_path / "fetched" / "manifest.json").read_text())["files"]
        assert all(rel in shown for rel in files), shown  # without --json: a progress bar per file, on stderr
        # the target is the smallest of the limits: the job's 10, the grant's 6 (at the grant's δ), --epsilon 8
        trained = offsite(
            capsys,
            "client", "train", tmp_path / "fetched", "--data", data, "--out", tmp_path / "adapter",
            "--dataset-id", "clinic", "--epsilon", 8, "--epochs", 1, "--server", "--job", "j1", "--json",
        )  # fmt: skip
        limits = trained["server_limits"]
        assert (limits["epsilon"], limits["delta"], limits["chosen"]) == (6, 1e-4, "the owner's grant")
        assert (
            trained["dp"] and trained["delta"] == 1e-4 and trained["epsilon"]["cumulative"]["prv_upper"] <= 6
        )
        submitted = offsite(capsys, "client", "submit", tmp_path / "adapter", "--job", "j1", "--json")
        assert submitted["state"] == "accepted", submitted
        assert Path(submitted["ledger_checkpoint"]).parent == Path(client_dir) / "checkpoints"
        [budget] = offsite(capsys, "client", "budget", "--server", "--json")["datasets"]
        assert budget["grant"]["epsilon"] == 6 and budget["accepted_submissions"] == 1
        assert budget["spent_epsilon"] == pytest.approx(trained["epsilon"]["cumulative"]["prv_upper"])
        assert budget["this_machine"]["unknown_runs"] is None
        assert offsite(capsys, "client", "status", "--json")["submissions"][0]["state"] == "accepted"
        listed = offsite(capsys, "owner", "submissions", "--json")["submissions"]
        assert [(s["client_id"], s["state"], s["dataset_id"]) for s in listed] == [
            ("alice", "accepted", "clinic")
        ]
        table = offsite(capsys, "owner", "submissions")["out"]
        assert "accepted" in table and submitted["submission_id"] in table

        plugged = offsite(
            capsys,
            "owner",
            "plug",
            model,
            "--submission",
            submitted["submission_id"],
            "--out",
            tmp_path / "merged",
            "--json",
        )
        assert plugged["bundle_id"] == job["bundle_id"]
        assert offsite(capsys, "owner", "submissions", "--json")["submissions"][0]["state"] == "plugged"
        adapter = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
        merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
        name = "layers.0.mlp.c_fc.weight"
        assert (merged["transformer.h.0.mlp.c_fc.weight"] == adapter[name]).all()
        # the same adapter plugs by hand too, with the bundle from the owner's record, or with --bundle and
        # no owner state at all
        offsite(capsys, "owner", "plug", model, tmp_path / "adapter", "--out", tmp_path / "merged2", "--json")
        nowhere = tmp_path / "no-state"
        offsite(
            capsys, "owner", "plug", model, tmp_path / "adapter", "--bundle", tmp_path / "bundle",
            "--out", tmp_path / "merged3", "--state", nowhere, "--json",
        )  # fmt: skip
        assert not nowhere.exists()
        assert (
            "either ADAPTER"
            in offsite(capsys, "owner", "plug", model, "--out", tmp_path / "m4", code=2)["err"]
        )

        offsite(capsys, "owner", "revoke", "alice", "--json")
        assert "revoked" in offsite(capsys, "client", "jobs", code=2)["err"]
    finally:
        assert server.stop() == 0
    assert (Path(client_dir) / "submissions" / f"{submitted['submission_id']}.json").is_file()

    # the auditor: the exported ledger, the owner key from the enrolment package, the client's checkpoints
    exported = offsite(capsys, "owner", "export-ledger", "--out", tmp_path / "ledger.json", "--json")
    audit = offsite(
        capsys, "audit", "ledger", exported["export"], "--owner-pubkey", tmp_path / "pkg" / "owner_signing_key.pub.pem",
        "--checkpoints", Path(client_dir) / "checkpoints", "--html", tmp_path / "report.html", "--json",
    )  # fmt: skip
    assert audit["ok"] and audit["owner_key_pinned"] and audit["checkpoints_checked"] >= 1
    [alice] = audit["clients"]
    assert alice["revoked_at_entry"] is not None and alice["datasets"][0]["accepted_submissions"] == 1
    assert (tmp_path / "report.html").is_file()
    assert "PASS" in offsite(capsys, "audit", "ledger", owner_dir)["out"]


def test_serve_takes_the_per_client_limits_as_flags_and_refuses_nonsense(world, capsys):
    from offsite.cli.main import build_parser
    from offsite.cli.serve import limits_of
    from offsite.server.limits import ServerLimits

    args = build_parser().parse_args(
        ["serve", "--upload-ttl", "0.5", "--max-open-uploads", "2", "--upload-quota-mib", "8"]
        + ["--calls-per-second", "5", "--call-burst", "7", "--max-calls-per-client", "3"]
    )
    assert limits_of(args) == ServerLimits(1800.0, 2, 8 << 20, 5.0, 7, 3)
    assert limits_of(build_parser().parse_args(["serve"])) == ServerLimits()
    for flag, value in [("--upload-ttl", "0"), ("--upload-quota-mib", "nan"), ("--call-burst", "-1")]:
        out = offsite(capsys, "serve", "--state", world.owner, flag, value, code=2)
        assert f"({flag}) must be a positive number" in out["err"], out
