"""Reading an owner's ledger for an audit: from its state directory (the SQLite database, read-only, in one
snapshot) or from an export file; each entry as the exact bytes and signature found at its position.

Nothing here judges what it reads (that is ``ledger_audit``): an entry that cannot be read is passed on
with the reason, so the audit can name it; only an input that is neither a state nor a readable export
is refused (FormatError).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from offsite import crypto
from offsite.errors import FormatError
from offsite.fileio import canonical_json, read_bounded
from offsite.formats import ledger as fmt
from offsite.formats.signing import OWNER_PUBLIC_KEY


@dataclass
class Item:
    """One entry as found at a position: its bytes (canonical JSON) and signature, or why not."""

    position: int
    data: bytes | None
    signature: bytes | None
    problem: str = ""


@dataclass
class Source:
    kind: str  # "state" or "export"
    path: Path
    items: list[Item]
    owner_key: Ed25519PublicKey | None  # as the state or export records it
    clients: list[dict[str, Any]]
    export: fmt.LedgerExport | None = None


def _read_state(root: Path) -> Source:
    db = root / fmt.STATE_DB_FILE
    if not db.is_file():
        raise FormatError(f"{root} is not an owner's state directory: {db} does not exist")
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise FormatError(f"{db}: cannot be opened read-only ({e})") from None
    try:
        conn.execute("BEGIN")  # one snapshot for both tables
        rows = conn.execute(f"SELECT seq, entry, signature FROM {fmt.LEDGER_TABLE} ORDER BY seq").fetchall()
        clients = conn.execute(
            "SELECT client_id, receipt_key, receipt_key_fingerprint, cert_sha256, enrolled_at, revoked_at "
            "FROM clients ORDER BY rowid"
        ).fetchall()
    except sqlite3.Error as e:
        raise FormatError(f"{db}: not an offsite state with a ledger ({e})") from None
    finally:
        conn.close()
    items = [
        Item(
            i,
            bytes(entry) if isinstance(entry, bytes | bytearray | memoryview) else None,
            bytes(sig) if isinstance(sig, bytes | bytearray | memoryview) else None,
            "" if isinstance(entry, bytes | bytearray | memoryview) else "not a byte string",
        )
        for i, (_, entry, sig) in enumerate(rows)
    ]
    keys = ("client_id", "receipt_key", "receipt_key_fingerprint", "cert_sha256", "enrolled_at", "revoked_at")
    key_file = root / "signing" / OWNER_PUBLIC_KEY
    owner_key = crypto.load_public_key(key_file) if key_file.is_file() else None
    return Source("state", root, items, owner_key, [dict(zip(keys, c, strict=True)) for c in clients])


def _read_export(path: Path) -> Source:
    export = fmt.parse_export(read_bounded(path, f"ledger export {path}", fmt.MAX_EXPORT_BYTES))
    items = []
    for i, exported in enumerate(export.entries):
        try:
            signature = fmt.unb64(exported.signature, f"entries[{i}].signature")
        except FormatError as e:
            items.append(Item(i, canonical_json(exported.entry), None, str(e)))
            continue
        items.append(Item(i, canonical_json(exported.entry), signature))
    owner_key = crypto.public_key_from_b64(export.owner_key, "owner_key")
    clients = [c.model_dump(mode="json") for c in export.clients]
    return Source("export", path, items, owner_key, clients, export)


def read_source(path: str | os.PathLike) -> Source:
    """A state directory or an export file (FormatError if it is neither, or unreadable as a whole)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FormatError(f"{path} does not exist") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        return _read_state(path)
    return _read_export(path)
