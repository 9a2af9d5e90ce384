"""What one data owner may hold of a running server (real mutual TLS on loopback, each test on a copy of
the owner's state with short limits): abandoned uploads expire and the client starts afresh; open uploads
and their bytes are capped per client; calls are rate-limited per client, and so are calls open at once;
the per-submission locks do not outlive their use."""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from contextlib import contextmanager

import grpc
import pytest
from test_service import begin, messages, payload, refused, write
from world import copy_state

from offsite.cli.main import main
from offsite.errors import OffsiteError
from offsite.formats import submission as envelope_format
from offsite.server.app import OffsiteServer
from offsite.server.limits import RateLimiter, ServerLimits
from offsite.server.locks import KeyedLocks
from offsite.server.owner_state import OwnerState
from offsite.server.storage.base import DeclaredFile, SubmissionRecord, SubmissionState, utc_at
from offsite.wire.v1 import offsite_pb2 as pb

Code = grpc.StatusCode


@contextmanager
def serving(world, tmp_path, **limits):
    state = copy_state(world, tmp_path / "owner")
    server = OffsiteServer(state, "127.0.0.1", 0, limits=ServerLimits(**limits))
    port = server.start()
    channels = []

    def stub(client="alice"):
        channel, s = world.stub(client, port)
        channels.append(channel)
        return s

    try:
        yield server, port, stub
    finally:
        for channel in channels:
            channel.close()
        server.stop(grace=1)


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


# ----------------------------------------------------------------------------------------------- expiry


def test_an_abandoned_upload_expires_and_a_rerun_of_submit_starts_afresh(world, tmp_path, capsys):
    with serving(world, tmp_path, upload_ttl_s=2.0) as (server, port, stub):
        alice = stub()
        data = payload(world.adapter)
        sid = begin(world, alice, world.adapter).submission_id
        assert write(alice, messages(sid, data[:8192], finish=False)).committed_size == 8192
        partial = server.state.uploads.directory(sid)
        assert partial.is_dir()

        def state_of():
            return alice.GetSubmission(pb.GetSubmissionRequest(submission_id=sid)).state

        wait_for(lambda: state_of() == pb.SUBMISSION_STATE_EXPIRED)  # the janitor, every 0.5 s
        record = alice.GetSubmission(pb.GetSubmissionRequest(submission_id=sid))
        assert record.reason == "abandoned: no bytes for 2 s"
        assert not partial.exists()
        status = alice.QueryWriteStatus(pb.QueryWriteStatusRequest(submission_id=sid))
        assert (status.committed_size, status.complete) == (8192, True)
        refused(
            lambda: write(alice, messages(sid, data, start=8192)),
            Code.FAILED_PRECONDITION,
            f"submission {sid} expired: abandoned: no bytes for 2 s",
            "Start a fresh upload",
        )
        # The owner sees it as expired, and no longer among the open ones.
        for only, present in (("expired", True), ("uploading", False)):
            capsys.readouterr()
            assert (
                main(
                    [
                        "owner",
                        "submissions",
                        "--state",
                        str(server.state.paths.root),
                        "--only",
                        only,
                        "--json",
                    ]
                )
                == 0
            )
            listed = {r["submission_id"]: r for r in json.loads(capsys.readouterr().out)["submissions"]}
            assert (sid in listed) == present
            if present:
                assert (listed[sid]["state"], listed[sid]["reason"]) == (
                    "expired",
                    "abandoned: no bytes for 2 s",
                )

        # The data owner reruns `submit` on the interrupted upload: the session is gone, so the same
        # files go up in a fresh one and are accepted.
        with world.client("alice", port) as c:
            files = envelope_format.files_of(world.adapter)
            pending = c._pending_path("j1", files)
            pending.parent.mkdir(parents=True, exist_ok=True)
            pending.write_text(
                json.dumps({"submission_id": sid, "job_id": "j1", "adapter": str(world.adapter)})
            )
            result = c.submit("j1", world.adapter)
        assert result.submission.state == pb.SUBMISSION_STATE_ACCEPTED
        assert result.submission.submission_id != sid
        assert (result.replaced_expired, result.resumed) == (sid, False)
        assert not pending.exists()
        remembered = json.loads((world.clients["alice"] / "submissions" / f"{sid}.json").read_text())
        assert remembered["state"] == "expired"

        # Nothing in the lock tables outlives its submission (a plain dict kept one lock per submission).
        assert len(server.service._locks) == 0 and len(server.service._budget_locks) == 0
        janitor = server.janitor
    assert not janitor.running  # stopped with the server


