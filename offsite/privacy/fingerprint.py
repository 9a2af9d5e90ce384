"""A dataset fingerprint that names a dataset without revealing it.

HMAC-SHA256, keyed with the data owner's secret salt, over the *sorted* list of per-record SHA-256
digests. Only digests enter the MAC, never the records; sorting makes it independent of record order
(shuffling a file is the same dataset) while any change to any record changes it. The salt keeps a
third party holding candidate records from confirming a guess: without the salt, the fingerprint of a
public or guessable dataset could be recomputed by anyone. Record multiplicity counts: a duplicated
record is a different dataset.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

FINGERPRINT_SCHEME = "hmac-sha256/sorted-sha256-records/v1"


def record_digest(record: bytes | str) -> bytes:
    """SHA-256 of one record (str is encoded as UTF-8)."""
    if isinstance(record, str):
        record = record.encode("utf-8")
    elif not isinstance(record, (bytes, bytearray, memoryview)):
        raise TypeError(f"records must be bytes or str, got {type(record).__name__}")
    return hashlib.sha256(record).digest()


def dataset_fingerprint(records: Iterable[bytes | str], salt: bytes) -> str:
    """Hex HMAC-SHA256(salt, sorted per-record SHA-256 digests, concatenated)."""
    if not isinstance(salt, (bytes, bytearray)) or len(salt) < 16:
        raise ValueError("the fingerprint salt must be at least 16 secret bytes")
    digests = sorted(record_digest(r) for r in records)
    mac = hmac.new(bytes(salt), digestmod=hashlib.sha256)
    # Fixed-size (32-byte) digests concatenated are unambiguous: no separator needed.
    for d in digests:
        mac.update(d)
    return mac.hexdigest()
