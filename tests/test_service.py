"""The owner's server, running, over real mutual TLS on loopback; every bad input gets its own status
code and message, and the server keeps serving (checked after every test)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from safetensors.torch import load_file, save_file

from offsite import crypto, pki
from offsite.client.connection import ServerError
from offsite.errors import OffsiteError
from offsite.fileio import canonical_json, sha256_bytes, sha256_file
from offsite.formats import signing
from offsite.formats import submission as envelope_format
from offsite.server import admin
from offsite.server.app import OffsiteServer
from offsite.server.limits import ServerLimits
from offsite.server.owner_state import OwnerState
from offsite.server.service import OffsiteService
from offsite.server.storage.base import SubmissionState
from offsite.wire.v1 import offsite_pb2 as pb

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def server(world):
    # Many tests here leave alice's uploads open on purpose (truncated, refused mid-stream) and make
    # calls as fast as they can with bare stubs, which do not back off: the per-client limits are
    # tested in test_service_limits.py.
    limits = ServerLimits(max_open_uploads=1000, calls_per_second=1000, call_burst=1000)
    s = OffsiteServer(world.owner, "127.0.0.1", 0, limits=limits)
    port = s.start()
    yield port
    s.stop(grace=1)
    # The uploads left open would count against alice's quota in every later copy of the shared state.
    with OwnerState(world.owner) as state:
        OffsiteService(state, limits=ServerLimits(upload_ttl_s=1e-6)).expire_abandoned()


@pytest.fixture(autouse=True)
def still_serving(request, world):
    """After every test that used the server, it still answers a real call."""
    yield
    if "server" in request.fixturenames:
        port = request.getfixturevalue("server")
        with world.client("alice", port) as c:
            assert any(j.job_id == "j1" for j in c.list_jobs())


@pytest.fixture
def stub(world, server):
    channel, s = world.stub("alice", server)
    yield s
    channel.close()


# ------------------------------------------------------------------------------------------ helpers


def adapter_copy(world, tmp_path: Path, name: str = "adapter") -> Path:
    dest = tmp_path / name
    shutil.copytree(world.adapter, dest)
    return dest


def rewrite_tensors(adapter: Path, tensors: dict) -> None:
    """Replace adapter.safetensors and keep adapter.json's hash in step (so the check reaches the tensors)."""
    save_file(tensors, str(adapter / "adapter.safetensors"))
    meta = json.loads((adapter / "adapter.json").read_text())
    meta["sha256"]["adapter.safetensors"] = sha256_file(adapter / "adapter.safetensors")
    (adapter / "adapter.json").write_bytes(canonical_json(meta))


def begin(
    world, stub, adapter: Path, *, client="alice", job="j1", now=None, key=None, signature=None, envelope=None
):
    files = envelope_format.files_of(adapter)
    envelope = (
        envelope if envelope is not None else envelope_format.make_envelope(job, client, files, now=now)
    )
    if signature is None:
        signing_key = key or world.credentials(client).signing_key
        signature = envelope_format.sign_envelope(envelope, signing_key)
    return stub.BeginSubmission(pb.BeginSubmissionRequest(envelope=envelope, signature=signature), timeout=10)


def payload(adapter: Path) -> bytes:
    return b"".join((adapter / f["name"]).read_bytes() for f in envelope_format.files_of(adapter))


def messages(submission_id: str, data: bytes, start: int = 0, chunk: int = 8192, finish: bool = True):
    out, offset, first = [], start, True
    while offset < len(data):
        piece = data[offset : offset + chunk]
        out.append(
            pb.WriteSubmissionRequest(
                submission_id=submission_id if first else "",
                offset=offset,
                data=piece,
                sha256=sha256_bytes(piece),
            )
        )
        first, offset = False, offset + len(piece)
    if finish:
        out.append(
            pb.WriteSubmissionRequest(
                submission_id=submission_id if first else "", offset=offset, finish_write=True
            )
        )
    return out


def write(stub, msgs):
    return stub.WriteSubmission(iter(msgs), timeout=60)


