"""Building ledgers for the audit tests: a real owner state (init_owner: PKI, signing key, SQLite), data
owners with real Ed25519 receipt keys, receipts built and signed as `offsite client train` does (histories
chosen by the test, no training), and entries appended through the server's own ledger writer.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from offsite import crypto
from offsite.fileio import canonical_json
from offsite.formats import ledger as fmt
from offsite.privacy.accounting import make_entry
from offsite.privacy.receipt import build_receipt, first_run_budget
from offsite.server import budgets
from offsite.server import ledger as records
from offsite.server.owner_state import OwnerState, init_owner
from offsite.server.storage.base import ClientRecord, SubmissionRecord, SubmissionState, utc_now

BUCKET, NOMINAL = 128, 16
Q = NOMINAL / BUCKET
DELTA = 1e-4


@dataclass
class DataOwner:
    client_id: str
    key: Ed25519PrivateKey

    @property
    def record(self) -> ClientRecord:
        public = self.key.public_key()
        return ClientRecord(
            client_id=self.client_id,
            cert_sha256=crypto.public_key_fingerprint(public)[::-1],  # a distinct pin per client
            cert_pem=b"-----BEGIN CERTIFICATE-----\n",
            receipt_key=crypto.public_key_to_b64(public),
            receipt_key_fingerprint=crypto.public_key_fingerprint(public),
            enrolled_at=utc_now(),
        )


def new_owner(root: Path) -> Path:
    return init_owner(root, "localhost", 50051).root


def enrol(state: OwnerState, client_id: str) -> DataOwner:
    owner = DataOwner(client_id, Ed25519PrivateKey.generate())
    state.storage.add_client(owner.record, ledger=state.ledger.maker(records.enrol_record(owner.record)))
    return owner


def grant(state: OwnerState, client_id: str, dataset_id: str, epsilon: float, delta: float = DELTA) -> None:
    state.storage.append_ledger(
        state.ledger.maker(records.grant_record(client_id, dataset_id, epsilon, delta))
    )


def receipt(
    owner: DataOwner,
    dataset_id: str,
    runs: list[tuple[str, float, int]],
    *,
    delta: float = DELTA,
    seeded: bool = False,
    adapter_sha256: str = "a" * 64,
    bundle_id: str = "b" * 64,
    budget: float = 50.0,
    edit=None,
) -> tuple[bytes, bytes]:
    """A version-2 receipt over ``runs`` ((run id, σ, steps) at q = Q; the last run is "this run"), signed by
    ``owner``: its exact bytes and raw signature. ``edit(doc)`` changes the document before signing."""
    cumulative = [{"run_id": r, **make_entry(sigma, Q, n)} for r, sigma, n in runs]
    this = runs[-1][0]
    doc = build_receipt(
        run_history=[make_entry(sigma, Q, n) for r, sigma, n in runs if r == this],
        cumulative_history=cumulative,
        delta=delta,
        max_grad_norm=1.0,
        size_bucket=BUCKET,
        nominal_batch=NOMINAL,
        budget=first_run_budget(budget, delta, at="2025-06-01T12:00:00Z"),
        dataset_id=dataset_id,
        dataset_fingerprint="f" * 64,
        adapter_sha256=adapter_sha256,
        bundle_id=bundle_id,
        signer_public_key=owner.key.public_key(),
        run_id=this,
        noise_seeded=seeded,
    )
    if edit is not None:
        edit(doc)
    data = canonical_json(doc)
    return data, crypto.sign(owner.key, data)


def submission_row(client_id: str, job_id: str = "job") -> SubmissionRecord:
    return SubmissionRecord(
        submission_id=uuid.uuid4().hex,
        client_id=client_id,
        job_id=job_id,
        bundle_id="b" * 64,
        state=SubmissionState.ACCEPTED,
        files=(),
        nonce=os.urandom(32).hex(),
        envelope=b"{}",
        envelope_signature=b"",
        created_at=utc_now(),
        adapter_sha256="a" * 64,
    )


def accept(
    state: OwnerState,
    client_id: str,
    dataset_id: str | None,
    signed: tuple[bytes, bytes] | None,
    *,
    spent: dict | None = None,
    grant_index: int | None = None,
    check: bool = True,
) -> SubmissionRecord:
    """Append an accepted submission's entry. With ``check`` it must pass the server's admission (and the
    entry states what the server computes); without, it is written as given (an owner breaking the rules)."""
    row = submission_row(client_id)
    if signed is not None and check:
        doc = json.loads(signed[0])
        admission = budgets.admit(
            budgets.read(state.storage, client_id, dataset_id), doc["cumulative_history"]
        )
        spent, grant_index = admission.spent(), admission.view.grant.index
    entry = records.submission_record(
        row,
        row.adapter_sha256,
        dataset_id=dataset_id,
        receipt=signed[0] if signed else None,
        receipt_signature=signed[1] if signed else None,
        grant_index=grant_index,
        spent=spent,
    )
    state.storage.append_ledger(state.ledger.maker(entry))
    return row


def plug(state: OwnerState, submission: SubmissionRecord) -> None:
    state.storage.append_ledger(state.ledger.maker(records.plug_record(submission)))


def revoke(state: OwnerState, owner: DataOwner, reason: str = "test") -> None:
    state.storage.revoke_client(
        owner.client_id, reason, ledger=state.ledger.maker(records.revoke_record(owner.record, reason))
    )


def export_bytes(state: OwnerState) -> bytes:
    return state.ledger.export()


def checkpoint_at(state: OwnerState, index: int) -> bytes:
    rows = state.storage.ledger_rows()
    return fmt.make_checkpoint(state.ledger.key, rows[0].hash, index, rows[index].hash, utc_now())


# -- exports changed by a hand that does not hold the owner key (or does) -------------------------------


def load(data: bytes) -> dict:
    return json.loads(data)


def dump(doc: dict) -> bytes:
    return canonical_json(doc)


def resign_export(doc: dict, key: Ed25519PrivateKey) -> bytes:
    """An export whose entries are given as (entry bytes, signature) again signed over the whole by ``key``."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return canonical_json({**body, "signature": fmt.b64(crypto.sign(key, canonical_json(body)))})


def rechain(entries: list[dict], start: int, key: Ed25519PrivateKey) -> list[dict]:
    """Entries from ``start`` on given new indices and prev hashes and signed again with ``key`` (what an
    owner rewriting its history would do); earlier ones unchanged."""
    out = [dict(e) for e in entries[:start]]
    prev = fmt.entry_hash(canonical_json(out[-1]["entry"])) if out else fmt.GENESIS_PREV
    for i, e in enumerate(entries[start:], start=start):
        body = dict(e["entry"], index=i, prev=prev)
        data = canonical_json(body)
        out.append({"entry": body, "signature": fmt.b64(crypto.sign(key, data))})
        prev = fmt.entry_hash(data)
    return out
