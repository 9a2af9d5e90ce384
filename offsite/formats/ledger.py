"""The owner's privacy ledger, as an auditor reads it: entries, checkpoints and the export file.

A **ledger entry** is canonical JSON (``offsite.fileio.canonical_json``) of::

    format: "offsite-ledger-entry", format_version: 1,
    index: 0, 1, 2, ...          its position; entry 0 opens the ledger
    prev:  sha256 of the previous entry's bytes (64 zeros for entry 0)
    at:    when it was recorded (RFC 3339, UTC)
    record: {kind: "open" | "enrol" | "grant" | "submission" | "plug" | "revoke", ...}

signed (raw Ed25519, 64 bytes) over those exact bytes by the owner's key (``STATE/signing/``). The
entry's **hash** is the sha256 of its bytes; the ledger's **id** is the hash of entry 0, whose record
names the owner's public key. Each entry holds its predecessor's hash, so changing, removing, adding or
moving one breaks the chain from there on, and only the owner's key can sign a replacement.

A **checkpoint** is the owner's signed statement "entry ``index`` of ledger ``ledger_id`` has hash
``head``", handed to a data owner when its submission is accepted (and with every budget answer). The
data owner keeps it; an auditor holding it can tell a ledger that was cut short (fewer entries than the
checkpoint names) or rewritten (another hash at that index, or another ledger id) even when the owner
re-signed every entry, which the chain alone cannot show.

The **export** (``offsite owner export-ledger``) is one self-contained file for an auditor without
access to the server: every entry with its signature, the owner's public key, the enrolled clients as
recorded (receipt keys, certificate pins), signed over the whole by the owner's key.

Signed documents (checkpoints, the export) carry a ``signature`` field: base64 of the raw Ed25519
signature over the canonical JSON of every other field. Their files must themselves be canonical JSON,
so no two readers can disagree on what was signed. Everything here is core (no server import): the
auditor's side (``offsite audit ledger``) verifies a ledger with this module alone.

In the owner's state directory the ledger is the table ``ledger`` of ``STATE/offsite.db`` (SQLite):
``seq`` (the entry's index), ``entry`` (its exact bytes) and ``signature`` (raw 64 bytes), read in
``seq`` order; the clients as recorded are the table ``clients``. Those columns are part of this format.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field, StringConstraints

from offsite import crypto
from offsite.errors import FormatError, IntegrityError
from offsite.fileio import canonical_json, sha256_bytes
from offsite.formats.schema import JsonObject, Schema, Sha256Hex, parse, validate

ENTRY_FORMAT = "offsite-ledger-entry"
CHECKPOINT_FORMAT = "offsite-ledger-checkpoint"
EXPORT_FORMAT = "offsite-ledger-export"
FORMAT_VERSION = 1

#: ``prev`` of entry 0.
GENESIS_PREV = "0" * 64
#: Where a state directory keeps its database (the ledger is its ``ledger`` table).
STATE_DB_FILE = "offsite.db"
LEDGER_TABLE = "ledger"

#: An entry may hold a receipt (at most 1 MiB, base64 in the entry) and little else.
MAX_ENTRY_BYTES = 2 << 20
MAX_CHECKPOINT_BYTES = 16 << 10
#: An export holds every entry; refused above this before it is parsed.
MAX_EXPORT_BYTES = 1 << 30
MAX_ENTRIES = 1_000_000

KINDS = ("open", "enrol", "grant", "submission", "plug", "revoke")

Time = Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
DatasetId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")]
SubmissionId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
PublicKeyB64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{43}=$")]
SignatureB64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{86}==$")]
Base64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=2 << 20)]
Epsilon = Annotated[float, Field(gt=0, le=1e6)]
Delta = Annotated[float, Field(gt=0, lt=1)]


# ------------------------------------------------------------------------------------------ records


class OpenRecord(Schema):
    """Entry 0: the ledger is opened under this owner key."""

    kind: Literal["open"] = Field(description="the record's kind")
    owner_key: PublicKeyB64 = Field(description="the owner's Ed25519 public key (base64 of the raw 32 bytes)")
    owner_key_fingerprint: Sha256Hex = Field(description="its sha256")


class EnrolRecord(Schema):
    """A data owner admitted: the keys its receipts and calls are checked against."""

    kind: Literal["enrol"] = Field(description="the record's kind")
    client_id: Name = Field(description="the data owner's id")
    receipt_key: PublicKeyB64 = Field(description="its receipt-signing Ed25519 public key (base64, raw)")
    receipt_key_fingerprint: Sha256Hex = Field(description="sha256 of the receipt key")
    cert_sha256: Sha256Hex = Field(description="sha256 of its client certificate (the pin)")
    enrolled_at: Time = Field(description="when it was enrolled")
    before_ledger: bool = Field(
        description="true: enrolled before this ledger was opened (recorded when the ledger opened)"
    )


class GrantRecord(Schema):
    """A budget (ε, δ) for one data owner's dataset; the latest grant for the pair is in force."""

    kind: Literal["grant"] = Field(description="the record's kind")
    client_id: Name = Field(description="the data owner")
    dataset_id: DatasetId = Field(description="its dataset id (as in its receipts)")
    epsilon: Epsilon = Field(description="the most ε that the dataset's accepted runs may spend, composed")
    delta: Delta = Field(description="the δ at which ε is computed")


