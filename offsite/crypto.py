"""All signing and verification in one place: Ed25519 keys, signatures, fingerprints, secret salt.

Keeping every cryptographic operation here means one module to review, and one place where the
server's certificate handling will go later. Nothing here ever prints or logs private material.

On the data owner's machine (``default_client_dir()`` unless ``--dir``)::

    signing_key.pem       Ed25519 private key, PKCS#8 PEM, unencrypted, mode 0600
    signing_key.pub.pem   its public key, SubjectPublicKeyInfo PEM
    dataset_salt.bin      32 random bytes keying dataset fingerprints (HMAC), mode 0600
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from offsite.errors import FormatError, IntegrityError, OffsiteError

PRIVATE_KEY_FILE = "signing_key.pem"
PUBLIC_KEY_FILE = "signing_key.pub.pem"
SALT_FILE = "dataset_salt.bin"
SALT_BYTES = 32
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


@dataclass(frozen=True)
class KeyPaths:
    """Where a data owner's signing key, public key and salt live."""

    private_key: Path
    public_key: Path
    salt: Path

    @classmethod
    def in_dir(cls, directory: str | os.PathLike) -> KeyPaths:
        d = Path(directory)
        return cls(d / PRIVATE_KEY_FILE, d / PUBLIC_KEY_FILE, d / SALT_FILE)


# ------------------------------------------------------------------------------------------ key files


def _write_new_file(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write ``data`` to a file that has ``mode`` from the moment it exists.

    A chmod after the fact would leave a window in which another local user can open the file.
    Without ``overwrite``, O_EXCL makes "refuse to overwrite" race-free; with it, the new content is
    written to a fresh 0600 temporary file and renamed over the old one.
    """
    target = path if not overwrite else path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(target, path)
    except BaseException:
        if overwrite:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
        raise


def init_client_keys(directory: str | os.PathLike, force: bool = False) -> KeyPaths:
    """Create the data owner's Ed25519 signing key, public key and secret salt in ``directory``.

    Refuses (OffsiteError) if any of the three files exists, unless ``force``: replacing a key makes
    earlier receipts unverifiable against the new one, and replacing the salt changes every dataset
    fingerprint.
    """
    paths = KeyPaths.in_dir(directory)
    existing = [p for p in (paths.private_key, paths.public_key, paths.salt) if p.exists() or p.is_symlink()]
    if existing and not force:
        raise OffsiteError(
            "refusing to overwrite existing key material: "
            + ", ".join(str(p) for p in existing)
            + " (use --force to replace it; receipts signed with the old key will no longer verify "
            "against the new one, and dataset fingerprints will change)"
        )
    Path(directory).mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_new_file(paths.private_key, private_pem, 0o600, overwrite=force)
    _write_new_file(paths.salt, secrets.token_bytes(SALT_BYTES), 0o600, overwrite=force)
    _write_new_file(paths.public_key, public_key_pem(key.public_key()), 0o644, overwrite=force)
    return paths


# ------------------------------------------------------------------------------------------ loading


def _read(path: str | os.PathLike, missing: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as e:
        raise OffsiteError(missing) from e


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """Load an unencrypted Ed25519 private key from PEM."""
    data = _read(path, f"signing key {path} does not exist; create one with `offsite client keys init`")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        # The exception text never contains key bytes, but keep it generic anyway.
        raise FormatError(f"{path} is not an unencrypted PEM private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise FormatError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file."""
    data = _read(path, f"public key {path} does not exist")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise FormatError(f"{path} is not a PEM public key") from e
    if not isinstance(key, Ed25519PublicKey):
        raise FormatError(f"{path} is not an Ed25519 public key")
    return key


def load_salt(path: str | os.PathLike) -> bytes:
    """The data owner's secret salt for dataset fingerprints."""
    salt = _read(path, f"secret salt {path} does not exist; create it with `offsite client keys init`")
    if len(salt) != SALT_BYTES:
        raise FormatError(f"{path} must hold exactly {SALT_BYTES} bytes, found {len(salt)}")
    return salt


def public_key_raw(public_key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_from_raw(raw: bytes) -> Ed25519PublicKey:
    if len(raw) != PUBLIC_KEY_BYTES:
        raise FormatError(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_to_b64(public_key: Ed25519PublicKey) -> str:
    return base64.b64encode(public_key_raw(public_key)).decode("ascii")


def public_key_from_b64(text: str, what: str = "public key") -> Ed25519PublicKey:
    return public_key_from_raw(b64decode_strict(text, what))


def public_key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """sha256 of the raw public key bytes, hex: how a key is named in receipts and on screen."""
    return hashlib.sha256(public_key_raw(public_key)).hexdigest()


# ------------------------------------------------------------------------------------------ signatures


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The raw 64-byte Ed25519 signature of ``data``."""
    return private_key.sign(data)


def verify(public_key: Ed25519PublicKey, data: bytes, signature: bytes) -> None:
    """Check an Ed25519 signature; IntegrityError if it does not match."""
    try:
        public_key.verify(signature, data)
    except InvalidSignature as e:
        raise IntegrityError(
            f"signature does not match (key {public_key_fingerprint(public_key)[:16]}…): "
            "the data was modified or signed by another key"
        ) from e


def b64decode_strict(text: str, what: str) -> bytes:
    """Decode standard base64, rejecting anything that is not (untrusted input)."""
    try:
        return base64.b64decode(text.strip().encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as e:
        raise FormatError(f"{what}: not valid base64") from e


def encode_signature(signature: bytes) -> bytes:
    """Signature file content: base64 of the raw 64-byte signature, one line."""
    return base64.b64encode(signature) + b"\n"


def decode_signature(data: bytes, what: str = "signature") -> bytes:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as e:
        raise FormatError(f"{what}: must be base64 text") from e
    sig = b64decode_strict(text, what)
    if len(sig) != SIGNATURE_BYTES:
        raise FormatError(f"{what}: an Ed25519 signature has {SIGNATURE_BYTES} bytes, got {len(sig)}")
    return sig
