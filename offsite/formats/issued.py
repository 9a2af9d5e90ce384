"""The model owner's record of the bundles it issued, so returned adapters can be checked against them.

``OWNER_DIR/bundles/<bundle id>.json`` is a byte-exact copy of the bundle's ``manifest.json``
(format: ``offsite.formats.manifest.Manifest``); a record is trusted only if its sha256 is the id
it is filed under, so a record cannot be swapped for another bundle's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from offsite.errors import FormatError, IntegrityError
from offsite.fileio import read_bounded, sha256_bytes, write_bytes_atomic
from offsite.formats.manifest import MANIFEST, Manifest, parse_manifest
from offsite.formats.schema import MAX_METADATA_BYTES

RECORDS_DIR = "bundles"


def record_issued(manifest_bytes: bytes, owner_dir: str | os.PathLike) -> Path:
    """File a copy of an issued bundle's manifest bytes under its id in ``owner_dir``."""
    dest = Path(owner_dir) / RECORDS_DIR / f"{sha256_bytes(manifest_bytes)}.json"
    write_bytes_atomic(dest, manifest_bytes)
    return dest


def issued_manifest(
    bundle_id: str, owner_dir: str | os.PathLike | None, bundle_path: str | os.PathLike | None = None
) -> Manifest:
    """The manifest of bundle ``bundle_id``: from ``bundle_path`` if given, else the owner's record.

    The manifest's own hash must equal the id.
    """
    if not isinstance(bundle_id, str) or not re.fullmatch(r"[0-9a-f]{64}", bundle_id):
        raise FormatError(f"malformed bundle id {bundle_id!r}")
    if bundle_path is not None:
        source = Path(bundle_path) / MANIFEST
    elif owner_dir is None:
        raise FormatError(
            f"no record of issued bundles to find bundle {bundle_id[:12]}… in; pass --bundle DIR"
        )
    else:
        source = Path(owner_dir) / RECORDS_DIR / f"{bundle_id}.json"
        if not os.path.lexists(source):
            raise FormatError(
                f"bundle {bundle_id[:12]}… was not issued from this machine (no record in {source.parent}); "
                "pass --bundle DIR"
            )
    data = read_bounded(source, str(source), MAX_METADATA_BYTES)
    if sha256_bytes(data) != bundle_id:
        raise IntegrityError(f"{source} is not the manifest of bundle {bundle_id[:12]}…")
    return parse_manifest(data, str(source))
