"""A manifest looked up by bundle id: the bytes must hash to the id, so a record cannot be swapped.

The model owner's record of the bundles it issued lives in its state (``offsite.server``'s storage);
``offsite owner plug --bundle DIR`` reads the manifest from a bundle directory instead. Either way the
core gets the exact bytes and checks them here before parsing.
"""

from __future__ import annotations

import re

from offsite.errors import FormatError, IntegrityError
from offsite.fileio import sha256_bytes
from offsite.formats.manifest import Manifest, parse_manifest

_BUNDLE_ID = re.compile(r"[0-9a-f]{64}")


def check_bundle_id(bundle_id: object, where: str) -> str:
    if not isinstance(bundle_id, str) or not _BUNDLE_ID.fullmatch(bundle_id):
        raise FormatError(f"{where}: malformed bundle id {bundle_id!r}")
    return bundle_id


def manifest_from_bytes(data: bytes, bundle_id: str, where: str) -> Manifest:
    """The manifest of bundle ``bundle_id`` from its exact bytes, which must hash to the id."""
    check_bundle_id(bundle_id, where)
    if sha256_bytes(data) != bundle_id:
        raise IntegrityError(f"{where} is not the manifest of bundle {bundle_id[:12]}…")
    return parse_manifest(data, where)
