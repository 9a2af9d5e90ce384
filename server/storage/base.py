"""The owner's records behind one small interface: clients, issued bundles, jobs, submissions, nonces,
and the privacy ledger (append-only, hash-chained, signed entries; ``offsite.formats.ledger``).

A backend implements ``Storage``; ``sqlite.SQLiteStorage`` is the embedded default and a PostgreSQL
backend can follow without touching its callers: the interface speaks in the records below, plain
Python values and the errors of ``offsite.server.errors``, never in SQL, rows or driver exceptions.
Every method is one transaction: it happens completely or not at all, and once it returns it is
durable. ``tests/test_storage.py`` is one suite written against this interface, run on each backend.
A change that the ledger records (an enrolment, a revocation, an accepted submission, a plug-in, a
grant) and its entries commit in one transaction: both or neither.

Files (bundle files, accepted adapters, partial uploads) are not here: ``blobs.BlobStore`` holds them
by sha256.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum


def utc_now() -> str:
    """Time stamps in records: RFC 3339, UTC, to the microsecond (they sort as strings)."""
    return utc_at(dt.datetime.now(dt.timezone.utc).timestamp())


def utc_at(seconds: float) -> str:
    """The record time stamp of ``seconds`` since the epoch."""
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class SubmissionState(str, Enum):
    UPLOADING = "uploading"  # bytes still arriving
    RECEIVED = "received"  # every byte durable; checks not finished
    REJECTED = "rejected"  # a check failed; its files are gone
    ACCEPTED = "accepted"  # every check passed; files in the blob store
    PLUGGED = "plugged"  # the owner plugged it in
    EXPIRED = "expired"  # abandoned: no byte for longer than the upload TTL; its partial files are gone


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    cert_sha256: str  # the pin: sha256 of the DER certificate issued at enrolment
    cert_pem: bytes
    receipt_key: str  # the data owner's Ed25519 public key (base64 of the raw 32 bytes)
    receipt_key_fingerprint: str
    enrolled_at: str
    revoked_at: str | None = None
    revoked_reason: str | None = None


@dataclass(frozen=True)
class BundleRecord:
    bundle_id: str  # sha256 of manifest
    manifest: bytes  # exact bytes of manifest.json
    signature: bytes | None  # exact bytes of manifest.sig, once published
    recorded_at: str


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    bundle_id: str
    max_epsilon: float
    max_delta: float
    allow_no_dp: bool
    max_adapter_bytes: int
    clients: tuple[str, ...]
    published_at: str


@dataclass(frozen=True)
class DeclaredFile:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class SubmissionRecord:
    submission_id: str
    client_id: str
    job_id: str
    bundle_id: str
    state: SubmissionState
    files: tuple[DeclaredFile, ...]  # in upload order
    nonce: str
    envelope: bytes  # the signed envelope's exact bytes and its signature
    envelope_signature: bytes
    created_at: str
    committed: int = 0  # bytes durably stored; never decreases
    reason: str = ""
    received_at: str | None = None
    decided_at: str | None = None
    plugged_at: str | None = None
    adapter_sha256: str = ""
    dataset_id: str = ""  # from the receipt; "" for a non-private adapter
    epsilon: float = 0.0  # the receipt's cumulative ε (PRV upper) on dataset_id
    delta: float = 0.0
    receipt: bytes | None = None  # exact bytes of receipt.json and receipt.sig, once accepted
    receipt_signature: bytes | None = None
    plugged_into: str = ""
    ledger_checkpoint: bytes | None = None  # the owner's signed checkpoint of its ledger entry, once accepted
    active_at: str = ""  # when the upload opened or last committed a byte (what expiry goes by)

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class UploadQuota:
    """What one client's open (uploading) submissions may add up to; checked when one opens."""

    max_open: int
    max_bytes: int  # the sum of their declared sizes


