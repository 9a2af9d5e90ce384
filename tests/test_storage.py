"""One suite for the storage interface (server/storage/base.py), run against every backend; and the
content-addressed file store."""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid

import pytest

from offsite.errors import IntegrityError, OffsiteError
from offsite.server.errors import (
    AlreadyExistsError,
    LedgerConflictError,
    NotFoundError,
    QuotaError,
    ReplayError,
)
from offsite.server.storage.base import (
    ClientRecord,
    Decision,
    DeclaredFile,
    JobRecord,
    LedgerAppend,
    LedgerRow,
    LedgerScope,
    SubmissionRecord,
    SubmissionState,
    UploadQuota,
    utc_at,
    utc_now,
)
from offsite.server.storage.blobs import BlobStore, UploadArea
from offsite.server.storage.sqlite import SQLiteStorage

BACKENDS = {"sqlite": lambda path: SQLiteStorage(path / "offsite.db")}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, tmp_path):
    """(open, path): ``open()`` gives a new handle on the same store (a reopen, another process)."""
    make = BACKENDS[request.param]
    handles = []

    def open_():
        handles.append(make(tmp_path))
        return handles[-1]

    yield open_
    for h in handles:
        h.close()


def client(cid="alice", pin=None) -> ClientRecord:
    return ClientRecord(cid, pin or os.urandom(32).hex(), b"PEM", "a2V5", "f" * 64, utc_now())


def job(job_id="j1", clients=("alice",), bundle="b" * 64) -> JobRecord:
    return JobRecord(job_id, bundle, 8.0, 1e-5, False, 1000, tuple(clients), utc_now())


def submission(nonce=None, client_id="alice", job_id="j1", sizes=(10, 5)) -> SubmissionRecord:
    names = ("adapter.safetensors", "adapter.json")
    return SubmissionRecord(
        submission_id=uuid.uuid4().hex,
        client_id=client_id,
        job_id=job_id,
        bundle_id="b" * 64,
        state=SubmissionState.UPLOADING,
        files=tuple(DeclaredFile(n, s, "0" * 64) for n, s in zip(names, sizes, strict=True)),
        nonce=nonce or os.urandom(32).hex(),
        envelope=b"{}",
        envelope_signature=b"sig",
        created_at=utc_now(),
    )


@pytest.fixture
def store(backend):
    s = backend()
    s.add_client(client())
    s.add_client(client("bob"))
    s.record_bundle("b" * 64, b"manifest")
    s.add_job(job())
    return s


def test_clients_pins_and_revocation(store):
    alice = store.get_client("alice")
    assert store.client_by_cert(alice.cert_sha256) == alice
    assert store.client_by_cert("0" * 64) is None
    with pytest.raises(AlreadyExistsError):
        store.add_client(client("alice"))
    with pytest.raises(AlreadyExistsError, match="pinned to another client"):
        store.add_client(client("carol", pin=alice.cert_sha256))
    assert store.revoked_certs() == frozenset()
    first = store.revoke_client("alice", "lost laptop")
    again = store.revoke_client("alice", "other reason")
    assert again.revoked_at == first.revoked_at and again.revoked_reason == "lost laptop"
    assert store.revoked_certs() == {alice.cert_sha256}
    with pytest.raises(NotFoundError):
        store.revoke_client("nobody", "x")
    assert [c.client_id for c in store.list_clients()] == ["alice", "bob"]


def test_bundles_and_jobs(store):
    assert store.record_bundle("b" * 64, b"manifest").manifest == b"manifest"  # idempotent
    with pytest.raises(AlreadyExistsError, match="other manifest bytes"):
        store.record_bundle("b" * 64, b"other")
    assert store.get_bundle("b" * 64).signature is None
    store.sign_bundle("b" * 64, b"sig")
    assert store.get_bundle("b" * 64).signature == b"sig"
    with pytest.raises(NotFoundError):
        store.get_bundle("c" * 64)
    with pytest.raises(AlreadyExistsError):
        store.add_job(job())
    with pytest.raises(NotFoundError, match="no client 'zed'"):
        store.add_job(job("j2", clients=("zed",)))
    with pytest.raises(NotFoundError, match="not recorded"):
        store.add_job(job("j3", bundle="d" * 64))
    assert store.get_job("j1").clients == ("alice",)
    assert [j.job_id for j in store.jobs_for_client("alice")] == ["j1"]
    assert store.jobs_for_client("bob") == []
    with pytest.raises(NotFoundError):
        store.get_job("j2")  # the refused job left nothing behind