class Spent(Schema):
    """ε of a dataset's recorded runs composed, as the server computed it when it accepted a submission."""

    epsilon: Annotated[float, Field(ge=0, le=1e6)] = Field(description="ε at `delta`")
    delta: Delta = Field(description="the grant's δ")
    accountant: Annotated[str, StringConstraints(min_length=1, max_length=128)] = Field(
        description="which accountant: `opacus-prv-upper` (PRV upper bound)"
    )
    eps_error: Annotated[float, Field(gt=0, le=0.5)] = Field(description="the PRV accountant's eps_error")


class SubmissionRecord(Schema):
    """An accepted submission, with the data owner's receipt exactly as it signed it."""

    kind: Literal["submission"] = Field(description="the record's kind")
    submission_id: SubmissionId = Field(description="the submission")
    client_id: Name = Field(description="who submitted it")
    job_id: Name = Field(description="the job")
    bundle_id: Sha256Hex = Field(description="the job's bundle")
    adapter_sha256: Sha256Hex = Field(description="sha256 of the accepted adapter.safetensors")
    dataset_id: DatasetId | None = Field(description="the receipt's dataset; null for a non-private adapter")
    receipt: Base64 | None = Field(description="base64 of the exact bytes of receipt.json (null: no receipt)")
    receipt_signature: SignatureB64 | None = Field(
        description="base64 of the data owner's raw Ed25519 signature over them"
    )
    grant_index: Annotated[int, Field(ge=0)] | None = Field(
        description="index of the grant entry the submission was admitted under"
    )
    spent: Spent | None = Field(
        description="ε of the dataset's recorded runs after this one (null: no receipt)"
    )


class PlugRecord(Schema):
    """The owner plugged an accepted submission into its model."""

    kind: Literal["plug"] = Field(description="the record's kind")
    submission_id: SubmissionId = Field(description="the submission plugged in")
    client_id: Name = Field(description="whose it was")
    adapter_sha256: Sha256Hex = Field(description="the adapter plugged in")


class RevokeRecord(Schema):
    """A data owner revoked: its certificate is refused from then on."""

    kind: Literal["revoke"] = Field(description="the record's kind")
    client_id: Name = Field(description="the data owner")
    cert_sha256: Sha256Hex = Field(description="the revoked certificate's pin")
    reason: Annotated[str, StringConstraints(max_length=1000)] = Field(description="as the owner gave it")


Record = Annotated[
    Union[OpenRecord, EnrolRecord, GrantRecord, SubmissionRecord, PlugRecord, RevokeRecord],  # noqa: UP007
    Field(discriminator="kind"),
]
RECORDS: dict[str, type[Schema]] = {
    "open": OpenRecord,
    "enrol": EnrolRecord,
    "grant": GrantRecord,
    "submission": SubmissionRecord,
    "plug": PlugRecord,
    "revoke": RevokeRecord,
}


