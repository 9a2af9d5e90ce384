"""The service: what each call does, in plain Python (the servicer only translates protobuf to this).

Every method takes the authenticated ``Caller`` (``auth``), validates what the caller sent, works on
the owner's state (``OwnerState``: storage, blobs, uploads) and raises ``OffsiteError`` subclasses
(``errors``) that the wrapper turns into status codes.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from offsite import crypto
from offsite.errors import OffsiteError
from offsite.formats import submission as envelope_format
from offsite.privacy import history as local_history
from offsite.server import budgets, checks
from offsite.server import ledger as ledger_records
from offsite.server.auth import Call, Caller
from offsite.server.errors import (
    BusyError,
    ClockSkewError,
    FileIntegrityError,
    IncompleteUploadError,
    LedgerConflictError,
    LimitError,
    NotFoundError,
    PermissionDeniedError,
    QuotaError,
    SignatureError,
    UploadExpiredError,
)
from offsite.server.limits import ServerLimits
from offsite.server.locks import KeyedLocks
from offsite.server.owner_state import OwnerState
from offsite.server.storage.base import (
    Decision,
    DeclaredFile,
    JobRecord,
    SubmissionRecord,
    SubmissionState,
    UploadQuota,
    utc_at,
    utc_now,
)
from offsite.server.transfer import Chunk, ChunkHashes, UploadWriter, read_chunks
from offsite.wire import transport

log = logging.getLogger("offsite.server")

#: Limits on the small files of a submission (the adapter's limit is the job's).
SMALL_FILE_LIMITS = {"adapter.json": 1 << 20, "receipt.json": 1 << 20, "receipt.sig": 1 << 10}
#: A page of ListJobs stays below the message limit by this margin.
_PAGE_MARGIN = 1 << 20
#: A budget decision is made again this often when a grant of the same dataset changes meanwhile.
LEDGER_ATTEMPTS = 5


@dataclass(frozen=True)
class JobView:
    job: JobRecord
    manifest: bytes
    signature: bytes


@dataclass(frozen=True)
class WriteMessage:
    """One message of an upload stream, as the service sees it."""

    submission_id: str
    offset: int
    data: bytes
    sha256: str
    finish_write: bool


class OffsiteService:
    def __init__(
        self, state: OwnerState, clock: Callable[[], float] = time.time, limits: ServerLimits | None = None
    ):
        self.state = state
        self.storage = state.storage
        self._clock = clock
        self.limits = limits or ServerLimits()
        self._chunk_hashes = ChunkHashes()
        # Both tables hold only keys in use right now (they would otherwise grow with every submission).
        self._locks = KeyedLocks()  # one writer (or the janitor) per submission
        self._budget_locks = KeyedLocks()  # one decision per (client, dataset)
        self.ledger = state.ledger  # the owner's signing key: refuse to serve without it
        self.ledger.open()

    # -- jobs and downloads --------------------------------------------------------------------
    def _job_for(self, caller: Caller, job_id: str) -> JobRecord:
        job = self.storage.get_job(job_id)  # NotFoundError for an unknown job
        if caller.client_id not in job.clients:
            raise PermissionDeniedError(f"client {caller.client_id} is not on job {job_id}")
        return job

    def list_jobs(self, caller: Caller, page_token: str = "") -> tuple[list[JobView], str]:
        jobs = self.storage.jobs_for_client(caller.client_id)
        start = int(page_token) if page_token.isdigit() and len(page_token) < 10 else 0
        if page_token and str(start) != page_token:
            raise OffsiteError(f"malformed page token {page_token[:20]!r}")
        views, size = [], 0
        for i in range(start, len(jobs)):
            bundle = self.storage.get_bundle(jobs[i].bundle_id)
            view = JobView(jobs[i], bundle.manifest, bundle.signature or b"")
            size += len(view.manifest) + len(view.signature) + 1024
            if views and size > transport.MAX_MESSAGE_BYTES - _PAGE_MARGIN:
                return views, str(i)
            views.append(view)
        return views, ""

    def download(self, caller: Caller, job_id: str, path: str, offset: int) -> Iterator[Chunk]:
        job = self._job_for(caller, job_id)
        manifest = json.loads(self.storage.get_bundle(job.bundle_id).manifest)
        digest = manifest["files"].get(path) if isinstance(path, str) else None
        if not isinstance(digest, str):
            raise NotFoundError(f"bundle of job {job_id} has no file {path!r}")
        with self.state.blobs.open(digest) as f:
            yield from read_chunks(f, offset, known=self._chunk_hashes.of(digest, transport.CHUNK_BYTES))

    # -- submissions ------------------------------------------------------------------------------
    def begin_submission(self, caller: Caller, envelope: bytes, signature: bytes) -> SubmissionRecord:
        if not signature:
            raise SignatureError("the submission is not signed: sign the envelope with your receipt key")
        parsed = envelope_format.parse_envelope(envelope)
        # The signature first: nothing else an unverified envelope says is trusted.
        try:
            envelope_format.verify_envelope(envelope, signature, caller.receipt_key)
        except OffsiteError as e:
            raise SignatureError(
                f"the submission is not signed by the key enrolled for {caller.client_id}: {e}"
            ) from None
        if parsed.client_id != caller.client_id:
            raise PermissionDeniedError(
                f"the envelope names client {parsed.client_id!r}, but the certificate is {caller.client_id!r}"
            )
        skew = abs(self._clock() - parsed.time)
        if skew > envelope_format.MAX_CLOCK_SKEW_S:
            raise ClockSkewError(
                f"the submission's time is {skew:.0f} s from the server's clock (at most "
                f"{envelope_format.MAX_CLOCK_SKEW_S} s): check this machine's clock"
            )
        job = self._job_for(caller, parsed.job_id)
        for f in parsed.files:
            limit = job.max_adapter_bytes if f.name == "adapter.safetensors" else SMALL_FILE_LIMITS[f.name]
            if f.size > limit:
                raise LimitError(f"{f.name} is {f.size} bytes; job {job.job_id} accepts at most {limit}")
        record = SubmissionRecord(
            submission_id=uuid.uuid4().hex,
            client_id=caller.client_id,
            job_id=job.job_id,
            bundle_id=job.bundle_id,
            state=SubmissionState.UPLOADING,
            files=tuple(DeclaredFile(f.name, f.size, f.sha256) for f in parsed.files),
            nonce=parsed.nonce,
            envelope=envelope,
            envelope_signature=signature,
            created_at=utc_now(),
        )
        self._add_within_quota(record)
        return record

    def _add_within_quota(self, record: SubmissionRecord) -> None:
        limits = self.limits
        advice = (
            f"finish your open uploads (rerun `offsite client submit` on each adapter) or let them "
            f"expire ({limits.ttl_text()} after their last byte)"
        )
        if record.total > limits.upload_quota_bytes:
            raise QuotaError(
                f"this submission declares {record.total} bytes, more than the {limits.upload_quota_bytes} "
                "bytes a client may hold in open uploads on this server: ask the owner to raise "
                "`offsite serve --upload-quota-mib`"
            )
        quota = UploadQuota(limits.max_open_uploads, limits.upload_quota_bytes)
        try:
            self.storage.add_submission(record, quota)  # ReplayError if the nonce was seen
        except QuotaError as e:
            raise QuotaError(f"{e}: {advice}") from None

    def _own_submission(self, caller: Caller, submission_id: str) -> SubmissionRecord:
        record = self.storage.get_submission(submission_id) if submission_id else None
        if record is None or record.client_id != caller.client_id:
            raise NotFoundError(f"no submission {submission_id!r} of client {caller.client_id}")
        return record

    @contextmanager
    def _exclusive(self, submission_id: str) -> Iterator[None]:
        with self._locks.hold(submission_id, timeout=transport.WRITER_WAIT_S) as held:
            if not held:
                raise BusyError(f"another stream is writing submission {submission_id}; retry shortly")
            yield

    def write_submission(
        self, call: Call, messages: Iterator[WriteMessage]
    ) -> tuple[int, SubmissionRecord | None]:
        """Take one upload stream; return the committed size and, after finish_write, the decided submission."""
        first = next(messages, None)
        if first is None:
            raise OffsiteError("empty upload stream: the first message must name the submission")
        record = self._own_submission(call.caller, first.submission_id)
        with self._exclusive(record.submission_id):
            record = self.storage.get_submission(record.submission_id)
            if record.state == SubmissionState.EXPIRED:
                raise UploadExpiredError(
                    f"submission {record.submission_id} expired: {record.reason}; its partial files are "
                    "deleted. Start a fresh upload (rerunning `offsite client submit` does)"
                )
            if record.state != SubmissionState.UPLOADING:
                if first.finish_write and not first.data:
                    # A retried finish: the decision stands (or is made now, if it was left undecided).
                    return record.total, self.decide(record.submission_id)
                raise OffsiteError(
                    f"submission {record.submission_id} is {record.state.value}: its upload is over"
                )
            writer = UploadWriter(record, self.state.uploads, self.storage)
            finish = False
            try:
                message = first
                while True:
                    if message.submission_id and message.submission_id != record.submission_id:
                        raise OffsiteError("one upload stream carries one submission")
                    if message.data:
                        writer.write(message.offset, message.data, message.sha256)
                        writer.maybe_commit()
                    if message.finish_write:
                        finish = True
                        break
                    message = next(messages, None)
                    if message is None:
                        break
            except (
                FileIntegrityError
            ) as e:  # a whole file is not what the client signed: the submission is dead
                writer.close()
                self._reject(record.submission_id, str(e))
                raise
            except BaseException:
                writer.commit()  # keep every verified byte: the client resumes from here
                raise
            finally:
                writer.close()
            committed = writer.commit()
            if not finish:
                return committed, None
            if committed != record.total:
                raise IncompleteUploadError(
                    f"finish_write after {committed} of {record.total} bytes: send the rest, then finish"
                )
            self.storage.mark_received(record.submission_id)
            return committed, self.decide(record.submission_id)

    def query_write_status(self, caller: Caller, submission_id: str) -> tuple[int, int, bool]:
        record = self._own_submission(caller, submission_id)
        return record.committed, record.total, record.state != SubmissionState.UPLOADING

    def get_submission(self, caller: Caller, submission_id: str) -> SubmissionRecord:
        return self._own_submission(caller, submission_id)

    def list_receipts(self, caller: Caller, dataset_id: str = "") -> list[SubmissionRecord]:
        return self.storage.accepted_receipts(caller.client_id, dataset_id or None)

    def budgets(
        self, caller: Caller, dataset_id: str = ""
    ) -> tuple[list[budgets.DatasetLedger], bytes | None]:
        """What the ledger holds for the caller's datasets (or one), and a signed checkpoint of its head."""
        if dataset_id:
            local_history.validate_dataset_id(dataset_id)
        ids = [dataset_id] if dataset_id else self.storage.ledger_datasets(caller.client_id)
        return [budgets.read(self.storage, caller.client_id, d) for d in ids], self.ledger.checkpoint()

    # -- deciding ---------------------------------------------------------------------------------
    def _reject(self, submission_id: str, reason: str) -> SubmissionRecord:
        """Record the rejection, then remove its files: nothing rejected can be plugged in."""
        record = self.storage.decide(submission_id, Decision(SubmissionState.REJECTED, reason=reason))
        self.state.uploads.remove(submission_id)
        return record

    def decide(self, submission_id: str) -> SubmissionRecord:
        """Run the checks on a received submission; accept it (files into the blob store) or reject it."""
        record = self.storage.get_submission(submission_id)
        if record.state != SubmissionState.RECEIVED:
            return record
        directory = self.state.uploads.directory(submission_id)
        job = self.storage.get_job(record.job_id)
        client = self.storage.get_client(record.client_id)
        declared = {f.name: f.sha256 for f in record.files}
        try:
            manifest = json.loads(self.storage.get_bundle(job.bundle_id).manifest)
            adapter_sha256 = checks.check_adapter(directory, manifest, job)
            facts = checks.check_receipt(
                directory, job, crypto.public_key_from_b64(client.receipt_key), declared
            )
            decision = Decision(
                SubmissionState.ACCEPTED,
                adapter_sha256=adapter_sha256,
                dataset_id=facts.dataset_id if facts else "",
                epsilon=facts.epsilon if facts else 0.0,
                delta=facts.delta if facts else 0.0,
                receipt=facts.receipt if facts else None,
                receipt_signature=facts.signature if facts else None,
            )
            with self._budget_lock(record.client_id, facts.dataset_id if facts else ""):
                decided = self._accept(record, decision, facts)
        except LedgerConflictError:
            raise  # left received: decided again by the client's retry or at the next start
        except OffsiteError as e:
            self._reject(submission_id, str(e))
            raise
        self.state.uploads.remove(submission_id)
        return decided

    @contextmanager
    def _budget_lock(self, client_id: str, dataset_id: str) -> Iterator[None]:
        """Decisions on one (client, dataset) run one at a time in this process (the storage's scope
        check also holds them to it across processes, e.g. a grant changed from the command line)."""
        with self._budget_locks.hold((client_id, dataset_id)):
            yield

    def _accept(
        self, record: SubmissionRecord, decision: Decision, facts: checks.ReceiptFacts | None
    ) -> SubmissionRecord:
        """Admit against the grant, then commit the acceptance and its ledger entry in one transaction."""
        directory = self.state.uploads.directory(record.submission_id)
        for attempt in range(LEDGER_ATTEMPTS):
            admission, scope = None, None
            if facts is not None:
                admission = budgets.admit(
                    budgets.read(self.storage, record.client_id, facts.dataset_id), facts.cumulative_history
                )
                scope = admission.view.scope
            entry = ledger_records.submission_record(
                record,
                decision.adapter_sha256,
                dataset_id=facts.dataset_id if facts else None,
                receipt=facts.receipt if facts else None,
                receipt_signature=crypto.decode_signature(facts.signature, "receipt.sig") if facts else None,
                grant_index=admission.view.grant.index if admission and admission.view.grant else None,
                spent=admission.spent() if admission else None,
            )
            # The files first: an accepted submission always has them (a crash before the commit leaves
            # content-addressed blobs that no record points to, which cannot be plugged in). Copied, not
            # moved: until the commit the upload stays whole, so a decision left undone by a conflict or a
            # crash is made again on the same files.
            for f in record.files:
                if not self.state.blobs.has(f.sha256):
                    self.state.blobs.put_file(directory / f.name, f.sha256)
            try:
                return self.storage.decide(
                    record.submission_id,
                    decision,
                    ledger=self.ledger.maker(entry, checkpoint=True),
                    scope=scope,
                )
            except LedgerConflictError:
                if attempt + 1 == LEDGER_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    # -- abandoned uploads -------------------------------------------------------------------------
    def expire_abandoned(self) -> list[str]:
        """Expire every upload with no committed byte for the TTL; delete its partial files. An upload
        that a stream is writing right now is left alone (it is not abandoned). Returns the expired ids."""
        cutoff = utc_at(self._clock() - self.limits.upload_ttl_s)
        reason = f"abandoned: no bytes for {self.limits.ttl_text()}"
        expired = []
        for record in self.storage.list_submissions(states=[SubmissionState.UPLOADING]):
            if record.active_at >= cutoff:
                continue
            with self._locks.hold(record.submission_id, timeout=0) as held:
                if not held:
                    continue
                if self.storage.expire_submission(record.submission_id, cutoff, reason) is not None:
                    self.state.uploads.remove(record.submission_id)
                    expired.append(record.submission_id)
                    log.info(
                        "submission %s of %s expired: %s", record.submission_id, record.client_id, reason
                    )
        return expired

    def recover(self) -> None:
        """After a restart: decide submissions received before a crash; drop files of decided ones;
        expire abandoned uploads."""
        for record in self.storage.list_submissions(states=[SubmissionState.RECEIVED]):
            try:
                self.decide(record.submission_id)
            except OffsiteError as e:
                log.info("submission %s rejected on recovery: %s", record.submission_id, e)
            except Exception:  # stays received; tried again at the next start
                log.exception("could not decide submission %s", record.submission_id)
        self.expire_abandoned()
        live = {r.submission_id for r in self.storage.list_submissions(states=[SubmissionState.UPLOADING])}
        for name in self.state.uploads.present():
            if name not in live:
                self.state.uploads.remove(name)