@dataclass(frozen=True)
class Decision:
    """What the checks concluded about a received submission."""

    state: SubmissionState  # ACCEPTED or REJECTED
    reason: str = ""
    adapter_sha256: str = ""
    dataset_id: str = ""
    epsilon: float = 0.0
    delta: float = 0.0
    receipt: bytes | None = None
    receipt_signature: bytes | None = None


@dataclass(frozen=True)
class LedgerRow:
    """One ledger entry as stored: its exact bytes and signature, and the columns it is found by."""

    index: int
    entry: bytes  # canonical JSON (offsite.formats.ledger)
    signature: bytes  # raw Ed25519, by the owner's key
    hash: str  # sha256 of entry
    kind: str
    client_id: str = ""
    dataset_id: str = ""
    submission_id: str = ""


@dataclass(frozen=True)
class LedgerHead:
    index: int
    hash: str
    ledger_id: str  # the hash of entry 0


@dataclass(frozen=True)
class LedgerAppend:
    """What an ``EntryMaker`` adds: entries (their indices continue the ledger), and for an accepted
    submission the signed checkpoint of its entry, stored with the submission."""

    rows: tuple[LedgerRow, ...]
    checkpoint: bytes | None = None


#: Builds the entries of one change inside its write transaction, from the ledger's head (None while
#: the ledger is empty) and, when it opens the ledger, the clients enrolled so far (a callable, so it is
#: read only then). Signing happens here, so the chain can never fork between reading the head and writing.
EntryMaker = Callable[[LedgerHead | None, Callable[[], list[ClientRecord]]], LedgerAppend]

#: Kinds of entries that decide a (client, dataset)'s budget.
BUDGET_KINDS = ("grant", "submission")


@dataclass(frozen=True)
class LedgerScope:
    """A precondition: the last budget entry (grant or submission) of ``(client_id, dataset_id)`` is still
    ``mark`` (-1: none). A budget decision made on that state commits only if it still holds."""

    client_id: str
    dataset_id: str
    mark: int