def test_nonces_are_unique(store):
    first = submission()
    store.add_submission(first)
    with pytest.raises(ReplayError):
        store.add_submission(submission(nonce=first.nonce))
    assert len(store.list_submissions()) == 1


def test_committed_size_never_goes_backwards_nor_past_the_end(store):
    s = submission()
    store.add_submission(s)
    assert store.set_committed(s.submission_id, 7) == 7
    assert store.set_committed(s.submission_id, 3) == 7
    assert store.get_submission(s.submission_id).committed == 7
    with pytest.raises(OffsiteError, match="past the declared"):
        store.set_committed(s.submission_id, 16)


def test_committing_a_byte_is_activity_and_expiry_takes_only_idle_uploads(store):
    s = submission()
    store.add_submission(s)
    assert store.get_submission(s.submission_id).active_at == s.created_at
    store.set_committed(s.submission_id, 4)
    active = store.get_submission(s.submission_id).active_at
    assert active > s.created_at
    store.set_committed(s.submission_id, 2)  # no rise, no activity
    assert store.get_submission(s.submission_id).active_at == active
    # Idle since `active`: a cutoff at or before it leaves the upload alone, one after it expires it.
    assert store.expire_submission(s.submission_id, active, "abandoned") is None
    expired = store.expire_submission(s.submission_id, utc_now(), "abandoned: no bytes for 1 h")
    assert expired.state == SubmissionState.EXPIRED and expired.reason == "abandoned: no bytes for 1 h"
    assert expired.decided_at and expired.committed == 4
    assert store.expire_submission(s.submission_id, utc_now(), "again") is None  # terminal
    assert store.mark_received(s.submission_id).state == SubmissionState.EXPIRED
    assert store.decide(s.submission_id, Decision(SubmissionState.ACCEPTED)).state == SubmissionState.EXPIRED
    assert [r.submission_id for r in store.list_submissions(states=[SubmissionState.EXPIRED])] == [
        s.submission_id
    ]
    assert not store.list_submissions(states=[SubmissionState.UPLOADING])


def test_a_decided_submission_never_expires(store):
    s = submission()
    store.add_submission(s)
    store.decide(s.submission_id, Decision(SubmissionState.REJECTED, reason="bad"))
    assert store.expire_submission(s.submission_id, utc_at(2**33), "abandoned") is None
    assert store.get_submission(s.submission_id).state == SubmissionState.REJECTED


def test_upload_quota_counts_open_uploads_and_their_declared_bytes(store):
    store.add_client(client("carol"))
    quota = UploadQuota(max_open=2, max_bytes=40)
    first, second = submission(sizes=(10, 5)), submission(sizes=(10, 5))
    store.add_submission(first, quota)
    store.add_submission(second, quota)
    with pytest.raises(QuotaError, match="2 open uploads"):
        store.add_submission(submission(sizes=(1, 1)), quota)
    store.add_submission(submission(client_id="carol"), quota)  # per client
    store.decide(first.submission_id, Decision(SubmissionState.REJECTED, reason="x"))  # no longer open
    with pytest.raises(QuotaError, match="declare 15 bytes"):
        store.add_submission(submission(sizes=(20, 6)), quota)
    exact = submission(sizes=(20, 5))
    store.add_submission(exact, quota)  # 15 + 25 = 40: exactly the quota
    assert store.get_submission(exact.submission_id).state == SubmissionState.UPLOADING


