"""Writing the owner's privacy ledger: entries made and signed inside the transaction of the change they
record, the checkpoints handed to data owners, and the export for auditors.

The format (entries, checkpoints, export) is core: ``offsite.formats.ledger``, so that an auditor verifies
a ledger without this package. Here: which records each change appends (``*_record``), the
``EntryMaker`` that the storage calls with the ledger's head inside its write transaction (so indices
and hashes can never fork between reading the head and writing), and the owner's key that signs.

The ledger opens with entry 0 (``open``: the owner's public key) followed by an ``enrol`` entry for each
client enrolled before it existed (``before_ledger``: true); ``owner init`` opens it, and any first
append does on a state made by an older version.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from offsite import crypto
from offsite.formats import ledger as fmt
from offsite.server.storage.base import (
    ClientRecord,
    EntryMaker,
    LedgerAppend,
    LedgerHead,
    LedgerRow,
    Storage,
    SubmissionRecord,
    utc_now,
)

# ------------------------------------------------------------------------------------------ records


def open_record(key: Ed25519PrivateKey) -> dict[str, Any]:
    public = key.public_key()
    return {
        "kind": "open",
        "owner_key": crypto.public_key_to_b64(public),
        "owner_key_fingerprint": crypto.public_key_fingerprint(public),
    }


def enrol_record(client: ClientRecord, before_ledger: bool = False) -> dict[str, Any]:
    return {
        "kind": "enrol",
        "client_id": client.client_id,
        "receipt_key": client.receipt_key,
        "receipt_key_fingerprint": client.receipt_key_fingerprint,
        "cert_sha256": client.cert_sha256,
        "enrolled_at": client.enrolled_at,
        "before_ledger": before_ledger,
    }


def grant_record(client_id: str, dataset_id: str, epsilon: float, delta: float) -> dict[str, Any]:
    return {
        "kind": "grant",
        "client_id": client_id,
        "dataset_id": dataset_id,
        "epsilon": float(epsilon),
        "delta": float(delta),
    }


def submission_record(
    submission: SubmissionRecord,
    adapter_sha256: str,
    *,
    dataset_id: str | None,
    receipt: bytes | None,
    receipt_signature: bytes | None,
    grant_index: int | None,
    spent: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """An accepted submission; ``receipt_signature`` is the raw 64-byte signature (not receipt.sig's text)."""
    return {
        "kind": "submission",
        "submission_id": submission.submission_id,
        "client_id": submission.client_id,
        "job_id": submission.job_id,
        "bundle_id": submission.bundle_id,
        "adapter_sha256": adapter_sha256,
        "dataset_id": dataset_id,
        "receipt": fmt.b64(receipt) if receipt is not None else None,
        "receipt_signature": fmt.b64(receipt_signature) if receipt_signature is not None else None,
        "grant_index": grant_index,
        "spent": dict(spent) if spent is not None else None,
    }


def plug_record(submission: SubmissionRecord) -> dict[str, Any]:
    return {
        "kind": "plug",
        "submission_id": submission.submission_id,
        "client_id": submission.client_id,
        "adapter_sha256": submission.adapter_sha256,
    }


def revoke_record(client: ClientRecord, reason: str) -> dict[str, Any]:
    return {
        "kind": "revoke",
        "client_id": client.client_id,
        "cert_sha256": client.cert_sha256,
        "reason": reason[:1000],
    }


# ------------------------------------------------------------------------------------------ the writer


class LedgerWriter:
    """Makes and signs entries with the owner's key."""

    def __init__(self, storage: Storage, key: Ed25519PrivateKey, clock: Callable[[], str] = utc_now):
        self.storage = storage
        self.key = key
        self._clock = clock

    @property
    def public_key(self):
        return self.key.public_key()

    def _rows(
        self,
        head: LedgerHead | None,
        clients: Callable[[], list[ClientRecord]],
        records: tuple[Mapping[str, Any], ...],
    ) -> list[LedgerRow]:
        pending = list(records)
        if head is None:
            pending = [open_record(self.key), *(enrol_record(c, True) for c in clients()), *pending]
        index, prev = (0, fmt.GENESIS_PREV) if head is None else (head.index + 1, head.hash)
        rows = []
        for record in pending:
            body = fmt.build_entry(index, prev, self._clock(), record)
            digest = fmt.entry_hash(body)
            rows.append(
                LedgerRow(
                    index=index,
                    entry=body,
                    signature=fmt.sign_entry(self.key, body),
                    hash=digest,
                    kind=record["kind"],
                    client_id=record.get("client_id") or "",
                    dataset_id=record.get("dataset_id") or "",
                    submission_id=record.get("submission_id") or "",
                )
            )
            index, prev = index + 1, digest
        return rows

    def maker(self, *records: Mapping[str, Any], checkpoint: bool = False) -> EntryMaker:
        """The EntryMaker appending ``records`` (opening the ledger first if it is empty); with
        ``checkpoint``, it also signs a checkpoint of its last entry."""

        def make(head: LedgerHead | None, clients: Callable[[], list[ClientRecord]]) -> LedgerAppend:
            rows = self._rows(head, clients, records)
            signed = None
            if checkpoint and rows:
                ledger_id = rows[0].hash if head is None else head.ledger_id
                signed = fmt.make_checkpoint(
                    self.key, ledger_id, rows[-1].index, rows[-1].hash, self._clock()
                )
            return LedgerAppend(tuple(rows), signed)

        return make

    def open(self) -> None:
        """Open the ledger (entry 0 and the clients enrolled so far) if it is empty; else nothing."""
        if self.storage.ledger_head() is None:
            self.storage.append_ledger(self.maker())

    def checkpoint(self) -> bytes | None:
        """A signed checkpoint of the ledger's head now (None while it is empty)."""
        head = self.storage.ledger_head()
        if head is None:
            return None
        return fmt.make_checkpoint(self.key, head.ledger_id, head.index, head.hash, self._clock())

    def export(self) -> bytes:
        """The signed export file: every entry, the owner key, the clients as recorded."""
        rows, recorded = self.storage.ledger_snapshot()
        clients = [
            {
                "client_id": c.client_id,
                "receipt_key": c.receipt_key,
                "receipt_key_fingerprint": c.receipt_key_fingerprint,
                "cert_sha256": c.cert_sha256,
                "enrolled_at": c.enrolled_at,
                "revoked_at": c.revoked_at,
            }
            for c in recorded
        ]
        return fmt.make_export(self.key, self._clock(), [(r.entry, r.signature) for r in rows], clients)