class LedgerEntry(Schema):
    """One entry of the hash chain (signed over its canonical JSON by the owner's key)."""

    format: Literal["offsite-ledger-entry"] = Field(description="always `offsite-ledger-entry`")
    format_version: Literal[1] = Field(description="1")
    index: Annotated[int, Field(ge=0, lt=MAX_ENTRIES)] = Field(description="position in the ledger, from 0")
    prev: Sha256Hex = Field(description="sha256 of the previous entry's bytes (64 zeros for entry 0)")
    at: Time = Field(description="when it was recorded (UTC)")
    record: Record = Field(
        description="what happened: one of the records below, by `kind`", json_schema_extra={"expand": False}
    )


# ------------------------------------------------------------------------------------------ entries


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str) -> bytes:
    return crypto.b64decode_strict(text, what)


def entry_hash(entry_bytes: bytes) -> str:
    return sha256_bytes(entry_bytes)


def build_entry(index: int, prev: str, at: str, record: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a new entry (validated: never write what an auditor could not read)."""
    doc = {
        "format": ENTRY_FORMAT,
        "format_version": FORMAT_VERSION,
        "index": index,
        "prev": prev,
        "at": at,
        "record": dict(record),
    }
    data = canonical_json(doc)
    parse_entry(data, f"ledger entry {index}")
    return data


def parse_entry(data: bytes, what: str = "ledger entry") -> LedgerEntry:
    """Validate an entry's bytes (untrusted); they must be canonical JSON (what was signed is unambiguous)."""
    entry = parse(LedgerEntry, data, what, max_bytes=MAX_ENTRY_BYTES)
    _require_canonical(data, what)
    return entry


def entry_from_object(obj: Any, what: str) -> tuple[LedgerEntry, bytes]:
    """An entry given as a JSON object (inside an export): the model and its canonical bytes."""
    entry = validate(LedgerEntry, obj, what)
    return entry, canonical_json(obj)


def sign_entry(key: Ed25519PrivateKey, entry_bytes: bytes) -> bytes:
    return crypto.sign(key, entry_bytes)


def _require_canonical(data: bytes, what: str) -> None:
    try:
        same = canonical_json(json.loads(data)) == data
    except ValueError:
        same = False
    if not same:
        raise FormatError(
            f"{what}: not in canonical form (sorted keys, 2-space indent, one trailing newline, no duplicate "
            "keys): it was edited or not written by offsite"
        )


# ------------------------------------------------------------------------------------------ signed documents


def _signed_part(doc: Schema) -> bytes:
    body = doc.model_dump(mode="json")
    body.pop("signature")
    return canonical_json(body)


def _sign_document(body: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    return canonical_json({**body, "signature": b64(crypto.sign(key, canonical_json(body)))})


def verify_document(doc: Schema, key: Ed25519PublicKey, what: str) -> None:
    """IntegrityError unless ``doc.signature`` is ``key``'s signature over the document's other fields."""
    signature = unb64(doc.signature, f"{what}.signature")  # type: ignore[attr-defined]
    try:
        crypto.verify(key, _signed_part(doc), signature)
    except IntegrityError:
        raise IntegrityError(
            f"{what}: the signature does not verify with the owner key "
            f"{crypto.public_key_fingerprint(key)[:16]}…"
        ) from None


class Checkpoint(Schema):
    """The owner's signed statement of a ledger's head, kept by data owners."""

    format: Literal["offsite-ledger-checkpoint"] = Field(description="always `offsite-ledger-checkpoint`")
    format_version: Literal[1] = Field(description="1")
    ledger_id: Sha256Hex = Field(description="hash of the ledger's entry 0")
    index: Annotated[int, Field(ge=0, lt=MAX_ENTRIES)] = Field(description="an entry index")
    head: Sha256Hex = Field(description="the hash of entry `index`")
    issued_at: Time = Field(description="when the server signed this")
    owner_key_fingerprint: Sha256Hex = Field(description="sha256 of the owner key that signs it")
    signature: SignatureB64 = Field(description="Ed25519 over the canonical JSON of the other fields")


def make_checkpoint(key: Ed25519PrivateKey, ledger_id: str, index: int, head: str, issued_at: str) -> bytes:
    body = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "ledger_id": ledger_id,
        "index": index,
        "head": head,
        "issued_at": issued_at,
        "owner_key_fingerprint": crypto.public_key_fingerprint(key.public_key()),
    }
    data = _sign_document(body, key)
    parse_checkpoint(data)
    return data


def parse_checkpoint(data: bytes, what: str = "ledger checkpoint") -> Checkpoint:
    checkpoint = parse(Checkpoint, data, what, max_bytes=MAX_CHECKPOINT_BYTES)
    _require_canonical(data, what)
    return checkpoint


def checkpoint_file_name(checkpoint: Checkpoint) -> str:
    """How a data owner names a stored checkpoint: by ledger and index (one file per head it saw)."""
    return f"{checkpoint.ledger_id[:16]}-{checkpoint.index:08d}-{checkpoint.head[:16]}.json"


# ------------------------------------------------------------------------------------------ export


class ExportedEntry(Schema):
    entry: JsonObject = Field(
        description="the entry as a JSON object (its canonical JSON is what was signed)"
    )
    signature: SignatureB64 = Field(
        description="the owner's Ed25519 signature over the entry's canonical JSON"
    )


class ExportedClient(Schema):
    client_id: Name = Field(description="the data owner")
    receipt_key: PublicKeyB64 = Field(description="its receipt-signing public key, as recorded")
    receipt_key_fingerprint: Sha256Hex = Field(description="its sha256")
    cert_sha256: Sha256Hex = Field(description="its certificate pin")
    enrolled_at: Annotated[str, StringConstraints(max_length=64)] = Field(description="when")
    revoked_at: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        description="null if not revoked"
    )


