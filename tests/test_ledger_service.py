"""Grants enforced by a running server (real mutual TLS on loopback, real SQLite): across several
submissions, across a restart, and under concurrent uploads to two servers sharing one state; the
checkpoints and budget answers data owners get back; and the audit of what the server recorded.

Receipts are built for the world's DP adapter with histories chosen here (signed by alice's enrolled
key, exactly as `client train` would sign them), so no extra training runs."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import grpc
import pytest
from ledger_kit import BUCKET, DELTA, NOMINAL, Q
from world import copy_state

from offsite import crypto
from offsite.client.connection import ServerError
from offsite.client.transfers import OffsiteClient
from offsite.fileio import sha256_file
from offsite.formats import ledger as fmt
from offsite.privacy import ledger_budget
from offsite.privacy.accounting import make_entry
from offsite.privacy.ledger_audit import audit_ledger
from offsite.privacy.receipt import build_receipt, first_run_budget, write_receipt
from offsite.server import admin
from offsite.server.app import OffsiteServer
from offsite.server.owner_state import OwnerState
from offsite.wire.v1 import offsite_pb2 as pb

Code = grpc.StatusCode


def adapter_with(world, dest: Path, dataset: str, runs: list[tuple[str, float, int]]) -> Path:
    """The world's adapter with a receipt over ``runs`` (run id, σ, steps at q = 16/128; the last is this
    run's) for ``dataset``, signed by alice's enrolled receipt key."""
    dest.mkdir(parents=True)
    for name in ("adapter.safetensors", "adapter.json"):
        shutil.copyfile(world.adapter / name, dest / name)
    key = world.credentials("alice").signing_key
    this = runs[-1][0]
    receipt = build_receipt(
        run_history=[make_entry(s, Q, n) for r, s, n in runs if r == this],
        cumulative_history=[{"run_id": r, **make_entry(s, Q, n)} for r, s, n in runs],
        delta=DELTA,
        max_grad_norm=1.0,
        size_bucket=BUCKET,
        nominal_batch=NOMINAL,
        budget=first_run_budget(20.0, DELTA),
        dataset_id=dataset,
        dataset_fingerprint="f" * 64,
        adapter_sha256=sha256_file(dest / "adapter.safetensors"),
        bundle_id=world.bundle_id,
        signer_public_key=key.public_key(),
        run_id=this,
    )
    write_receipt(dest, receipt, key)
    return dest


def composed(runs) -> float:
    return ledger_budget.spent([{"run_id": r, **make_entry(s, Q, n)} for r, s, n in runs], DELTA)


class Served:
    def __init__(self, state: Path):
        self.state = state
        self.server = OffsiteServer(state, "127.0.0.1", 0)
        self.port = self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=1)


def client(world, keys: Path, port: int) -> OffsiteClient:
    """alice's credentials, with her checkpoints and open uploads kept in ``keys`` (this test's own)."""
    keys.mkdir(exist_ok=True)
    return OffsiteClient(world.credentials("alice"), keys, f"127.0.0.1:{port}", retry_budget=20)


def refused(c: OffsiteClient, adapter: Path, *needles: str) -> pb.Submission:
    with pytest.raises(ServerError) as info:
        c.submit("j1", adapter)
    assert info.value.code == Code.FAILED_PRECONDITION, info.value.details
    for needle in needles:
        assert needle in info.value.details
    records = [s for s in c.keys_dir.joinpath("submissions").glob("*.json")]
    decided = [json.loads(p.read_text()) for p in records]
    assert any(d["state"] == "rejected" and needles[0] in d["reason"] for d in decided)
    return info.value


A, B, C, D = ("run-a", 1.0, 8), ("run-b", 1.0, 8), ("run-c", 1.0, 8), ("run-d", 3.0, 8)


def test_grants_hold_across_submissions_and_a_restart(world, tmp_path):
    state = copy_state(world, tmp_path / "owner")
    with OwnerState(state) as s:
        admin.grant(s, "alice", "svc", epsilon=3.5, delta=DELTA)
    keys = tmp_path / "alice"
    served = Served(state)
    try:
        with client(world, keys, served.port) as c:
            first = c.submit("j1", adapter_with(world, tmp_path / "r1", "svc", [A]))
            assert first.submission.state == pb.SUBMISSION_STATE_ACCEPTED, first.submission.reason
            second = c.submit("j1", adapter_with(world, tmp_path / "r2", "svc", [A, B]))
            assert second.submission.state == pb.SUBMISSION_STATE_ACCEPTED, second.submission.reason
            # each acceptance came with the owner's signed checkpoint of its entry, verified and kept
            for result in (first, second):
                checkpoint = fmt.parse_checkpoint(result.checkpoint.read_bytes())
                fmt.verify_document(checkpoint, world.credentials("alice").owner_key, "checkpoint")
                assert result.checkpoint.read_bytes() == result.submission.ledger_checkpoint
            assert fmt.parse_checkpoint(second.checkpoint.read_bytes()).index == (
                fmt.parse_checkpoint(first.checkpoint.read_bytes()).index + 1
            )
            # a third run would compose past the grant; a receipt that leaves out run A; a dataset without grant
            refused(c, adapter_with(world, tmp_path / "r3", "svc", [A, B, C]), "exceed the grant", "3.5")
            refused(c, adapter_with(world, tmp_path / "r4", "svc", [B, D]), "omits run run-a")
            refused(c, adapter_with(world, tmp_path / "r5", "other", [D]), "no budget is granted")
        served.stop()
        served = Served(state)  # the ledger, not the process, holds the budget
        with client(world, keys, served.port) as c:
            refused(c, adapter_with(world, tmp_path / "r3b", "svc", [A, B, C]), "exceed the grant")
            again = c.submit("j1", adapter_with(world, tmp_path / "r2b", "svc", [A, B]))  # nothing new spent
            assert again.submission.state == pb.SUBMISSION_STATE_ACCEPTED
            response, kept, problem = c.budget("svc")
    finally:
        served.stop()
    [view] = response.datasets
    assert view.granted and (view.grant_epsilon, view.grant_delta) == (3.5, DELTA)
    assert view.accepted_submissions == 3 and {r.run_id for r in view.runs} == {"run-a", "run-b"}
    assert view.spent_epsilon == pytest.approx(composed([A, B]))  # composed, not 2.50 + 3.25
    assert view.remaining_epsilon == pytest.approx(3.5 - view.spent_epsilon)
    assert kept is not None and not problem
    with OwnerState(state) as s:
        assert [r.state.value for r in s.storage.list_submissions()].count("rejected") == 4
        pub = s.ledger.key.public_key()
    report = audit_ledger(state, owner_pubkey=pub, checkpoints=keys / "checkpoints")
    assert report.ok, report.to_dict()["checks"]
    # three acceptances (the budget answer's checkpoint of the head is the last one's)
    assert report.checkpoints_checked == 3 and report.clients["alice"].datasets["svc"].accepted == 3


def test_concurrent_uploads_to_two_servers_never_exceed_the_grant(world, tmp_path):
    """Four receipts that each fit the grant with the run already recorded, but no two of them together,
    uploaded at once to two servers on one state: exactly one is accepted, the composed total stays
    within the grant (each decision commits only if no budget entry of the dataset was appended since it
    read the ledger; the losers are decided again and refused)."""
    state = copy_state(world, tmp_path / "owner")
    with OwnerState(state) as s:
        admin.grant(s, "alice", "conc", epsilon=3.3, delta=DELTA)
    servers = [Served(state), Served(state)]
    try:
        with client(world, tmp_path / "k0", servers[0].port) as c:
            assert c.submit("j1", adapter_with(world, tmp_path / "base", "conc", [A])).submission.state == (
                pb.SUBMISSION_STATE_ACCEPTED
            )
        runs = [(f"run-x{i}", 1.0, 8) for i in range(4)]
        assert composed([A, runs[0]]) <= 3.3 < composed([A, *runs[:2]])
        adapters = [adapter_with(world, tmp_path / f"c{i}", "conc", [A, run]) for i, run in enumerate(runs)]
        barrier, outcomes = threading.Barrier(len(adapters)), {}

        def upload(i: int) -> None:
            with client(world, tmp_path / f"k{i + 1}", servers[i % 2].port) as c:
                barrier.wait()
                try:
                    outcomes[i] = c.submit("j1", adapters[i]).submission.state
                except ServerError as e:
                    outcomes[i] = e.code

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(adapters))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        with client(world, tmp_path / "k0", servers[1].port) as c:
            [view] = c.budget("conc")[0].datasets
    finally:
        for s in servers:
            s.stop()
    assert sorted(outcomes.values(), key=str).count(pb.SUBMISSION_STATE_ACCEPTED) == 1, outcomes
    assert all(v in (pb.SUBMISSION_STATE_ACCEPTED, Code.FAILED_PRECONDITION) for v in outcomes.values())
    assert view.accepted_submissions == 2 and view.spent_epsilon <= 3.3
    with OwnerState(state) as s:
        pub = s.ledger.key.public_key()
    report = audit_ledger(state, owner_pubkey=pub)
    assert report.ok and report.clients["alice"].datasets["conc"].spent <= 3.3


def test_a_non_private_adapter_is_recorded_without_a_budget(world, tmp_path):
    state = copy_state(world, tmp_path / "owner")
    dest = tmp_path / "plain"
    dest.mkdir()
    for name in ("adapter.safetensors", "adapter.json"):
        shutil.copyfile(world.adapter / name, dest / name)
    served = Served(state)
    try:
        with client(world, tmp_path / "alice", served.port) as c:
            result = c.submit("open", dest)
    finally:
        served.stop()
    assert result.submission.state == pb.SUBMISSION_STATE_ACCEPTED and result.checkpoint is not None
    with OwnerState(state) as s:
        last = fmt.parse_entry(s.storage.ledger_rows()[-1].entry).record
        pub = s.ledger.key.public_key()
    assert last.kind == "submission" and last.receipt is None and last.spent is None
    report = audit_ledger(state, owner_pubkey=pub, checkpoints=tmp_path / "alice" / "checkpoints")
    assert report.ok and report.clients["alice"].non_private == 1
    assert crypto.public_key_fingerprint(pub) == report.owner_key_fingerprint


def test_the_server_needs_the_signing_key(world, tmp_path):
    """Every acceptance is a signed ledger entry: without the owner's signing key the server refuses to start
    (the CA key may stay offline, this one may not)."""
    from offsite.errors import OffsiteError

    state = copy_state(world, tmp_path / "owner")
    (state / "signing" / "owner_signing_key.pem").unlink()
    server = OffsiteServer(state, "127.0.0.1", 0)
    try:
        with pytest.raises(OffsiteError, match="no signing key"):
            server.start()
    finally:
        server.state.close()
