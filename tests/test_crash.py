"""Durability with a real server process: kill -9 in the middle of an upload and of a download, restart
on the same state, the client resumes and finishes; SIGTERM drains calls in flight and exits 0."""

from __future__ import annotations

import hashlib
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from world import ServerProcess, copy_state, free_port

from offsite.fileio import sha256_file
from offsite.prepare import PrepareOptions, prepare
from offsite.server import admin
from offsite.server.owner_state import OwnerState
from offsite.server.storage.base import SubmissionState
from offsite.wire import transport
from offsite.wire.v1 import offsite_pb2 as pb


@pytest.fixture
def state(world, tmp_path):
    """A private copy of the owner's state, without the CA key: `serve` must not need it."""
    path = copy_state(world, tmp_path / "owner")
    (path / "ca" / "ca.key").unlink()
    return path


@pytest.fixture
def served(state):
    server = ServerProcess(state, free_port()).start()
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()


def _restart_after(server: ServerProcess, delay: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), server.start()), daemon=True)
    t.start()
    return t


def _blobs_are_whole(state) -> None:
    """Every stored file hashes to its name; no temporary leftovers."""
    files = [p for p in (state / "blobs" / "sha256").rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert not p.name.startswith(".tmp-")
        assert sha256_file(p) == p.name


def test_kill_9_mid_upload_then_resume(world, state, served):
    with world.client("alice", served.port, chunk_bytes=2048) as c:
        before = c.submit("j1", world.adapter).submission
    assert before.state == pb.SUBMISSION_STATE_ACCEPTED

    channel, stub = world.stub("alice", served.port)
    seen: list[int] = []
    crash = {"at": None, "restart": None}
    total = sum(p.stat().st_size for p in world.adapter.iterdir() if p.is_file())

    def progress(description, size):
        def update(done):
            seen.append(done)
            time.sleep(0.01)
            if crash["at"] is None and done > size * 0.3:
                pending = list((world.clients["alice"] / "submissions" / "pending").glob("*.json"))
                sid = __import__("json").loads(pending[0].read_text())["submission_id"]
                committed = stub.QueryWriteStatus(
                    pb.QueryWriteStatusRequest(submission_id=sid)
                ).committed_size
                if committed > 0:  # something is durable: now the crash
                    crash["at"] = (done, committed)
                    served.kill()
                    crash["restart"] = _restart_after(served, 1.0)

        return update

    with world.client("alice", served.port, chunk_bytes=2048, retry_budget=60) as c:
        result = c.submit("j1", world.adapter, progress=progress)
    channel.close()
    assert crash["at"] is not None, "the server was never killed"
    crash["restart"].join()
    assert result.submission.state == pb.SUBMISSION_STATE_ACCEPTED, result.submission.reason
    # the client resumed from what the server had durably committed, not from zero
    killed_at, committed = crash["at"]
    resumed_from = seen[seen.index(killed_at) + 1 :]
    assert any(0 < v <= killed_at for v in resumed_from), seen
    assert seen[-1] == total
    with world.client("alice", served.port) as c:
        assert (
            c.status(before.submission_id).state == pb.SUBMISSION_STATE_ACCEPTED
        )  # nothing accepted was lost
    served.stop()
    with OwnerState(state) as s:
        record = s.storage.get_submission(result.submission.submission_id)
        stored = {f.name: s.blobs.path(f.sha256) for f in record.files}
        for name, path in stored.items():
            assert path.read_bytes() == (world.adapter / name).read_bytes()
        # the decided submissions' partial files are gone (the copied state may hold other tests' open uploads)
        assert {before.submission_id, result.submission.submission_id}.isdisjoint(s.uploads.present())
    _blobs_are_whole(state)


@pytest.fixture(scope="module")
def big_job(world, tmp_path_factory):
    """A bundle with an emulator of ~9 MB (several 1 MiB chunks), published to alice as job `big`."""
    from tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("big")
    model = make_tiny_checkpoint(root / "model", "gpt2", layers=4, hidden=256)
    bundle = root / "bundle"
    prepare(model, bundle, PrepareOptions(adapter_bottom=1, adapter_top=1))
    return bundle


def test_kill_9_mid_download_then_resume(world, state, big_job, tmp_path):
    with OwnerState(state) as s:
        admin.publish(s, big_job, job_id="big", clients=["alice"], max_epsilon=10, max_delta=1e-3)
    served = ServerProcess(state, free_port()).start()
    crash = {"restart": None}
    seen: dict[str, list[int]] = {}
    try:

        def progress(name, size):
            seen[name] = []

            def update(done):
                seen[name].append(done)
                if name == "emulator/model.safetensors" and crash["restart"] is None and len(seen[name]) == 3:
                    served.kill()
                    crash["restart"] = _restart_after(served, 1.0)
                time.sleep(0.05)

            return update

        retries: list[tuple[str, float]] = []
        on_retry = lambda message, delay: retries.append((message, delay))  # noqa: E731
        with world.client("alice", served.port, retry_budget=60, on_retry=on_retry) as c:
            bundle = c.fetch("big", tmp_path / "fetched", progress=progress)
        assert crash["restart"] is not None
        crash["restart"].join()
        # the client met the dead server (UNAVAILABLE) and waited, with growing bounds, until it was back
        assert retries and all(m.startswith("UNAVAILABLE") for m, _ in retries), retries
        bounds = [min(transport.RETRY_MAX_S, transport.RETRY_INITIAL_S * 2**i) for i in range(len(retries))]
        assert all(0 <= d <= b for (_, d), b in zip(retries, bounds, strict=True)), retries
        emulator = seen["emulator/model.safetensors"]
        assert len(emulator) > 3 and emulator == sorted(emulator)  # resumed at the offset held: nothing twice
        for rel, digest in bundle.manifest["files"].items():
            assert sha256_file(tmp_path / "fetched" / rel) == digest
        assert (tmp_path / "fetched" / "emulator" / "model.safetensors").read_bytes() == (
            big_job / "emulator" / "model.safetensors"
        ).read_bytes()
    finally:
        if served.proc.poll() is None:
            served.stop()
    _blobs_are_whole(state)


def test_an_interrupted_fetch_continues_on_the_next_run(world, state, served, big_job, tmp_path):
    with OwnerState(state) as s:  # published while the server runs: it reads the same database
        admin.publish(s, big_job, job_id="big", clients=["alice"], max_epsilon=10, max_delta=1e-3)
    rel = "emulator/model.safetensors"

    class Stop(Exception):
        pass

    def interrupting(name, size):
        def update(done):
            if name == rel and done >= 2 * transport.CHUNK_BYTES:
                raise Stop

        return update

    with world.client("alice", served.port, retry_budget=5) as c, pytest.raises(Stop):
        c.fetch("big", tmp_path / "fetched", progress=interrupting)
    stage = tmp_path / ".fetched.fetch" / "bundle"
    kept = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
    assert rel + ".part" in kept and len(kept) > 1  # earlier files and a partial one
    held = (stage / (rel + ".part")).stat().st_size
    assert held >= 2 * transport.CHUNK_BYTES  # every chunk received before the interruption was kept
    seen: dict[str, list[int]] = {}

    def recording(name, size):
        seen[name] = []
        return seen[name].append

    with world.client("alice", served.port) as c:
        c.fetch("big", tmp_path / "fetched", progress=recording)
    done_before = [f for f in kept if not f.endswith(".part")]
    assert done_before and not set(done_before) & set(seen)  # complete files were kept, not fetched again
    assert held < seen[rel][0] <= held + transport.CHUNK_BYTES  # the partial file continued at its end
    assert (tmp_path / "fetched" / rel).read_bytes() == (big_job / rel).read_bytes()
    assert not (tmp_path / ".fetched.fetch").exists()


def test_backoff_waits_within_growing_bounds_and_gives_up_after_its_budget():
    """Against a port where nothing listens: a real UNAVAILABLE."""
    from offsite.client.connection import Backoff, ServerError

    channel = grpc.insecure_channel(f"127.0.0.1:{free_port()}")
    with pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    channel.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    delays: list[float] = []
    backoff = Backoff(budget=1.0, on_retry=lambda message, delay: delays.append(delay))
    started = time.monotonic()
    with pytest.raises(ServerError, match="UNAVAILABLE|unavailable"):
        while True:
            backoff.wait(info.value)
    assert time.monotonic() - started >= 1.0 and len(delays) >= 2
    bounds = [min(transport.RETRY_MAX_S, transport.RETRY_INITIAL_S * 2**i) for i in range(len(delays))]
    assert all(0 <= d <= b for d, b in zip(delays, bounds, strict=True))
    backoff.progress()  # progress starts the count and the budget again
    backoff.wait(info.value)
    assert delays[-1] <= transport.RETRY_INITIAL_S


def test_sigterm_drains_calls_in_flight_and_exits_cleanly(world, served):
    outcome = {}

    def slow_submit():
        def progress(name, size):
            return lambda done: time.sleep(0.03)

        with world.client("alice", served.port, chunk_bytes=4096, retry_budget=5) as c:
            try:
                outcome["state"] = c.submit("j1", world.adapter, progress=progress).submission.state
            except Exception as e:  # noqa: BLE001
                outcome["error"] = e

    t = threading.Thread(target=slow_submit)
    t.start()
    time.sleep(1.0)
    served.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    t.join(timeout=60)
    code = served.proc.wait(timeout=60)
    assert outcome.get("state") == pb.SUBMISSION_STATE_ACCEPTED, outcome
    assert code == 0 and time.monotonic() - started < 30
    assert any("draining" in line for line in served.output)
    channel = grpc.insecure_channel(f"127.0.0.1:{served.port}")
    with pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # stopped: nothing listens any more


def test_insecure_loopback_serves_health_only_and_only_on_loopback(state):
    from offsite.errors import OffsiteError
    from offsite.server.app import OffsiteServer
    from offsite.wire.v1 import offsite_pb2_grpc

    for host in ("0.0.0.0", "192.0.2.1", "example.org"):
        with pytest.raises(OffsiteError, match="loopback only"):
            OffsiteServer(state, host, 0, insecure_loopback=True)
    server = OffsiteServer(state, "127.0.0.1", 0, insecure_loopback=True)
    port = server.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            offsite_pb2_grpc.OffsiteServiceStub(channel).ListJobs(pb.ListJobsRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        channel.close()
    finally:
        server.stop(grace=1)


def _received(world, s):
    """alice's adapter uploaded in full through the service (no server) and marked received."""
    from offsite.formats import submission as envelope_format
    from offsite.server.auth import Caller
    from offsite.server.service import OffsiteService, WriteMessage

    service = OffsiteService(s)
    creds = world.credentials("alice")
    files = envelope_format.files_of(world.adapter)
    envelope = envelope_format.make_envelope("j1", "alice", files)
    caller = Caller("alice", "pin", creds.signing_key.public_key())
    record = service.begin_submission(
        caller, envelope, envelope_format.sign_envelope(envelope, creds.signing_key)
    )
    data = b"".join((world.adapter / f["name"]).read_bytes() for f in files)

    class _Call:
        pass

    call = _Call()
    call.caller = caller
    committed, decided = service.write_submission(
        call, iter([WriteMessage(record.submission_id, 0, data, hashlib.sha256(data).hexdigest(), False)])
    )
    assert committed == len(data) and decided is None
    s.storage.mark_received(record.submission_id)
    return service, record


def test_a_decision_undone_by_ledger_conflicts_is_made_again_on_the_same_files(world, state, monkeypatch):
    """Every attempt to commit loses to a concurrent ledger change: the submission stays received with its
    files whole, and the next decision (the client's retry, or the next start) accepts it."""
    from offsite.server.errors import LedgerConflictError

    with OwnerState(state) as s:
        service, record = _received(world, s)
        real_decide = s.storage.decide

        def conflicting(*args, **kwargs):
            raise LedgerConflictError("the ledger moved on (test)")

        monkeypatch.setattr(s.storage, "decide", conflicting)
        with pytest.raises(LedgerConflictError):
            service.decide(record.submission_id)
        assert s.storage.get_submission(record.submission_id).state == SubmissionState.RECEIVED
        monkeypatch.setattr(s.storage, "decide", real_decide)
        assert service.decide(record.submission_id).state == SubmissionState.ACCEPTED
        assert record.submission_id not in s.uploads.present()


def test_received_submission_is_decided_after_a_crash(world, state):
    """A crash after every byte was durable but before the checks ran: the restart decides it."""
    with OwnerState(state) as s:
        _, record = _received(world, s)  # ... and the process dies before deciding
    from offsite.server.app import OffsiteServer

    server = OffsiteServer(state, "127.0.0.1", 0)
    server.start()  # recovery runs before the first call is served
    server.stop(grace=1)
    with OwnerState(state) as s:
        assert s.storage.get_submission(record.submission_id).state == SubmissionState.ACCEPTED
        assert record.submission_id not in s.uploads.present()


def test_a_stored_chunk_that_rots_after_it_was_served_is_refused(world, state, big_job, tmp_path):
    """The server hashes a stored file's chunks once and reuses the hashes: bytes that change on its disk
    afterwards go out with the hash of the bytes they had, and the client refuses that chunk and keeps
    every checked byte before it."""
    from offsite.errors import IntegrityError
    from offsite.server.app import OffsiteServer

    rel = "emulator/model.safetensors"
    original = (big_job / rel).read_bytes()
    assert len(original) > 3 * transport.CHUNK_BYTES
    with OwnerState(state) as s:
        admin.publish(s, big_job, job_id="big", clients=["alice"], max_epsilon=10, max_delta=1e-3)
        blob = s.blobs.path(sha256_file(big_job / rel))
    server = OffsiteServer(state, "127.0.0.1", 0)
    port = server.start()
    try:
        with world.client("alice", port) as c:
            c.fetch("big", tmp_path / "first")
        bad_at = 2 * transport.CHUNK_BYTES + 5
        blob.chmod(0o600)
        with open(blob, "r+b") as f:  # bit rot: same size, one byte changed in the third chunk
            f.seek(bad_at)
            f.write(bytes([original[bad_at] ^ 0xFF]))
        with (
            world.client("alice", port) as c,
            pytest.raises(IntegrityError, match="does not match its sha256"),
        ):
            c.fetch("big", tmp_path / "second")
        part = tmp_path / ".second.fetch" / "bundle" / (rel + ".part")
        assert part.read_bytes() == original[: 2 * transport.CHUNK_BYTES]
    finally:
        server.stop(grace=1)


def test_sigterm_cancels_calls_still_running_at_the_drain_deadline(world, state):
    """A call that would outlive the drain (here an upload stream that stalls) is cancelled when
    --drain-seconds have passed, and the server still exits 0, long before the stream's own stall timeout."""
    from offsite.formats import submission as envelope_format

    served = ServerProcess(state, free_port(), "--drain-seconds", "1").start()
    try:
        channel, stub = world.stub("alice", served.port)
        creds = world.credentials("alice")
        files = envelope_format.files_of(world.adapter)
        envelope = envelope_format.make_envelope("j1", "alice", files)
        sid = stub.BeginSubmission(
            pb.BeginSubmissionRequest(
                envelope=envelope, signature=envelope_format.sign_envelope(envelope, creds.signing_key)
            ),
            timeout=30,
        ).submission_id
        release, sent = threading.Event(), threading.Event()

        def stalling():
            data = b"x" * 100
            yield pb.WriteSubmissionRequest(
                submission_id=sid, offset=0, data=data, sha256=hashlib.sha256(data).hexdigest()
            )
            sent.set()
            release.wait(120)  # then nothing more: the stream stays open, idle

        outcome = {}

        def upload():
            try:
                stub.WriteSubmission(stalling(), timeout=120)
            except grpc.RpcError as e:
                outcome["code"] = e.code()

        t = threading.Thread(target=upload)
        t.start()
        assert sent.wait(30)
        time.sleep(0.5)  # the server is in the call
        served.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = served.proc.wait(timeout=60)
        took = time.monotonic() - started
        t.join(timeout=30)
        release.set()
        channel.close()
        assert code == 0
        assert 1 <= took < transport.STALL_TIMEOUT_S / 2, took  # waited for the drain, not for the stall
        assert outcome.get("code") in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), outcome
        assert any("draining: calls in flight have 1.0 s" in line for line in served.output)
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait()