class LedgerExport(Schema):
    """`offsite owner export-ledger`: the whole ledger for an auditor, signed over the whole."""

    format: Literal["offsite-ledger-export"] = Field(description="always `offsite-ledger-export`")
    format_version: Literal[1] = Field(description="1")
    exported_at: Time = Field(description="when it was written")
    owner_key: PublicKeyB64 = Field(description="the owner's public key as the state records it")
    owner_key_fingerprint: Sha256Hex = Field(description="its sha256")
    ledger_id: Sha256Hex | None = Field(description="hash of entry 0 (null: empty ledger)")
    head_index: Annotated[int, Field(ge=0)] | None = Field(description="index of the last entry")
    head: Sha256Hex | None = Field(description="hash of the last entry")
    entries: Annotated[list[ExportedEntry], Field(max_length=MAX_ENTRIES)] = Field(
        description="every entry, in order"
    )
    clients: Annotated[list[ExportedClient], Field(max_length=100_000)] = Field(
        description="the enrolled clients as recorded"
    )
    signature: SignatureB64 = Field(description="Ed25519 over the canonical JSON of every other field")


def make_export(
    key: Ed25519PrivateKey,
    exported_at: str,
    entries: list[tuple[bytes, bytes]],
    clients: list[dict[str, Any]],
) -> bytes:
    """The export file's bytes from the entries' exact bytes and raw signatures (in order)."""
    owner = key.public_key()
    last = entries[-1][0] if entries else None
    body = {
        "format": EXPORT_FORMAT,
        "format_version": FORMAT_VERSION,
        "exported_at": exported_at,
        "owner_key": crypto.public_key_to_b64(owner),
        "owner_key_fingerprint": crypto.public_key_fingerprint(owner),
        "ledger_id": entry_hash(entries[0][0]) if entries else None,
        "head_index": len(entries) - 1 if entries else None,
        "head": entry_hash(last) if last is not None else None,
        "entries": [{"entry": json.loads(e), "signature": b64(s)} for e, s in entries],
        "clients": clients,
    }
    data = _sign_document(body, key)
    parse_export(data)
    return data


def parse_export(data: bytes, what: str = "ledger export") -> LedgerExport:
    export = parse(LedgerExport, data, what, max_bytes=MAX_EXPORT_BYTES)
    _require_canonical(data, what)
    return export