def test_uploads_abandoned_before_a_restart_expire_when_the_server_starts(world, tmp_path):
    state = copy_state(world, tmp_path / "owner")
    old = utc_at(time.time() - 25 * 3600)
    with OwnerState(state) as owner:
        record = SubmissionRecord(
            submission_id="a" * 32,
            client_id="alice",
            job_id="j1",
            bundle_id=world.bundle_id,
            state=SubmissionState.UPLOADING,
            files=(DeclaredFile("adapter.safetensors", 10, "0" * 64),),
            nonce="n" * 64,
            envelope=b"{}",
            envelope_signature=b"s",
            created_at=old,
        )
        owner.storage.add_submission(record)
        fresh = dataclasses.replace(
            record, submission_id="b" * 32, nonce="m" * 64, created_at=utc_at(time.time())
        )
        owner.storage.add_submission(fresh)
        for r in (record, fresh):
            owner.uploads.directory(r.submission_id).mkdir(parents=True)
    server = OffsiteServer(state, "127.0.0.1", 0)  # the default TTL, 24 h
    server.start()
    try:
        storage = server.service.storage
        assert storage.get_submission("a" * 32).state == SubmissionState.EXPIRED
        assert storage.get_submission("a" * 32).reason == "abandoned: no bytes for 24 h"
        assert not server.state.uploads.directory("a" * 32).exists()
        assert storage.get_submission("b" * 32).state == SubmissionState.UPLOADING
        assert server.state.uploads.directory("b" * 32).exists()
    finally:
        server.stop(grace=1)


# ----------------------------------------------------------------------------------------------- quotas


def test_open_uploads_per_client_are_capped_until_one_is_finished(world, tmp_path):
    with serving(world, tmp_path, max_open_uploads=2) as (_, port, stub):
        alice, bob = stub(), stub("bob")
        first = begin(world, alice, world.adapter).submission_id
        begin(world, alice, world.adapter)
        refused(
            lambda: begin(world, alice, world.adapter),
            Code.FAILED_PRECONDITION,
            "client alice has 2 open uploads, the most it may have",
            "finish your open uploads",
            "or let them expire (24 h after their last byte)",
        )
        begin(world, bob, world.adapter, client="bob", job="j2")  # a quota per client
        assert (
            write(alice, messages(first, payload(world.adapter))).submission.state
            == pb.SUBMISSION_STATE_ACCEPTED
        )
        begin(world, alice, world.adapter)  # one finished: room for one more
        # A final answer: the client does not retry it for two minutes, it says what to do at once.
        with world.client("alice", port, retry_budget=60) as c:
            started = time.monotonic()
            with pytest.raises(OffsiteError, match="FAILED_PRECONDITION"):
                c.submit("j1", world.adapter)
            assert time.monotonic() - started < 10


