"""The owner's signed ledger checkpoints, kept by the data owner: ``KEYS/checkpoints/``.

The server hands one over with every accepted submission (the checkpoint of the entry that records it)
and with every budget answer (the ledger's head then). Each is checked here against the owner key of
the enrolment package before it is stored, one file per (ledger, index, head), never overwritten. An
auditor given this directory (``offsite audit ledger … --checkpoints KEYS/checkpoints``) can tell a ledger
that was later cut short or rewritten, which the ledger's own hash chain cannot show once its owner
re-signs it.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from offsite.fileio import write_bytes_atomic
from offsite.formats import ledger as fmt

CHECKPOINTS_DIR = "checkpoints"


def directory(keys_dir: str | os.PathLike) -> Path:
    return Path(keys_dir) / CHECKPOINTS_DIR


def store(keys_dir: str | os.PathLike, data: bytes, owner_key: Ed25519PublicKey) -> Path:
    """Verify ``data`` (a checkpoint from the server) with the enrolled owner key and keep it; returns its
    file. IntegrityError/FormatError if it is not the owner's checkpoint (nothing is stored then)."""
    what = "the server's ledger checkpoint"
    checkpoint = fmt.parse_checkpoint(data, what)
    fmt.verify_document(checkpoint, owner_key, what)
    path = directory(keys_dir) / fmt.checkpoint_file_name(checkpoint)
    if not path.exists():
        write_bytes_atomic(path, data)
    return path


def stored(keys_dir: str | os.PathLike) -> list[Path]:
    d = directory(keys_dir)
    return sorted(d.glob("*.json")) if d.is_dir() else []