def refused(fn, code: Code, *needles: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == code, (info.value.code(), info.value.details())
    for needle in needles:
        assert needle in info.value.details(), info.value.details()
    return info.value


def upload_refused(world, stub, adapter: Path, code: Code, *needles: str, job: str = "j1") -> str:
    """Upload ``adapter`` whole; the decision must be a refusal with ``code``; return the submission id."""
    sid = begin(world, stub, adapter, job=job).submission_id
    refused(lambda: write(stub, messages(sid, payload(adapter))), code, *needles)
    return sid


def assert_rejected_and_gone(world, sid: str, *needles: str) -> None:
    with OwnerState(world.owner) as state:
        record = state.storage.get_submission(sid)
        assert record.state == SubmissionState.REJECTED
        for needle in needles:
            assert needle in record.reason
        assert str(world.owner) not in record.reason  # the server's own paths are never disclosed
        assert sid not in state.uploads.present()
        # its files reached the blob store only if the same bytes belong to an accepted submission
        accepted = {
            f.sha256
            for r in state.storage.list_submissions(
                states=[SubmissionState.ACCEPTED, SubmissionState.PLUGGED]
            )
            for f in r.files
        }
        assert not any(state.blobs.has(f.sha256) for f in record.files if f.sha256 not in accepted)
        with (
            pytest.raises(OffsiteError, match="only accepted submissions can be plugged"),
            admin.accepted_adapter(state, sid, world.root),
        ):
            pass


# ------------------------------------------------------------------------------------------ the good path


def test_health_and_reflection_over_mutual_tls(world, server):
    channel, _ = world.stub("alice", server)
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "offsite.v1.OffsiteService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert {"offsite.v1.OffsiteService", "grpc.health.v1.Health"} <= names


def test_a_second_server_on_the_same_port_is_refused(world, server):
    with pytest.raises(OffsiteError, match="cannot listen on 127.0.0.1"):
        OffsiteServer(world.owner, "127.0.0.1", server).start()


def test_jobs_are_the_callers_own_with_signed_manifests(world, server):
    with world.client("alice", server) as c:
        jobs = {j.job_id: j for j in c.list_jobs()}
        assert set(jobs) == {"j1", "strict", "open"}  # not bob's j2
        owner_key = world.credentials("alice").owner_key
        for job in jobs.values():
            signing.verify_manifest(job.manifest, job.manifest_signature, owner_key)
            assert sha256_bytes(job.manifest) == world.bundle_id
        assert jobs["strict"].policy.max_epsilon == 0.5 and not jobs["j1"].policy.allow_no_dp
    channel, stub = world.stub("alice", server)
    with channel:
        for token in ("-1", "x", "1" * 30):
            refused(
                lambda t=token: stub.ListJobs(pb.ListJobsRequest(page_token=t)),
                Code.INVALID_ARGUMENT,
                "page token",
            )
        assert len(stub.ListJobs(pb.ListJobsRequest(page_token="1")).jobs) == 2


def test_fetch_checks_signature_and_hashes_and_gets_every_file(world, server, tmp_path):
    with world.client("alice", server, chunk_bytes=4096) as c:
        bundle = c.fetch("j1", tmp_path / "fetched")
    assert bundle.id == world.bundle_id
    for rel in json.loads((world.bundle / "manifest.json").read_text())["files"]:
        assert (tmp_path / "fetched" / rel).read_bytes() == (world.bundle / rel).read_bytes()
    assert (tmp_path / "fetched" / "manifest.sig").is_file()
    assert not (tmp_path / ".fetched.fetch").exists()


def test_download_from_an_offset_and_past_the_end(world, stub):
    rel = "initial_adapter.safetensors"
    whole = (world.bundle / rel).read_bytes()
    chunks = list(
        stub.DownloadFile(pb.DownloadFileRequest(job_id="j1", path=rel, offset=len(whole) - 10), timeout=10)
    )
    assert b"".join(c.data for c in chunks) == whole[-10:] and chunks[0].offset == len(whole) - 10
    assert all(c.sha256 == sha256_bytes(c.data) and c.file_size == len(whole) for c in chunks)
    refused(
        lambda: list(stub.DownloadFile(pb.DownloadFileRequest(job_id="j1", path=rel, offset=len(whole) + 1))),
        Code.OUT_OF_RANGE,
        "past the end",
    )


def test_download_of_unknown_job_file_or_a_job_not_the_callers(stub):
    rel = "initial_adapter.safetensors"
    refused(
        lambda: list(stub.DownloadFile(pb.DownloadFileRequest(job_id="nope", path=rel))),
        Code.NOT_FOUND,
        "no job",
    )
    refused(
        lambda: list(stub.DownloadFile(pb.DownloadFileRequest(job_id="j2", path=rel))),
        Code.PERMISSION_DENIED,
        "not on job j2",
    )
    refused(
        lambda: list(stub.DownloadFile(pb.DownloadFileRequest(job_id="j1", path="../owner/ca/ca.key"))),
        Code.NOT_FOUND,
        "has no file",
    )


def test_a_good_submission_is_accepted_and_its_receipt_listed(world, server):
    with world.client("alice", server, chunk_bytes=16384) as c:
        result = c.submit("j1", world.adapter)
        assert result.submission.state == pb.SUBMISSION_STATE_ACCEPTED, result.submission.reason
        sid = result.submission.submission_id
        receipts = {r.submission_id: r for r in c.receipts("ds1")}
    receipt = receipts[sid]
    assert receipt.receipt == (world.adapter / "receipt.json").read_bytes()
    assert receipt.signature == (world.adapter / "receipt.sig").read_bytes()
    assert result.submission.dataset_id == "ds1" and 0 < result.submission.epsilon <= 8.01
    with OwnerState(world.owner) as state:
        record = state.storage.get_submission(sid)
        assert all(state.blobs.has(f.sha256) for f in record.files)
        assert sid not in state.uploads.present()
    remembered = json.loads((world.clients["alice"] / "submissions" / f"{sid}.json").read_text())
    assert remembered["state"] == "accepted"


def test_a_non_private_adapter_counts_only_where_the_job_allows_it(world, stub, tmp_path):
    adapter = adapter_copy(world, tmp_path)
    for name in envelope_format.RECEIPT_FILES:
        (adapter / name).unlink()
    sid = upload_refused(
        world, stub, adapter, Code.FAILED_PRECONDITION, "only adapters trained with differential privacy"
    )
    assert_rejected_and_gone(world, sid, "no privacy receipt")
    sid = begin(world, stub, adapter, job="open").submission_id
    response = write(stub, messages(sid, payload(adapter)))
    assert response.submission.state == pb.SUBMISSION_STATE_ACCEPTED and response.submission.dataset_id == ""


# ------------------------------------------------------------------------------------------ bad streams


def test_truncated_stream_keeps_what_arrived_and_resumes(world, stub):
    data = payload(world.adapter)
    sid = begin(world, stub, world.adapter).submission_id
    half = len(data) // 2
    response = write(stub, messages(sid, data[:half], finish=False))
    assert response.committed_size == half and not response.HasField("submission")
    status = stub.QueryWriteStatus(pb.QueryWriteStatusRequest(submission_id=sid))
    assert (status.committed_size, status.total_size, status.complete) == (half, len(data), False)
    refused(
        lambda: write(stub, [pb.WriteSubmissionRequest(submission_id=sid, offset=half, finish_write=True)]),
        Code.FAILED_PRECONDITION,
        f"after {half} of {len(data)} bytes",
    )
    response = write(stub, messages(sid, data, start=half))
    assert response.submission.state == pb.SUBMISSION_STATE_ACCEPTED


def test_chunk_whose_hash_does_not_match(world, stub):
    data = payload(world.adapter)
    sid = begin(world, stub, world.adapter).submission_id
    msgs = messages(sid, data)
    msgs[1].data = bytes([msgs[1].data[0] ^ 1]) + msgs[1].data[1:]
    refused(lambda: write(stub, msgs), Code.DATA_LOSS, "does not match its sha256")
    # the good chunk before it was kept
    assert stub.QueryWriteStatus(pb.QueryWriteStatusRequest(submission_id=sid)).committed_size == len(
        msgs[0].data
    )


def test_out_of_order_and_overlapping_offsets(world, stub):
    data = payload(world.adapter)
    sid = begin(world, stub, world.adapter).submission_id
    msgs = messages(sid, data)
    refused(lambda: write(stub, [msgs[0], msgs[2]]), Code.OUT_OF_RANGE, "a gap")
    committed = stub.QueryWriteStatus(pb.QueryWriteStatusRequest(submission_id=sid)).committed_size
    assert committed == len(msgs[0].data)
    overlap = messages(sid, data, start=committed - 100)
    refused(lambda: write(stub, overlap), Code.OUT_OF_RANGE, "overlapping")
    assert stub.QueryWriteStatus(pb.QueryWriteStatusRequest(submission_id=sid)).committed_size == committed


def test_upload_over_the_size_limit(world, stub, tmp_path):
    adapter = adapter_copy(world, tmp_path)
    with open(adapter / "adapter.safetensors", "ab") as f:
        f.write(b"\0" * (2 << 20))  # the job allows the tensors' bytes + 1 MiB
    refused(
        lambda: begin(world, stub, adapter),
        Code.OUT_OF_RANGE,
        "adapter.safetensors is",
        "accepts at most",
    )
    data = payload(world.adapter)
    sid = begin(world, stub, world.adapter).submission_id
    refused(lambda: write(stub, messages(sid, data + b"more", finish=False)), Code.OUT_OF_RANGE, "past the")


def test_the_client_gives_up_at_once_on_an_adapter_over_the_limit(world, server, tmp_path):
    """A size limit is final: the client reports it at once instead of retrying (as it does a full
    server) until its retry budget runs out."""
    adapter = adapter_copy(world, tmp_path)
    with open(adapter / "adapter.safetensors", "ab") as f:
        f.write(b"\0" * (2 << 20))
    retries = []
    with (
        world.client("alice", server, on_retry=lambda *a: retries.append(a)) as c,
        pytest.raises(ServerError, match="accepts at most") as info,
    ):
        c.submit("j1", adapter)
    assert info.value.code == Code.OUT_OF_RANGE
    assert retries == []


def test_random_bytes(world, stub, tmp_path):
    refused(
        lambda: stub.BeginSubmission(
            pb.BeginSubmissionRequest(envelope=os.urandom(300), signature=os.urandom(64))
        ),
        Code.INVALID_ARGUMENT,
        "submission envelope",
    )
    adapter = adapter_copy(world, tmp_path)
    (adapter / "adapter.safetensors").write_bytes(os.urandom(4096))
    meta = json.loads((adapter / "adapter.json").read_text())
    meta["sha256"]["adapter.safetensors"] = sha256_file(adapter / "adapter.safetensors")
    (adapter / "adapter.json").write_bytes(canonical_json(meta))
    sid = upload_refused(
        world, stub, adapter, Code.INVALID_ARGUMENT, "adapter.safetensors: not a safetensors file"
    )
    assert_rejected_and_gone(world, sid, "safetensors")


class _Trap:
    """Unpickling this writes a marker file: proof that a pickle was (or was never) loaded."""

    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled"))


def test_a_pickle_named_safetensors_is_never_loaded(world, stub, tmp_path):
    adapter = adapter_copy(world, tmp_path)
    trap = _Trap()
    trap.marker = str(tmp_path / "UNPICKLED")
    tensors = load_file(str(world.adapter / "adapter.safetensors"))
    (adapter / "adapter.safetensors").write_bytes(pickle.dumps({"tensors": tensors, "x": trap}))
    meta = json.loads((adapter / "adapter.json").read_text())
    meta["sha256"]["adapter.safetensors"] = sha256_file(adapter / "adapter.safetensors")
    (adapter / "adapter.json").write_bytes(canonical_json(meta))
    sid = upload_refused(
        world, stub, adapter, Code.INVALID_ARGUMENT, "adapter.safetensors: not a safetensors file"
    )
    assert not Path(trap.marker).exists()
    assert_rejected_and_gone(world, sid)


@pytest.mark.parametrize(
    "change,needle",
    [
        ("rename", "unexpected tensors"),
        ("shape", "has shape"),
        ("dtype", "has dtype"),
        ("nan", "NaN or infinite"),
        ("inf", "NaN or infinite"),
    ],
)
def test_wrong_tensors_or_non_finite_values(world, stub, tmp_path, change, needle):
    adapter = adapter_copy(world, tmp_path)
    tensors = load_file(str(world.adapter / "adapter.safetensors"))
    name = sorted(tensors)[0]
    if change == "rename":
        tensors["layers.99.evil.weight"] = tensors.pop(name)
    elif change == "shape":
        tensors[name] = torch.cat([tensors[name].flatten(), torch.zeros(1)])
    elif change == "dtype":
        tensors[name] = tensors[name].to(torch.float16)
    else:
        t = tensors[name].clone()
        t.view(-1)[0] = float("nan") if change == "nan" else float("inf")
        tensors[name] = t
    rewrite_tensors(adapter, tensors)
    sid = upload_refused(world, stub, adapter, Code.INVALID_ARGUMENT, needle)
    assert_rejected_and_gone(world, sid, needle)


# ------------------------------------------------------------------------------------------ signatures and replays


def test_unsigned_submission(world, stub):
    refused(lambda: begin(world, stub, world.adapter, signature=b""), Code.UNAUTHENTICATED, "not signed")


def test_submission_signed_by_another_key(world, stub):
    other = world.credentials("bob").signing_key
    refused(
        lambda: begin(world, stub, world.adapter, key=other),
        Code.UNAUTHENTICATED,
        "not signed by the key enrolled for alice",
    )


def test_envelope_naming_another_client(world, stub):
    files = envelope_format.files_of(world.adapter)
    envelope = envelope_format.make_envelope("j1", "bob", files)
    signature = envelope_format.sign_envelope(envelope, world.credentials("alice").signing_key)
    refused(
        lambda: begin(world, stub, world.adapter, envelope=envelope, signature=signature),
        Code.PERMISSION_DENIED,
        "names client 'bob'",
    )


def test_replayed_nonce(world, stub):
    files = envelope_format.files_of(world.adapter)
    envelope = envelope_format.make_envelope("j1", "alice", files)
    signature = envelope_format.sign_envelope(envelope, world.credentials("alice").signing_key)
    stub.BeginSubmission(pb.BeginSubmissionRequest(envelope=envelope, signature=signature))
    refused(
        lambda: stub.BeginSubmission(pb.BeginSubmissionRequest(envelope=envelope, signature=signature)),
        Code.ALREADY_EXISTS,
        "nonce was used before",
    )


@pytest.mark.parametrize("shift", [-400, 400])
def test_time_outside_the_window(world, stub, shift):
    refused(
        lambda: begin(world, stub, world.adapter, now=time.time() + shift),
        Code.FAILED_PRECONDITION,
        "from the server's clock",
    )


def test_unknown_job_and_a_job_the_client_is_not_on(world, stub):
    refused(lambda: begin(world, stub, world.adapter, job="nope"), Code.NOT_FOUND, "no job 'nope'")
    refused(lambda: begin(world, stub, world.adapter, job="j2"), Code.PERMISSION_DENIED, "not on job j2")


def test_receipt_signed_by_another_key(world, stub, tmp_path):
    adapter = adapter_copy(world, tmp_path)
    bob = world.credentials("bob").signing_key
    (adapter / "receipt.sig").write_bytes(
        crypto.encode_signature(crypto.sign(bob, (adapter / "receipt.json").read_bytes()))
    )
    sid = upload_refused(world, stub, adapter, Code.UNAUTHENTICATED, "not signed by the key enrolled")
    assert_rejected_and_gone(world, sid, "signature")


def test_receipt_over_the_jobs_epsilon(world, stub):
    sid = upload_refused(
        world, stub, world.adapter, Code.FAILED_PRECONDITION, "above the job's maximum ε = 0.5", job="strict"
    )
    assert_rejected_and_gone(world, sid, "maximum ε")


def test_receipt_for_another_adapter(world, stub, tmp_path):
    adapter = adapter_copy(world, tmp_path)
    tensors = load_file(str(world.adapter / "adapter.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0  # a different, valid adapter: the receipt no longer covers it
    rewrite_tensors(adapter, tensors)
    sid = upload_refused(world, stub, adapter, Code.INVALID_ARGUMENT, "adapter hash")
    assert_rejected_and_gone(world, sid)


# ------------------------------------------------------------------------------------------ identity


def _channel(world, port, *, key_pem=None, cert_pem=None):
    creds = world.credentials("alice")
    tls = grpc.ssl_channel_credentials(
        root_certificates=creds.ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    return grpc.secure_channel(
        f"127.0.0.1:{port}", tls, options=[("grpc.ssl_target_name_override", "localhost")]
    )


def _list(channel):
    from offsite.wire.v1 import offsite_pb2_grpc

    return offsite_pb2_grpc.OffsiteServiceStub(channel).ListJobs(pb.ListJobsRequest(), timeout=5)


def test_no_client_certificate(world, server):
    with _channel(world, server) as channel:
        refused(lambda: _list(channel), Code.UNAVAILABLE)


def test_certificate_from_another_ca(world, server):
    key = pki.new_key()
    other_key, other_ca = pki.make_ca("someone else")
    cert = pki.issue_client_cert(other_key, other_ca, pki.make_csr(key), "alice")
    with _channel(world, server, key_pem=pki.key_pem(key), cert_pem=pki.cert_pem(cert)) as channel:
        refused(lambda: _list(channel), Code.UNAVAILABLE)


def test_certificate_from_the_owners_ca_but_not_enrolled(world, server):
    key = pki.new_key()
    paths = OwnerState(world.owner).paths
    cert = pki.issue_client_cert(
        pki.load_key(paths.ca_key), pki.load_cert(paths.ca_cert), pki.make_csr(key), "alice"
    )
    with _channel(world, server, key_pem=pki.key_pem(key), cert_pem=pki.cert_pem(cert)) as channel:
        refused(lambda: _list(channel), Code.UNAUTHENTICATED, "not enrolled")


def test_revoked_client_streams_end_within_a_second(world, server):
    """A stream that keeps sending fails its next check; one that is idle is cancelled; new calls fail."""
    keys = world.enrol("carol")
    with OwnerState(world.owner) as state:
        admin.publish(state, world.bundle, job_id="jc", clients=["carol"], max_epsilon=50, max_delta=1e-3)
    channel, stub = world.stub("carol", server)
    data = payload(world.adapter)
    ended: dict[str, tuple[float, grpc.StatusCode]] = {}

    def stream(name: str, pause: float):
        files = envelope_format.files_of(world.adapter)
        envelope = envelope_format.make_envelope("jc", "carol", files)
        sid = stub.BeginSubmission(
            pb.BeginSubmissionRequest(
                envelope=envelope,
                signature=envelope_format.sign_envelope(envelope, world.credentials("carol").signing_key),
            )
        ).submission_id

        def slow():
            for m in messages(sid, data, chunk=1024, finish=False):
                yield m
                time.sleep(pause)

        try:
            stub.WriteSubmission(slow(), timeout=60)
            ended[name] = (time.monotonic(), Code.OK)
        except grpc.RpcError as e:
            ended[name] = (time.monotonic(), e.code())

    threads = [
        threading.Thread(target=stream, args=("sending", 0.02)),
        threading.Thread(target=stream, args=("idle", 30)),
    ]
    for t in threads:
        t.start()
    time.sleep(1.0)
    with OwnerState(world.owner) as state:
        admin.revoke(state, "carol", "test")
    revoked = time.monotonic()
    for t in threads:
        t.join(timeout=10)
    assert ended["sending"][1] == Code.UNAUTHENTICATED
    assert ended["idle"][1] in (Code.CANCELLED, Code.UNAUTHENTICATED)
    for name, (when, _) in ended.items():
        assert when - revoked < 1.0, (name, when - revoked)
    refused(lambda: stub.ListJobs(pb.ListJobsRequest(), timeout=5), Code.UNAUTHENTICATED, "revoked")
    channel.close()
    assert keys.exists()


def test_client_errors_carry_the_servers_reason(world, server, tmp_path):
    with world.client("alice", server) as c, pytest.raises(ServerError) as info:
        c.submit("strict", world.adapter)
    assert info.value.code == Code.FAILED_PRECONDITION and "maximum ε" in str(info.value)
    sid = next(
        s["submission_id"]
        for s in map(
            json.loads, (p.read_text() for p in (world.clients["alice"] / "submissions").glob("*.json"))
        )
        if s["job_id"] == "strict"
    )
    with world.client("alice", server) as c:
        assert c.status(sid).state == pb.SUBMISSION_STATE_REJECTED


def test_a_second_stream_on_the_same_submission_is_aborted(world, stub):
    data = payload(world.adapter)
    sid = begin(world, stub, world.adapter).submission_id
    outcome = {}

    def slow():
        for m in messages(sid, data, chunk=4096):
            yield m
            time.sleep(0.1)

    def first():
        outcome["first"] = write(stub, slow()).submission.state

    t = threading.Thread(target=first)
    t.start()
    time.sleep(0.5)
    refused(lambda: write(stub, messages(sid, data)), Code.ABORTED, "another stream is writing")
    t.join(timeout=60)
    assert outcome["first"] == pb.SUBMISSION_STATE_ACCEPTED
