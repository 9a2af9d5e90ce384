"""The submission envelope: what a data owner signs when it hands an adapter to the owner's server.

Canonical JSON (``offsite.fileio.canonical_json``) of::

    format: "offsite-submission", format_version: 1,
    method: "/offsite.v1.OffsiteService/BeginSubmission",
    job_id, client_id,
    files: [{name, size, sha256}, ...]   adapter.safetensors, adapter.json[, receipt.json, receipt.sig]
    nonce: 64 hex digits (32 random bytes), time: Unix seconds

signed with the data owner's Ed25519 receipt-signing key (the key enrolled for ``client_id``). The
server refuses an envelope whose nonce it has seen, whose time is more than ``MAX_CLOCK_SKEW_S`` from
its own clock, whose signature is not by the caller's enrolled key, or whose ``client_id`` is not the
caller's certificate identity. The files are then uploaded in the listed order and each must hash to
its listed sha256, so the signature covers every byte.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Annotated, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field, StringConstraints

from offsite import crypto, pki
from offsite.errors import FormatError
from offsite.fileio import canonical_json, sha256_file
from offsite.formats.schema import Schema, parse

FORMAT = "offsite-submission"
METHOD = "/offsite.v1.OffsiteService/BeginSubmission"
#: A submission's time may differ from the server's clock by at most this much.
MAX_CLOCK_SKEW_S = 300
#: Upload order; the receipt pair is left out for a non-private adapter.
REQUIRED_FILES = ("adapter.safetensors", "adapter.json")
RECEIPT_FILES = ("receipt.json", "receipt.sig")
MAX_ENVELOPE_BYTES = 16 << 10

Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(pattern=pki.NAME_PATTERN.pattern.join("^$"))]


class DeclaredFile(Schema):
    name: Literal["adapter.safetensors", "adapter.json", "receipt.json", "receipt.sig"]
    size: Annotated[int, Field(ge=1, le=1 << 50)]
    sha256: Hex64


class Envelope(Schema):
    format: Literal["offsite-submission"]
    format_version: Literal[1]
    method: Literal["/offsite.v1.OffsiteService/BeginSubmission"]
    job_id: Name
    client_id: Name
    files: Annotated[list[DeclaredFile], Field(min_length=2, max_length=4)]
    nonce: Hex64
    time: Annotated[int, Field(ge=0, le=1 << 40)]

    def file_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.files)


def parse_envelope(data: bytes, what: str = "submission envelope") -> Envelope:
    envelope = parse(Envelope, data, what, max_bytes=MAX_ENVELOPE_BYTES)
    names = envelope.file_names()
    if names not in (REQUIRED_FILES, REQUIRED_FILES + RECEIPT_FILES):
        raise FormatError(
            f"{what}.files: must be {', '.join(REQUIRED_FILES)} (then {', '.join(RECEIPT_FILES)} for a DP "
            f"adapter), in that order; got {', '.join(names)}"
        )
    return envelope


def files_of(adapter_dir: str | os.PathLike) -> list[dict]:
    """The declared files of an adapter directory: the receipt pair only if both are present."""
    adapter_dir = Path(adapter_dir)
    names = list(REQUIRED_FILES)
    if all((adapter_dir / n).is_file() for n in RECEIPT_FILES):
        names += RECEIPT_FILES
    out = []
    for name in names:
        path = adapter_dir / name
        if path.is_symlink() or not path.is_file():
            raise FormatError(f"{path} is missing or not a regular file")
        out.append({"name": name, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return out


def make_envelope(job_id: str, client_id: str, files: list[dict], now: float | None = None) -> bytes:
    doc = {
        "format": FORMAT,
        "format_version": 1,
        "method": METHOD,
        "job_id": job_id,
        "client_id": client_id,
        "files": files,
        "nonce": secrets.token_hex(32),
        "time": int(time.time() if now is None else now),
    }
    data = canonical_json(doc)
    parse_envelope(data)  # never send what the server would refuse as malformed
    return data


def sign_envelope(envelope: bytes, key: Ed25519PrivateKey) -> bytes:
    return crypto.sign(key, envelope)


def verify_envelope(envelope: bytes, signature: bytes, key: Ed25519PublicKey) -> None:
    """IntegrityError unless ``signature`` is ``key``'s over the exact bytes ``envelope``."""
    if len(signature) != crypto.SIGNATURE_BYTES:
        raise FormatError(
            f"submission signature: an Ed25519 signature has {crypto.SIGNATURE_BYTES} bytes, got {len(signature)}"
        )
    crypto.verify(key, envelope, signature)