def test_bytes_held_in_open_uploads_are_capped_per_client(world, tmp_path):
    total = len(payload(world.adapter))
    with serving(world, tmp_path, upload_quota_bytes=total * 3 // 2) as (_, _port, stub):
        alice = stub()
        begin(world, alice, world.adapter)
        refused(
            lambda: begin(world, alice, world.adapter),
            Code.FAILED_PRECONDITION,
            f"open uploads declare {total} bytes; this one's {total} more would pass its quota of {total * 3 // 2}",
        )
    with serving(world, tmp_path / "small", upload_quota_bytes=total - 1) as (_, _port, stub):
        refused(
            lambda: begin(world, stub(), world.adapter),
            Code.FAILED_PRECONDITION,
            f"this submission declares {total} bytes, more than the {total - 1}",
            "--upload-quota-mib",
        )


# ------------------------------------------------------------------------------------------ call limits


def test_calls_over_the_rate_are_refused_per_client_and_the_client_backs_off(world, tmp_path):
    with serving(world, tmp_path, calls_per_second=2, call_burst=3) as (_, port, stub):
        alice, bob = stub(), stub("bob")
        outcomes = []
        for _ in range(6):
            try:
                alice.ListJobs(pb.ListJobsRequest(), timeout=10)
                outcomes.append("ok")
            except grpc.RpcError as e:
                assert e.code() == Code.RESOURCE_EXHAUSTED, e.details()
                assert "client alice is over 2 calls a second (burst 3): retry in" in e.details()
                outcomes.append("refused")
        assert outcomes[:3] == ["ok"] * 3 and "refused" in outcomes[3:], outcomes
        bob.ListJobs(pb.ListJobsRequest(), timeout=10)  # a bucket per client
        retries = []
        with world.client("alice", port, on_retry=lambda why, delay: retries.append(why)) as c:
            for _ in range(4):  # the client's backoff waits for tokens; every call gets through
                assert any(j.job_id == "j1" for j in c.list_jobs())
        assert retries and all(r.startswith("RESOURCE_EXHAUSTED") for r in retries)


def test_a_client_cannot_hold_more_than_its_share_of_open_calls(world, tmp_path):
    with serving(world, tmp_path, max_calls_per_client=1) as (server, _port, stub):
        alice, bob = stub(), stub("bob")
        data = payload(world.adapter)
        sid = begin(world, alice, world.adapter).submission_id
        feed: queue.Queue = queue.Queue()

        def held_open():
            yield from messages(sid, data[:8192], finish=False)
            while (m := feed.get()) is not None:
                yield m

        outcome = {}
        t = threading.Thread(target=lambda: outcome.update(r=write(alice, held_open())))
        t.start()
        try:
            # Probe only once the stream holds alice's one slot: a probe sent earlier could take the slot
            # first and get the stream itself refused.
            wait_for(lambda: server.registry.open_calls() == 1)
            wait_for(lambda: _refused_as_busy(alice))
            refused(
                lambda: alice.ListJobs(pb.ListJobsRequest(), timeout=10),
                Code.RESOURCE_EXHAUSTED,
                "client alice has 1 calls open, the most it may have at once",
            )
            bob.ListJobs(pb.ListJobsRequest(), timeout=10)  # others are served
        finally:
            feed.put(None)
            t.join(timeout=30)
        assert outcome["r"].committed_size == 8192
        alice.ListJobs(pb.ListJobsRequest(), timeout=10)  # the slot is free again


def _refused_as_busy(stub) -> bool:
    try:
        stub.ListJobs(pb.ListJobsRequest(), timeout=10)
        return False
    except grpc.RpcError as e:
        return e.code() == Code.RESOURCE_EXHAUSTED


# ------------------------------------------------------------------------------------- unit: the parts


def test_token_bucket_allows_a_burst_then_the_rate():
    now = [100.0]
    bucket = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("a") == pytest.approx(0.5)  # one token comes in half a second
    assert bucket.take("b") == 0.0  # another client's bucket is full
    now[0] += 0.5
    assert bucket.take("a") == 0.0 and bucket.take("a") > 0
    now[0] += 3600
    assert [bucket.take("a") for _ in range(4)][-1] > 0  # idle time saves at most the burst


def test_keyed_locks_exclude_and_are_forgotten_when_unused():
    locks = KeyedLocks()
    inside = threading.Event()
    release = threading.Event()

    def holder():
        with locks.hold("s1") as held:
            assert held
            inside.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(10)
    with locks.hold("s1", timeout=0) as held:
        assert not held
    with locks.hold("s1", timeout=0.05) as held:
        assert not held
    with locks.hold("s2", timeout=0) as held:
        assert held and len(locks) == 2
    release.set()
    t.join(10)
    assert len(locks) == 0
    for i in range(1000):
        with locks.hold(f"sub{i}"):
            pass
    assert len(locks) == 0


@pytest.mark.parametrize(
    "field",
    [
        "upload_ttl_s",
        "max_open_uploads",
        "upload_quota_bytes",
        "calls_per_second",
        "call_burst",
        "max_calls_per_client",
    ],
)
@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf")])
def test_limits_refuse_nonsense(field, value):
    with pytest.raises(OffsiteError, match="must be a positive number"):
        ServerLimits(**{field: value})
