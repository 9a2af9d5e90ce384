"""Keyed hashes of the records each DP run was given: kept on the data owner's machine, never published.

A budget is fixed per dataset id, so the same records under another id would get a fresh budget. To
catch that, every record a DP run is given is hashed with HMAC-SHA256 under a secret *record key*,
and the hashes are kept per dataset; ``offsite.privacy.history`` refuses a run whose records overlap
another dataset's unless the run says how to treat the overlap. A record is identified by its parsed,
canonical form (``offsite.data.Record.canonical``), so its JSONL and CSV forms hash alike.

Files, in ``<client dir>/budgets/``, mode 0600::

    record_key.bin         32 random bytes, made by the first DP run; kept as long as histories exist
    <dataset_id>.records   MAGIC, then the dataset's record HMACs (32 bytes each), sorted, no duplicates

Sorted fixed-width hashes keep the files compact (32 bytes a record) and make membership a binary
search: a million records cost 32 MB and well under a second to compare.

What a copy of these files reveals to someone who breaks into the machine: without the key, only how
many distinct records each dataset has (the file size) and how many records two datasets share, since
an HMAC under an unknown 256-bit key is unlinkable to any record. With the key as well (it sits
beside them), anyone holding a candidate record can test whether it was in a dataset: the same as
reading the training data, which is on that machine anyway. That is why the hashes never leave it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from offsite.errors import FormatError, OffsiteError
from offsite.fileio import fsync_directory, write_bytes_atomic

KEY_FILE = "record_key.bin"
KEY_BYTES = 32
SUFFIX = ".records"
MAGIC = b"OFFSITE-RECHASH1"
HASH_BYTES = 32
_DTYPE = np.dtype((np.void, HASH_BYTES))


def empty() -> np.ndarray:
    return np.empty(0, dtype=_DTYPE)


def load_key(directory: Path, create: bool) -> bytes | None:
    """The record key in ``directory`` (created 0600 if absent and ``create``; None if absent)."""
    path = Path(directory) / KEY_FILE
    if not path.exists() and create:
        _create_key(path)
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(key) != KEY_BYTES:
        raise FormatError(f"{path} must hold exactly {KEY_BYTES} bytes, found {len(key)}")
    return key


def _create_key(path: Path) -> None:
    # Written whole to a private temporary file, then linked into place: the key file either does
    # not exist or holds the full key, and a key made by someone else first is never replaced.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
        fsync_directory(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def hash_records(canonical_records: Iterable[bytes], key: bytes) -> np.ndarray:
    """Sorted, distinct HMAC-SHA256(key, record) of each canonical record."""
    digests = b"".join(hmac.digest(key, r, hashlib.sha256) for r in canonical_records)
    return np.unique(np.frombuffer(digests, dtype=_DTYPE))


def read_set(path: Path) -> np.ndarray:
    """The sorted hash set stored at ``path`` (empty if there is none); refuses a damaged file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return empty()
    body = data[len(MAGIC) :]
    if not data.startswith(MAGIC) or len(body) % HASH_BYTES:
        raise FormatError(f"{path}: not a record hash file")
    hashes = np.frombuffer(body, dtype=_DTYPE)
    if not _strictly_increasing(hashes):
        raise FormatError(f"{path}: record hashes are not sorted and distinct; the file is damaged")
    return hashes


def _strictly_increasing(hashes: np.ndarray) -> bool:
    # Byte-wise order, in O(n): compare the first differing big-endian 64-bit word of each pair.
    words = hashes.view(">u8").reshape(-1, HASH_BYTES // 8)
    if len(words) < 2:
        return True
    a, b = words[:-1], words[1:]
    differs = a != b
    first = differs.argmax(axis=1)
    rows = np.arange(len(a))
    return bool(differs.any(axis=1).all() and (b[rows, first] > a[rows, first]).all())


def write_set(path: Path, hashes: np.ndarray) -> None:
    write_bytes_atomic(path, MAGIC + hashes.tobytes(), mode=0o600)


def union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.union1d(a, b) if len(a) and len(b) else (a if len(a) else b)


def count_shared(a: np.ndarray, b: np.ndarray) -> int:
    """How many hashes two sorted sets share (binary search of the smaller in the larger)."""
    small, large = (a, b) if len(a) <= len(b) else (b, a)
    if not len(small) or not len(large):
        return 0
    at = np.searchsorted(large, small)
    at[at == len(large)] = 0
    return int((large[at] == small).sum())


def require_key(directory: Path, have_hashes: bool) -> bytes:
    """The record key, made on first use; an error if hash files exist but their key is gone."""
    key = load_key(directory, create=not have_hashes)
    if key is None:
        raise OffsiteError(
            f"{Path(directory) / KEY_FILE} is missing but record hashes exist in {directory}: without "
            "their key they cannot be compared. Restore the key from a backup."
        )
    return key