def test_the_upload_quota_holds_under_concurrent_opens(backend, store):
    quota, ok, refused = UploadQuota(max_open=3, max_bytes=10**9), [], []

    def open_one():
        handle = backend()
        try:
            handle.add_submission(submission(), quota)
            ok.append(1)
        except QuotaError:
            refused.append(1)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(ok), len(refused)) == (3, 5)
    assert len(store.list_submissions(client_id="alice", states=[SubmissionState.UPLOADING])) == 3


def test_submission_life(store):
    s = submission()
    store.add_submission(s)
    with pytest.raises(OffsiteError, match="7 of 15|0 of 15"):
        store.mark_received(s.submission_id)
    store.set_committed(s.submission_id, 15)
    assert store.mark_received(s.submission_id).state == SubmissionState.RECEIVED
    with pytest.raises(OffsiteError, match="only accepted"):
        store.mark_plugged(s.submission_id, "/m")
    decision = Decision(
        SubmissionState.ACCEPTED,
        adapter_sha256="a" * 64,
        dataset_id="ds",
        epsilon=1.5,
        delta=1e-5,
        receipt=b"r",
        receipt_signature=b"s",
    )
    accepted = store.decide(s.submission_id, decision)
    assert (accepted.state, accepted.epsilon, accepted.receipt) == (SubmissionState.ACCEPTED, 1.5, b"r")
    # a decision stands
    assert (
        store.decide(s.submission_id, Decision(SubmissionState.REJECTED, reason="x")).state
        == SubmissionState.ACCEPTED
    )
    plugged = store.mark_plugged(s.submission_id, "/models/merged")
    assert plugged.state == SubmissionState.PLUGGED and plugged.plugged_into == "/models/merged"
    assert [r.submission_id for r in store.accepted_receipts("alice", "ds")] == [s.submission_id]
    assert store.accepted_receipts("alice", "other") == [] and store.accepted_receipts("bob") == []
    rejected = submission()
    store.add_submission(rejected)
    store.set_committed(rejected.submission_id, 15)
    store.mark_received(rejected.submission_id)
    assert (
        store.decide(rejected.submission_id, Decision(SubmissionState.REJECTED, reason="NaN")).reason == "NaN"
    )
    assert [r.submission_id for r in store.accepted_receipts("alice")] == [s.submission_id]
    assert {r.state for r in store.list_submissions(states=[SubmissionState.REJECTED])} == {
        SubmissionState.REJECTED
    }
    assert len(store.list_submissions(job_id="j1", client_id="alice")) == 2


def test_everything_survives_a_reopen(backend, store):
    s = submission()
    store.add_submission(s)
    store.set_committed(s.submission_id, 9)
    store.close()
    again = backend()
    assert again.get_submission(s.submission_id).committed == 9
    assert again.get_job("j1").clients == ("alice",)
    with pytest.raises(ReplayError):
        again.add_submission(submission(nonce=s.nonce))


def test_concurrent_writers_never_lose_an_update(backend, store):
    """Several handles (as several processes would) and threads commit at once: no busy errors, no loss."""
    s = submission(sizes=(400, 1))
    store.add_submission(s)
    others = [backend() for _ in range(3)]
    errors = []

    def work(handle, start):
        try:
            for i in range(start, 400, 4):
                handle.set_committed(s.submission_id, i + 1)
                handle.add_submission(submission())
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(h, i)) for i, h in enumerate([store, *others])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.get_submission(s.submission_id).committed == 400
    assert len(store.list_submissions()) == 1 + 400


# -- the ledger (entries are opaque bytes here; offsite.server.ledger makes and signs them) ------------


def maker(*kinds: tuple[str, str, str], checkpoint: bytes | None = None, seen: list | None = None):
    """An EntryMaker appending entries of (kind, client, dataset) after the head it is given."""

    def make(head, clients):
        if seen is not None:
            seen.append((head, [c.client_id for c in clients()] if head is None else None))
        start = 0 if head is None else head.index + 1
        rows = tuple(
            LedgerRow(start + i, f"entry {start + i}".encode(), b"sig", f"{start + i:064x}", k, c, d)
            for i, (k, c, d) in enumerate(kinds)
        )
        return LedgerAppend(rows, checkpoint)

    return make


