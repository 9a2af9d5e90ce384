"""The owner's signed ledger checkpoints, kept by the data owner: ``KEYS/checkpoints/``.

The server hands one over with every accepted submission (the checkpoint of the entry that records it)
and with every budget answer (the ledger's head then). Each is checked here against the owner key of
the enrolment package before it is stored, one file per (ledger, index, head), never overwritten. An
auditor given this directory (``offsite audit ledger … --checkpoints KEYS/checkpoints``) can tell a ledger
that was later cut short or rewritten, which the ledger's own hash chain cannot show once its owner
re-signs it. A new checkpoint that contradicts a kept one (``fork``) is kept too, and reported.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from offsite.errors import IntegrityError, OffsiteError
from offsite.fileio import read_bounded, write_bytes_atomic
from offsite.formats import ledger as fmt

CHECKPOINTS_DIR = "checkpoints"


def directory(keys_dir: str | os.PathLike) -> Path:
    return Path(keys_dir) / CHECKPOINTS_DIR


class LedgerForkError(IntegrityError):
    """The owner signed a checkpoint that contradicts one kept earlier (both are kept, as evidence)."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


def store(keys_dir: str | os.PathLike, data: bytes, owner_key: Ed25519PublicKey) -> Path:
    """Verify ``data`` (a checkpoint from the server) with the enrolled owner key and keep it; returns its
    file. IntegrityError/FormatError if it is not the owner's checkpoint (nothing is stored then);
    LedgerForkError, after keeping it, if it contradicts a checkpoint kept before (``fork``)."""
    what = "the server's ledger checkpoint"
    checkpoint = fmt.parse_checkpoint(data, what)
    fmt.verify_document(checkpoint, owner_key, what)
    path = directory(keys_dir) / fmt.checkpoint_file_name(checkpoint)
    if not path.exists():
        write_bytes_atomic(path, data)
    problem = fork(keys_dir, checkpoint, owner_key)
    if problem:
        raise LedgerForkError(problem, path)
    return path


def fork(keys_dir: str | os.PathLike, new: fmt.Checkpoint, owner_key: Ed25519PublicKey) -> str | None:
    """Why ``new`` contradicts a checkpoint kept before, signed by the same owner key: another head at the
    same index of the same ledger (the owner rewrote its history), or another ledger (it started again).
    Kept files are found by name (ledger, index, head prefixes) and read only when their name differs."""
    prefix = new.ledger_id[:16]
    for path in stored(keys_dir):
        ledger, _, rest = path.stem.partition("-")
        index, _, head = rest.partition("-")
        same_index = ledger == prefix and index == f"{new.index:08d}"
        if not (same_index and head != new.head[:16]) and ledger == prefix:
            continue
        try:
            kept = fmt.parse_checkpoint(read_bounded(path, path.name, fmt.MAX_CHECKPOINT_BYTES), path.name)
            fmt.verify_document(kept, owner_key, path.name)
        except (OffsiteError, OSError):
            continue  # not a checkpoint of this owner: says nothing about its ledger
        if kept.ledger_id != new.ledger_id:
            return (
                f"the owner's ledger {new.ledger_id[:16]}… is not the ledger {kept.ledger_id[:16]}… of checkpoint "
                f"{path.name}, signed by the same owner key: the ledger was started again (forked). Both "
                "checkpoints are kept: give them to an auditor (offsite audit ledger … --checkpoints)"
            )
        if kept.index == new.index and kept.head != new.head:
            return (
                f"the owner signed entry {new.index} with hash {new.head[:16]}… now and {kept.head[:16]}… before "
                f"({path.name}): its ledger was rewritten (forked). Both checkpoints are kept: give them to an "
                "auditor (offsite audit ledger … --checkpoints)"
            )
    return None


def stored(keys_dir: str | os.PathLike) -> list[Path]:
    d = directory(keys_dir)
    return sorted(d.glob("*.json")) if d.is_dir() else []