class Storage(abc.ABC):
    """The owner's records. Raises NotFoundError, AlreadyExistsError, ReplayError, OffsiteError."""

    # -- clients ------------------------------------------------------------------------------
    @abc.abstractmethod
    def add_client(self, client: ClientRecord, ledger: EntryMaker | None = None) -> None:
        """AlreadyExistsError if the client id (or the certificate) is known; ``ledger``'s entries are
        appended in the same transaction."""

    @abc.abstractmethod
    def get_client(self, client_id: str) -> ClientRecord: ...

    @abc.abstractmethod
    def client_by_cert(self, cert_sha256: str) -> ClientRecord | None:
        """The client pinned to this certificate, revoked or not; None if nobody is."""

    @abc.abstractmethod
    def list_clients(self) -> list[ClientRecord]: ...

    @abc.abstractmethod
    def revoke_client(self, client_id: str, reason: str, ledger: EntryMaker | None = None) -> ClientRecord:
        """Mark revoked (idempotent: a second revocation keeps the first time and reason, and appends no
        entry); ``ledger``'s entries are appended with the first revocation, in its transaction."""

    @abc.abstractmethod
    def revoked_certs(self) -> frozenset[str]:
        """The pins of every revoked certificate (the server polls this to end open streams)."""

    # -- bundles and jobs -----------------------------------------------------------------------
    @abc.abstractmethod
    def record_bundle(self, bundle_id: str, manifest: bytes) -> BundleRecord:
        """Keep an issued bundle's manifest (idempotent for the same bytes)."""

    @abc.abstractmethod
    def sign_bundle(self, bundle_id: str, signature: bytes) -> None: ...

    @abc.abstractmethod
    def get_bundle(self, bundle_id: str) -> BundleRecord: ...

    @abc.abstractmethod
    def add_job(self, job: JobRecord) -> None:
        """AlreadyExistsError if the job id is taken; NotFoundError for an unknown bundle or client."""

    @abc.abstractmethod
    def get_job(self, job_id: str) -> JobRecord: ...

    @abc.abstractmethod
    def jobs_for_client(self, client_id: str) -> list[JobRecord]: ...

    @abc.abstractmethod
    def list_jobs(self) -> list[JobRecord]: ...

    # -- submissions ----------------------------------------------------------------------------
    @abc.abstractmethod
    def add_submission(self, submission: SubmissionRecord, quota: UploadQuota | None = None) -> None:
        """Record a new upload session and its nonce in one transaction (ReplayError if seen; QuotaError,
        nothing recorded, if the client's open submissions with this one would exceed ``quota``)."""

    @abc.abstractmethod
    def expire_submission(self, submission_id: str, idle_before: str, reason: str) -> SubmissionRecord | None:
        """UPLOADING -> EXPIRED if its last activity (``active_at``) is before ``idle_before``; None (and
        nothing changed) otherwise. The caller removes its partial files after."""

    @abc.abstractmethod
    def get_submission(self, submission_id: str) -> SubmissionRecord: ...

    @abc.abstractmethod
    def set_committed(self, submission_id: str, committed: int) -> int:
        """Raise the committed size (never lowers it; a rise is activity: ``active_at`` becomes now);
        return the stored value."""

    @abc.abstractmethod
    def mark_received(self, submission_id: str) -> SubmissionRecord:
        """UPLOADING -> RECEIVED once every byte is durable (idempotent)."""

    @abc.abstractmethod
    def decide(
        self,
        submission_id: str,
        decision: Decision,
        ledger: EntryMaker | None = None,
        scope: LedgerScope | None = None,
    ) -> SubmissionRecord:
        """RECEIVED -> ACCEPTED or REJECTED (once: a decided submission keeps its decision).

        An acceptance with ``ledger`` appends its entries and stores the checkpoint in the same
        transaction; with ``scope``, it first checks the precondition and raises LedgerConflictError
        (nothing changed) if another budget entry of the pair was appended since."""

    @abc.abstractmethod
    def mark_plugged(
        self, submission_id: str, into: str, ledger: EntryMaker | None = None
    ) -> SubmissionRecord:
        """ACCEPTED -> PLUGGED (PLUGGED again is allowed: a model may be merged twice); ``ledger``'s
        entries in the same transaction."""

    @abc.abstractmethod
    def list_submissions(
        self,
        *,
        job_id: str | None = None,
        client_id: str | None = None,
        states: Sequence[SubmissionState] | None = None,
    ) -> list[SubmissionRecord]:
        """Oldest first."""

    @abc.abstractmethod
    def accepted_receipts(self, client_id: str, dataset_id: str | None = None) -> list[SubmissionRecord]:
        """Accepted (and plugged) submissions of ``client_id`` that carry a receipt, oldest first."""

    # -- the ledger (append-only; entries are made and signed by offsite.server.ledger) ------------
    @abc.abstractmethod
    def append_ledger(self, maker: EntryMaker, scope: LedgerScope | None = None) -> tuple[LedgerRow, ...]:
        """Append ``maker``'s entries in one transaction (after checking ``scope``, as ``decide`` does)."""

    @abc.abstractmethod
    def ledger_head(self) -> LedgerHead | None: ...

    @abc.abstractmethod
    def ledger_rows(self, start: int = 0, stop: int | None = None) -> list[LedgerRow]:
        """Entries ``start`` ≤ index < ``stop`` in order (all of them by default)."""

    @abc.abstractmethod
    def ledger_scope(self, client_id: str, dataset_id: str) -> list[LedgerRow]:
        """The budget entries (grants, accepted submissions) of one (client, dataset), in order."""

    @abc.abstractmethod
    def ledger_datasets(self, client_id: str) -> list[str]:
        """Dataset ids with budget entries of ``client_id``, sorted."""

    @abc.abstractmethod
    def ledger_snapshot(self) -> tuple[list[LedgerRow], list[ClientRecord]]:
        """Every entry and every client, read in one consistent snapshot (for the export: a client and
        its enrolment entry are both in it or neither)."""

    @abc.abstractmethod
    def close(self) -> None: ...