def received(store) -> SubmissionRecord:
    s = submission()
    store.add_submission(s)
    store.set_committed(s.submission_id, 15)
    store.mark_received(s.submission_id)
    return s


def test_ledger_entries_are_appended_after_the_head_and_read_back(store):
    assert store.ledger_head() is None and store.ledger_rows() == []
    seen = []
    store.append_ledger(maker(("open", "", ""), ("grant", "alice", "ds"), seen=seen))
    assert seen == [(None, ["alice", "bob"])]  # an opening maker sees the clients enrolled so far
    store.append_ledger(maker(("grant", "bob", "ds"), ("grant", "alice", "other"), seen=seen))
    assert seen[1][0].index == 1 and seen[1][0].ledger_id == f"{0:064x}"
    assert [r.index for r in store.ledger_rows()] == [0, 1, 2, 3]
    assert [r.entry for r in store.ledger_rows(1, 3)] == [b"entry 1", b"entry 2"]
    head = store.ledger_head()
    assert (head.index, head.hash, head.ledger_id) == (3, f"{3:064x}", f"{0:064x}")
    assert [r.index for r in store.ledger_scope("alice", "ds")] == [1]
    rows, clients = store.ledger_snapshot()
    assert [r.index for r in rows] == [0, 1, 2, 3] and [c.client_id for c in clients] == ["alice", "bob"]
    assert store.ledger_datasets("alice") == ["ds", "other"] and store.ledger_datasets("carol") == []
    with pytest.raises(OffsiteError, match="does not follow the head"):  # a maker that skips an index

        def skipping(head, clients):
            return LedgerAppend((LedgerRow(head.index + 2, b"x", b"s", "f" * 64, "grant"),))

        store.append_ledger(skipping)
    assert store.ledger_head().index == 3  # nothing of it was written


def test_a_change_and_its_entry_commit_together_or_not_at_all(store):
    """Enrolment, revocation, acceptance and plug-in: with a maker that fails, neither the change nor an
    entry is recorded; with one that works, both are, and an acceptance keeps its checkpoint."""

    def broken(head, clients):
        raise OffsiteError("the signing key is gone")

    with pytest.raises(OffsiteError, match="signing key"):
        store.add_client(client("carol"), ledger=broken)
    with pytest.raises(NotFoundError):
        store.get_client("carol")
    store.add_client(client("carol"), ledger=maker(("open", "", ""), ("enrol", "carol", "")))
    assert [r.kind for r in store.ledger_rows()] == ["open", "enrol"]
    with pytest.raises(OffsiteError):
        store.revoke_client("carol", "gone", ledger=broken)
    assert store.get_client("carol").revoked_at is None
    store.revoke_client("carol", "gone", ledger=maker(("revoke", "carol", "")))
    store.revoke_client("carol", "again", ledger=maker(("revoke", "carol", "")))  # idempotent: no entry
    assert [r.kind for r in store.ledger_rows()] == ["open", "enrol", "revoke"]
    s = received(store)
    accepted = Decision(SubmissionState.ACCEPTED, adapter_sha256="a" * 64, dataset_id="ds", epsilon=1.0)
    with pytest.raises(OffsiteError):
        store.decide(s.submission_id, accepted, ledger=broken)
    assert store.get_submission(s.submission_id).state == SubmissionState.RECEIVED
    decided = store.decide(
        s.submission_id, accepted, ledger=maker(("submission", "alice", "ds"), checkpoint=b"cp")
    )
    assert decided.state == SubmissionState.ACCEPTED and decided.ledger_checkpoint == b"cp"
    with pytest.raises(OffsiteError):
        store.mark_plugged(s.submission_id, "/m", ledger=broken)
    assert store.get_submission(s.submission_id).state == SubmissionState.ACCEPTED
    store.mark_plugged(s.submission_id, "/m", ledger=maker(("plug", "alice", "")))
    assert [r.kind for r in store.ledger_rows()][-2:] == ["submission", "plug"]


