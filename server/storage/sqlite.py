"""The embedded backend: one SQLite file in the owner's state directory.

* WAL journal (readers never block the writer), ``synchronous=FULL`` (a committed transaction
  survives a power cut, not only a crash of the process), foreign keys on.
* Every write transaction begins with ``BEGIN IMMEDIATE``: it takes the write lock up front, so a
  transaction that reads and then writes can never fail half-way with SQLITE_BUSY (a deferred one
  can, whatever the busy timeout); other writers wait up to ``BUSY_TIMEOUT_MS``.
* One connection per thread (the server serves calls from a thread pool), all closed by ``close``.
* The schema version is ``PRAGMA user_version``; ``_MIGRATIONS[i]`` takes version i to i + 1 (a
  script split at ``;``, or a tuple of statements when one holds a ``;``, like a trigger).
* The ledger table is append-only: triggers refuse every UPDATE and DELETE on it (the chain and the
  owner's signatures are what make tampering evident; the triggers keep mistakes out).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from offsite.errors import OffsiteError
from offsite.formats.ledger import LEDGER_TABLE
from offsite.server.errors import (
    AlreadyExistsError,
    LedgerConflictError,
    NotFoundError,
    QuotaError,
    ReplayError,
)
from offsite.server.storage.base import (
    BUDGET_KINDS,
    BundleRecord,
    ClientRecord,
    Decision,
    DeclaredFile,
    EntryMaker,
    JobRecord,
    LedgerHead,
    LedgerRow,
    LedgerScope,
    Storage,
    SubmissionRecord,
    SubmissionState,
    UploadQuota,
    utc_now,
)

BUSY_TIMEOUT_MS = 30_000

_MIGRATIONS = (
    """
    CREATE TABLE clients (
        client_id TEXT PRIMARY KEY,
        cert_sha256 TEXT NOT NULL UNIQUE,
        cert_pem BLOB NOT NULL,
        receipt_key TEXT NOT NULL,
        receipt_key_fingerprint TEXT NOT NULL,
        enrolled_at TEXT NOT NULL,
        revoked_at TEXT,
        revoked_reason TEXT
    );
    CREATE TABLE bundles (
        bundle_id TEXT PRIMARY KEY,
        manifest BLOB NOT NULL,
        signature BLOB,
        recorded_at TEXT NOT NULL
    );
    CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY,
        bundle_id TEXT NOT NULL REFERENCES bundles(bundle_id),
        max_epsilon REAL NOT NULL,
        max_delta REAL NOT NULL,
        allow_no_dp INTEGER NOT NULL,
        max_adapter_bytes INTEGER NOT NULL,
        published_at TEXT NOT NULL
    );
    CREATE TABLE job_clients (
        job_id TEXT NOT NULL REFERENCES jobs(job_id),
        client_id TEXT NOT NULL REFERENCES clients(client_id),
        PRIMARY KEY (job_id, client_id)
    );
    CREATE TABLE nonces (
        nonce TEXT PRIMARY KEY,
        client_id TEXT NOT NULL,
        seen_at TEXT NOT NULL
    );
    CREATE TABLE submissions (
        submission_id TEXT PRIMARY KEY,
        client_id TEXT NOT NULL REFERENCES clients(client_id),
        job_id TEXT NOT NULL REFERENCES jobs(job_id),
        bundle_id TEXT NOT NULL,
        state TEXT NOT NULL,
        files TEXT NOT NULL,
        nonce TEXT NOT NULL UNIQUE REFERENCES nonces(nonce),
        envelope BLOB NOT NULL,
        envelope_signature BLOB NOT NULL,
        created_at TEXT NOT NULL,
        committed INTEGER NOT NULL DEFAULT 0,
        reason TEXT NOT NULL DEFAULT '',
        received_at TEXT,
        decided_at TEXT,
        plugged_at TEXT,
        plugged_into TEXT NOT NULL DEFAULT '',
        adapter_sha256 TEXT NOT NULL DEFAULT '',
        dataset_id TEXT NOT NULL DEFAULT '',
        epsilon REAL NOT NULL DEFAULT 0,
        delta REAL NOT NULL DEFAULT 0,
        receipt BLOB,
        receipt_signature BLOB
    );
    CREATE INDEX submissions_by_client_dataset ON submissions (client_id, dataset_id, state);
    CREATE INDEX submissions_by_job ON submissions (job_id);
    """,
    (
        f"""CREATE TABLE {LEDGER_TABLE} (
            seq INTEGER PRIMARY KEY,
            entry BLOB NOT NULL,
            signature BLOB NOT NULL,
            hash TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL,
            client_id TEXT NOT NULL DEFAULT '',
            dataset_id TEXT NOT NULL DEFAULT '',
            submission_id TEXT NOT NULL DEFAULT ''
        )""",
        f"CREATE INDEX ledger_by_scope ON {LEDGER_TABLE} (client_id, dataset_id, kind)",
        f"""CREATE TRIGGER ledger_no_update BEFORE UPDATE ON {LEDGER_TABLE}
            BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END""",
        f"""CREATE TRIGGER ledger_no_delete BEFORE DELETE ON {LEDGER_TABLE}
            BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END""",
        "ALTER TABLE submissions ADD COLUMN ledger_checkpoint BLOB",
    ),
    # When an upload last made progress (expiry of abandoned uploads); NULL on older rows: created_at.
    ("ALTER TABLE submissions ADD COLUMN active_at TEXT",),
)


class SQLiteStorage(Storage):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._migrate()

    # -- connections and transactions ----------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise OffsiteError("the owner's database is closed")
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN")  # one consistent snapshot for multi-statement reads
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(_MIGRATIONS):
                raise OffsiteError(
                    f"{self.path} has schema version {version}, newer than this offsite knows "
                    f"({len(_MIGRATIONS)}): upgrade offsite"
                )
            for i in range(version, len(_MIGRATIONS)):
                migration = _MIGRATIONS[i]
                statements = migration.split(";") if isinstance(migration, str) else migration
                for statement in statements:
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {len(_MIGRATIONS)}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conn in self._all:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()
        self._local = threading.local()

    # -- clients ----------------------------------------------------------------------------------
    @staticmethod
    def _client(row: sqlite3.Row) -> ClientRecord:
        return ClientRecord(
            client_id=row["client_id"],
            cert_sha256=row["cert_sha256"],
            cert_pem=bytes(row["cert_pem"]),
            receipt_key=row["receipt_key"],
            receipt_key_fingerprint=row["receipt_key_fingerprint"],
            enrolled_at=row["enrolled_at"],
            revoked_at=row["revoked_at"],
            revoked_reason=row["revoked_reason"],
        )

    def add_client(self, client: ClientRecord, ledger: EntryMaker | None = None) -> None:
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM clients WHERE client_id = ?", (client.client_id,)).fetchone():
                raise AlreadyExistsError(f"client {client.client_id!r} is enrolled already")
            if conn.execute("SELECT 1 FROM clients WHERE cert_sha256 = ?", (client.cert_sha256,)).fetchone():
                raise AlreadyExistsError("this certificate is pinned to another client already")
            if ledger is not None:  # before the insert: an opening ledger lists the clients enrolled before
                self._append(conn, ledger)
            conn.execute(
                "INSERT INTO clients VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    client.client_id,
                    client.cert_sha256,
                    client.cert_pem,
                    client.receipt_key,
                    client.receipt_key_fingerprint,
                    client.enrolled_at,
                    client.revoked_at,
                    client.revoked_reason,
                ),
            )

    def get_client(self, client_id: str) -> ClientRecord:
        row = self._conn().execute("SELECT * FROM clients WHERE client_id = ?", (client_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no client {client_id!r} is enrolled")
        return self._client(row)

    def client_by_cert(self, cert_sha256: str) -> ClientRecord | None:
        row = self._conn().execute("SELECT * FROM clients WHERE cert_sha256 = ?", (cert_sha256,)).fetchone()
        return self._client(row) if row else None

    def list_clients(self) -> list[ClientRecord]:
        rows = self._conn().execute("SELECT * FROM clients ORDER BY enrolled_at, client_id").fetchall()
        return [self._client(r) for r in rows]

    def revoke_client(self, client_id: str, reason: str, ledger: EntryMaker | None = None) -> ClientRecord:
        with self._write() as conn:
            row = conn.execute("SELECT * FROM clients WHERE client_id = ?", (client_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no client {client_id!r} is enrolled")
            if row["revoked_at"] is None:
                if ledger is not None:
                    self._append(conn, ledger)
                conn.execute(
                    "UPDATE clients SET revoked_at = ?, revoked_reason = ? WHERE client_id = ?",
                    (utc_now(), reason, client_id),
                )
            row = conn.execute("SELECT * FROM clients WHERE client_id = ?", (client_id,)).fetchone()
        return self._client(row)

    def revoked_certs(self) -> frozenset[str]:
        rows = self._conn().execute("SELECT cert_sha256 FROM clients WHERE revoked_at IS NOT NULL")
        return frozenset(r[0] for r in rows)

    # -- bundles and jobs -----------------------------------------------------------------------
    @staticmethod
    def _bundle(row: sqlite3.Row) -> BundleRecord:
        sig = row["signature"]
        return BundleRecord(
            row["bundle_id"], bytes(row["manifest"]), bytes(sig) if sig else None, row["recorded_at"]
        )

    def record_bundle(self, bundle_id: str, manifest: bytes) -> BundleRecord:
        with self._write() as conn:
            row = conn.execute("SELECT * FROM bundles WHERE bundle_id = ?", (bundle_id,)).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO bundles (bundle_id, manifest, recorded_at) VALUES (?, ?, ?)",
                    (bundle_id, manifest, utc_now()),
                )
                row = conn.execute("SELECT * FROM bundles WHERE bundle_id = ?", (bundle_id,)).fetchone()
            elif bytes(row["manifest"]) != manifest:
                raise AlreadyExistsError(f"bundle {bundle_id[:12]}… is recorded with other manifest bytes")
        return self._bundle(row)

    def sign_bundle(self, bundle_id: str, signature: bytes) -> None:
        with self._write() as conn:
            cur = conn.execute("UPDATE bundles SET signature = ? WHERE bundle_id = ?", (signature, bundle_id))
            if cur.rowcount == 0:
                raise NotFoundError(f"bundle {bundle_id[:12]}… is not recorded")

    def get_bundle(self, bundle_id: str) -> BundleRecord:
        row = self._conn().execute("SELECT * FROM bundles WHERE bundle_id = ?", (bundle_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"bundle {bundle_id[:12]}… is not in this owner's record of issued bundles")
        return self._bundle(row)

    def _job(self, conn: sqlite3.Connection, row: sqlite3.Row) -> JobRecord:
        clients = conn.execute(
            "SELECT client_id FROM job_clients WHERE job_id = ? ORDER BY client_id", (row["job_id"],)
        ).fetchall()
        return JobRecord(
            job_id=row["job_id"],
            bundle_id=row["bundle_id"],
            max_epsilon=row["max_epsilon"],
            max_delta=row["max_delta"],
            allow_no_dp=bool(row["allow_no_dp"]),
            max_adapter_bytes=row["max_adapter_bytes"],
            clients=tuple(r[0] for r in clients),
            published_at=row["published_at"],
        )

    def add_job(self, job: JobRecord) -> None:
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job.job_id,)).fetchone():
                raise AlreadyExistsError(f"job {job.job_id!r} exists already")
            if not conn.execute("SELECT 1 FROM bundles WHERE bundle_id = ?", (job.bundle_id,)).fetchone():
                raise NotFoundError(f"bundle {job.bundle_id[:12]}… is not recorded")
            for client_id in job.clients:
                if not conn.execute("SELECT 1 FROM clients WHERE client_id = ?", (client_id,)).fetchone():
                    raise NotFoundError(f"no client {client_id!r} is enrolled")
            conn.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    job.job_id,
                    job.bundle_id,
                    job.max_epsilon,
                    job.max_delta,
                    int(job.allow_no_dp),
                    job.max_adapter_bytes,
                    job.published_at,
                ),
            )
            conn.executemany(
                "INSERT INTO job_clients VALUES (?, ?)", [(job.job_id, c) for c in sorted(set(job.clients))]
            )

    def get_job(self, job_id: str) -> JobRecord:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no job {job_id!r}")
            return self._job(conn, row)

    def jobs_for_client(self, client_id: str) -> list[JobRecord]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT jobs.* FROM jobs JOIN job_clients USING (job_id) WHERE client_id = ? "
                "ORDER BY published_at, job_id",
                (client_id,),
            ).fetchall()
            return [self._job(conn, r) for r in rows]

    def list_jobs(self) -> list[JobRecord]:
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM jobs ORDER BY published_at, job_id").fetchall()
            return [self._job(conn, r) for r in rows]

    # -- submissions ------------------------------------------------------------------------------
    @staticmethod
    def _submission(row: sqlite3.Row) -> SubmissionRecord:
        files = tuple(DeclaredFile(**f) for f in json.loads(row["files"]))
        blob = lambda k: bytes(row[k]) if row[k] is not None else None  # noqa: E731
        return SubmissionRecord(
            submission_id=row["submission_id"],
            client_id=row["client_id"],
            job_id=row["job_id"],
            bundle_id=row["bundle_id"],
            state=SubmissionState(row["state"]),
            files=files,
            nonce=row["nonce"],
            envelope=bytes(row["envelope"]),
            envelope_signature=bytes(row["envelope_signature"]),
            created_at=row["created_at"],
            committed=row["committed"],
            reason=row["reason"],
            received_at=row["received_at"],
            decided_at=row["decided_at"],
            plugged_at=row["plugged_at"],
            plugged_into=row["plugged_into"],
            adapter_sha256=row["adapter_sha256"],
            dataset_id=row["dataset_id"],
            epsilon=row["epsilon"],
            delta=row["delta"],
            receipt=blob("receipt"),
            receipt_signature=blob("receipt_signature"),
            ledger_checkpoint=blob("ledger_checkpoint"),
            active_at=row["active_at"] or row["created_at"],
        )

    def add_submission(self, submission: SubmissionRecord, quota: UploadQuota | None = None) -> None:
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM nonces WHERE nonce = ?", (submission.nonce,)).fetchone():
                raise ReplayError("this submission's nonce was used before: a replayed request is refused")
            if quota is not None:
                self._check_quota(conn, submission, quota)
            conn.execute(
                "INSERT INTO nonces VALUES (?, ?, ?)",
                (submission.nonce, submission.client_id, submission.created_at),
            )
            files = json.dumps([f.__dict__ for f in submission.files])
            conn.execute(
                "INSERT INTO submissions (submission_id, client_id, job_id, bundle_id, state, files, nonce, "
                "envelope, envelope_signature, created_at, committed, active_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    submission.submission_id,
                    submission.client_id,
                    submission.job_id,
                    submission.bundle_id,
                    submission.state.value,
                    files,
                    submission.nonce,
                    submission.envelope,
                    submission.envelope_signature,
                    submission.created_at,
                    submission.committed,
                    submission.created_at,
                ),
            )

    @staticmethod
    def _check_quota(conn: sqlite3.Connection, submission: SubmissionRecord, quota: UploadQuota) -> None:
        rows = conn.execute(
            "SELECT files FROM submissions WHERE client_id = ? AND state = ?",
            (submission.client_id, SubmissionState.UPLOADING.value),
        ).fetchall()
        if len(rows) + 1 > quota.max_open:
            raise QuotaError(
                f"client {submission.client_id} has {len(rows)} open uploads, the most it may have"
            )
        held = sum(f["size"] for r in rows for f in json.loads(r["files"]))
        if held + submission.total > quota.max_bytes:
            raise QuotaError(
                f"client {submission.client_id}'s open uploads declare {held} bytes; this one's {submission.total} "
                f"more would pass its quota of {quota.max_bytes} bytes"
            )

    def expire_submission(self, submission_id: str, idle_before: str, reason: str) -> SubmissionRecord | None:
        with self._write() as conn:
            current = self._get(conn, submission_id)
            if current.state != SubmissionState.UPLOADING or current.active_at >= idle_before:
                return None
            conn.execute(
                "UPDATE submissions SET state = ?, reason = ?, decided_at = ? WHERE submission_id = ?",
                (SubmissionState.EXPIRED.value, reason, utc_now(), submission_id),
            )
            return self._get(conn, submission_id)

    def _get(self, conn: sqlite3.Connection, submission_id: str) -> SubmissionRecord:
        row = conn.execute("SELECT * FROM submissions WHERE submission_id = ?", (submission_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no submission {submission_id!r}")
        return self._submission(row)

    def get_submission(self, submission_id: str) -> SubmissionRecord:
        return self._get(self._conn(), submission_id)

    def set_committed(self, submission_id: str, committed: int) -> int:
        with self._write() as conn:
            current = self._get(conn, submission_id)
            if committed > current.total:
                raise OffsiteError(f"committed size {committed} is past the declared {current.total} bytes")
            if committed > current.committed:
                conn.execute(
                    "UPDATE submissions SET committed = ?, active_at = ? WHERE submission_id = ?",
                    (committed, utc_now(), submission_id),
                )
            return max(committed, current.committed)

    def mark_received(self, submission_id: str) -> SubmissionRecord:
        with self._write() as conn:
            current = self._get(conn, submission_id)
            if current.state == SubmissionState.UPLOADING:
                if current.committed != current.total:
                    raise OffsiteError(
                        f"submission {submission_id}: {current.committed} of {current.total} bytes committed"
                    )
                conn.execute(
                    "UPDATE submissions SET state = ?, received_at = ? WHERE submission_id = ?",
                    (SubmissionState.RECEIVED.value, utc_now(), submission_id),
                )
            return self._get(conn, submission_id)

    def decide(
        self,
        submission_id: str,
        decision: Decision,
        ledger: EntryMaker | None = None,
        scope: LedgerScope | None = None,
    ) -> SubmissionRecord:
        if decision.state not in (SubmissionState.ACCEPTED, SubmissionState.REJECTED):
            raise OffsiteError(f"a decision is accepted or rejected, not {decision.state.value}")
        with self._write() as conn:
            current = self._get(conn, submission_id)
            if current.state in (SubmissionState.UPLOADING, SubmissionState.RECEIVED):
                checkpoint = None
                if decision.state == SubmissionState.ACCEPTED and ledger is not None:
                    self._check_scope(conn, scope)
                    checkpoint = self._append(conn, ledger)
                conn.execute(
                    "UPDATE submissions SET state = ?, reason = ?, decided_at = ?, adapter_sha256 = ?, "
                    "dataset_id = ?, epsilon = ?, delta = ?, receipt = ?, receipt_signature = ? "
                    "WHERE submission_id = ?",
                    (
                        decision.state.value,
                        decision.reason,
                        utc_now(),
                        decision.adapter_sha256,
                        decision.dataset_id,
                        decision.epsilon,
                        decision.delta,
                        decision.receipt,
                        decision.receipt_signature,
                        submission_id,
                    ),
                )
                if checkpoint is not None:
                    conn.execute(
                        "UPDATE submissions SET ledger_checkpoint = ? WHERE submission_id = ?",
                        (checkpoint, submission_id),
                    )
            return self._get(conn, submission_id)

    def mark_plugged(
        self, submission_id: str, into: str, ledger: EntryMaker | None = None
    ) -> SubmissionRecord:
        with self._write() as conn:
            current = self._get(conn, submission_id)
            if current.state not in (SubmissionState.ACCEPTED, SubmissionState.PLUGGED):
                raise OffsiteError(
                    f"submission {submission_id} is {current.state.value}: only accepted ones can be plugged in"
                )
            if ledger is not None:
                self._append(conn, ledger)
            conn.execute(
                "UPDATE submissions SET state = ?, plugged_at = ?, plugged_into = ? WHERE submission_id = ?",
                (SubmissionState.PLUGGED.value, utc_now(), into, submission_id),
            )
            return self._get(conn, submission_id)

    def list_submissions(
        self,
        *,
        job_id: str | None = None,
        client_id: str | None = None,
        states: Sequence[SubmissionState] | None = None,
    ) -> list[SubmissionRecord]:
        where, args = [], []
        if job_id is not None:
            where.append("job_id = ?")
            args.append(job_id)
        if client_id is not None:
            where.append("client_id = ?")
            args.append(client_id)
        if states is not None:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args.extend(s.value for s in states)
        sql = "SELECT * FROM submissions" + (f" WHERE {' AND '.join(where)}" if where else "")
        rows = self._conn().execute(sql + " ORDER BY created_at, submission_id", args).fetchall()
        return [self._submission(r) for r in rows]

    def accepted_receipts(self, client_id: str, dataset_id: str | None = None) -> list[SubmissionRecord]:
        sql = "SELECT * FROM submissions WHERE client_id = ? AND state IN (?, ?) AND receipt IS NOT NULL"
        args: list = [client_id, SubmissionState.ACCEPTED.value, SubmissionState.PLUGGED.value]
        if dataset_id is not None:
            sql += " AND dataset_id = ?"
            args.append(dataset_id)
        rows = self._conn().execute(sql + " ORDER BY decided_at, submission_id", args).fetchall()
        return [self._submission(r) for r in rows]

    # -- the ledger -------------------------------------------------------------------------------
    @staticmethod
    def _row(row: sqlite3.Row) -> LedgerRow:
        return LedgerRow(
            index=row["seq"],
            entry=bytes(row["entry"]),
            signature=bytes(row["signature"]),
            hash=row["hash"],
            kind=row["kind"],
            client_id=row["client_id"],
            dataset_id=row["dataset_id"],
            submission_id=row["submission_id"],
        )

    @staticmethod
    def _head(conn: sqlite3.Connection) -> LedgerHead | None:
        row = conn.execute(f"SELECT seq, hash FROM {LEDGER_TABLE} ORDER BY seq DESC LIMIT 1").fetchone()
        if row is None:
            return None
        first = conn.execute(f"SELECT hash FROM {LEDGER_TABLE} WHERE seq = 0").fetchone()
        return LedgerHead(row["seq"], row["hash"], first["hash"] if first else "")

    def _append(self, conn: sqlite3.Connection, maker: EntryMaker) -> bytes | None:
        """Insert ``maker``'s entries after the head (inside the caller's write transaction); return
        the checkpoint it made, if any."""
        head = self._head(conn)
        made = maker(
            head, lambda: [self._client(r) for r in conn.execute("SELECT * FROM clients ORDER BY rowid")]
        )
        expected = 0 if head is None else head.index + 1
        for i, row in enumerate(made.rows):
            if row.index != expected + i:
                raise OffsiteError(
                    f"ledger entry {row.index} does not follow the head ({expected + i} expected)"
                )
            conn.execute(
                f"INSERT INTO {LEDGER_TABLE} (seq, entry, signature, hash, kind, client_id, dataset_id, "
                "submission_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.index,
                    row.entry,
                    row.signature,
                    row.hash,
                    row.kind,
                    row.client_id,
                    row.dataset_id,
                    row.submission_id,
                ),
            )
        return made.checkpoint

    @staticmethod
    def _mark(conn: sqlite3.Connection, client_id: str, dataset_id: str) -> int:
        row = conn.execute(
            f"SELECT MAX(seq) FROM {LEDGER_TABLE} WHERE client_id = ? AND dataset_id = ? "
            f"AND kind IN ({', '.join('?' * len(BUDGET_KINDS))})",
            (client_id, dataset_id, *BUDGET_KINDS),
        ).fetchone()
        return -1 if row[0] is None else row[0]

    def _check_scope(self, conn: sqlite3.Connection, scope: LedgerScope | None) -> None:
        if scope is not None and self._mark(conn, scope.client_id, scope.dataset_id) != scope.mark:
            raise LedgerConflictError(
                f"the ledger of {scope.client_id}/{scope.dataset_id} changed while the decision was made"
            )

    def append_ledger(self, maker: EntryMaker, scope: LedgerScope | None = None) -> tuple[LedgerRow, ...]:
        with self._write() as conn:
            self._check_scope(conn, scope)
            before = self._head(conn)
            self._append(conn, maker)
            start = 0 if before is None else before.index + 1
            rows = conn.execute(f"SELECT * FROM {LEDGER_TABLE} WHERE seq >= ? ORDER BY seq", (start,))
            return tuple(self._row(r) for r in rows)

    def ledger_head(self) -> LedgerHead | None:
        with self._read() as conn:
            return self._head(conn)

    def ledger_rows(self, start: int = 0, stop: int | None = None) -> list[LedgerRow]:
        sql, args = f"SELECT * FROM {LEDGER_TABLE} WHERE seq >= ?", [start]
        if stop is not None:
            sql += " AND seq < ?"
            args.append(stop)
        with self._read() as conn:
            return [self._row(r) for r in conn.execute(sql + " ORDER BY seq", args)]

    def ledger_scope(self, client_id: str, dataset_id: str) -> list[LedgerRow]:
        rows = self._conn().execute(
            f"SELECT * FROM {LEDGER_TABLE} WHERE client_id = ? AND dataset_id = ? "
            f"AND kind IN ({', '.join('?' * len(BUDGET_KINDS))}) ORDER BY seq",
            (client_id, dataset_id, *BUDGET_KINDS),
        )
        return [self._row(r) for r in rows]

    def ledger_datasets(self, client_id: str) -> list[str]:
        rows = self._conn().execute(
            f"SELECT DISTINCT dataset_id FROM {LEDGER_TABLE} WHERE client_id = ? AND dataset_id != '' "
            f"AND kind IN ({', '.join('?' * len(BUDGET_KINDS))}) ORDER BY dataset_id",
            (client_id, *BUDGET_KINDS),
        )
        return [r[0] for r in rows]

    def ledger_snapshot(self) -> tuple[list[LedgerRow], list[ClientRecord]]:
        with self._read() as conn:
            rows = [self._row(r) for r in conn.execute(f"SELECT * FROM {LEDGER_TABLE} ORDER BY seq")]
            clients = conn.execute("SELECT * FROM clients ORDER BY enrolled_at, client_id").fetchall()
            return rows, [self._client(c) for c in clients]