def test_a_budget_decision_on_a_stale_ledger_is_refused(backend, store):
    """A decision made on the pair's ledger as it was commits only if no budget entry of the pair was
    appended since (as another server on the same state would do): else nothing changes."""
    store.append_ledger(maker(("open", "", ""), ("grant", "alice", "ds")))
    mark = store.ledger_scope("alice", "ds")[-1].index
    s = received(store)
    other = backend()  # another handle, as another process
    other.append_ledger(maker(("submission", "alice", "ds")), scope=LedgerScope("alice", "ds", mark))
    accepted = Decision(SubmissionState.ACCEPTED, adapter_sha256="a" * 64, dataset_id="ds")
    with pytest.raises(LedgerConflictError):
        store.decide(
            s.submission_id,
            accepted,
            ledger=maker(("submission", "alice", "ds")),
            scope=LedgerScope("alice", "ds", mark),
        )
    assert store.get_submission(s.submission_id).state == SubmissionState.RECEIVED
    assert len(store.ledger_rows()) == 3
    # entries of other pairs, or of other kinds, do not make it stale
    other.append_ledger(maker(("grant", "bob", "ds"), ("plug", "alice", "ds")))
    fresh = LedgerScope("alice", "ds", store.ledger_scope("alice", "ds")[-1].index)
    assert store.decide(
        s.submission_id, accepted, ledger=maker(("submission", "alice", "ds")), scope=fresh
    ).state == (SubmissionState.ACCEPTED)


def test_the_sqlite_ledger_table_refuses_updates_and_deletes(tmp_path):
    store = SQLiteStorage(tmp_path / "offsite.db")
    store.append_ledger(maker(("open", "", "")))
    conn = sqlite3.connect(tmp_path / "offsite.db")
    for sql in ("UPDATE ledger SET entry = x'00'", "DELETE FROM ledger"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(sql)
    conn.close()
    assert store.ledger_rows()[0].entry == b"entry 0"
    store.close()


def test_sqlite_is_wal_with_full_sync(tmp_path):
    store = SQLiteStorage(tmp_path / "offsite.db")
    conn = store._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()
    with sqlite3.connect(tmp_path / "offsite.db") as raw:
        raw.execute("PRAGMA user_version = 99")
    with pytest.raises(OffsiteError, match="newer than this offsite knows"):
        SQLiteStorage(tmp_path / "offsite.db")


# ------------------------------------------------------------------------------------------ files


def test_blob_store_keeps_only_whole_checked_files(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    src = tmp_path / "f"
    src.write_bytes(b"hello")
    digest = __import__("hashlib").sha256(b"hello").hexdigest()
    with pytest.raises(IntegrityError):
        blobs.put_file(src, "0" * 64)
    assert not blobs.has("0" * 64)
    path = blobs.put_file(src, digest)
    assert path.read_bytes() == b"hello" and blobs.size(digest) == 5 and src.exists()
    assert blobs.put_bytes(b"hello") == digest
    moved = tmp_path / "g"
    moved.write_bytes(b"hello")
    blobs.put_file(moved, digest, move=True)
    assert not moved.exists()
    # a crash mid-write leaves a temporary file: never visible under a name, removed at the next open
    leftover = path.parent / ".tmp-deadbeef"
    leftover.write_bytes(b"hel")
    BlobStore(tmp_path / "blobs")
    assert not leftover.exists()
    with pytest.raises(NotFoundError):
        blobs.open("1" * 64)
    with pytest.raises(NotFoundError, match="not a sha256"):
        blobs.path("../../etc/passwd")


def test_upload_area_refuses_malformed_ids(tmp_path):
    area = UploadArea(tmp_path / "uploads")
    with pytest.raises(NotFoundError):
        area.directory("../x")
    d = area.directory("a" * 32)
    d.mkdir()
    assert area.present() == ["a" * 32]
    area.remove("a" * 32)
    assert area.present() == []
