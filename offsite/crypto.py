"""All signing and verification in one place: Ed25519 keys, signatures, fingerprints, secret salt.

Keeping every cryptographic operation here means one module to review, and one place where the
server's certificate handling will go later. Nothing here ever prints or logs private material.

On the data owner's machine (the client credentials directory, ``offsite.state.client_dir()``, unless
``--dir``), the key material is one unit, a *generation*::

    keys/CURRENT                 the name of the generation in force (one line); replaced atomically
    keys/gen-<time>-<tag>/
        signing_key.pem          Ed25519 private key, PKCS#8 PEM, unencrypted, mode 0600
        signing_key.pub.pem      its public key, SubjectPublicKeyInfo PEM
        dataset_salt.bin         32 random bytes keying dataset fingerprints (HMAC), mode 0600

A new generation is written whole into a staging directory (each file and the directory fsynced),
renamed to its final name, and only then made current by replacing ``keys/CURRENT``: a crash at any
point leaves the old generation or the new one in force, never a mix. Loading also checks that the
public key is the private key's, and refuses otherwise. Older versions kept the three files directly in
the credentials directory; they are still read, and replaced by a generation at the next ``--force``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from offsite.errors import FormatError, IntegrityError, OffsiteError
from offsite.fileio import exclusive_lock, fsync_directory, write_bytes_atomic, write_new_file

PRIVATE_KEY_FILE = "signing_key.pem"
PUBLIC_KEY_FILE = "signing_key.pub.pem"
SALT_FILE = "dataset_salt.bin"
KEYS_DIR = "keys"
CURRENT_FILE = "CURRENT"
_GENERATION = re.compile(r"gen-\d{8}T\d{6}Z-[0-9a-f]{8}")
SALT_BYTES = 32
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


@dataclass(frozen=True)
class KeyPaths:
    """Where a data owner's signing key, public key and salt live."""

    private_key: Path
    public_key: Path
    salt: Path
    #: Set by ``init_client_keys`` when it moved budget histories aside (``discard_histories``).
    discarded_histories: Path | None = None

    @classmethod
    def in_dir(cls, directory: str | os.PathLike) -> KeyPaths:
        """The key files in force in the credentials directory ``directory``: those of the generation
        ``keys/CURRENT`` names, or else (an older layout) the files directly in ``directory``."""
        d = Path(directory)
        generation = current_generation(d)
        base = d / KEYS_DIR / generation if generation else d
        return cls(base / PRIVATE_KEY_FILE, base / PUBLIC_KEY_FILE, base / SALT_FILE)

    def existing(self) -> list[Path]:
        return [p for p in (self.private_key, self.public_key, self.salt) if p.exists() or p.is_symlink()]


def current_generation(directory: str | os.PathLike) -> str | None:
    """The key generation in force in ``directory`` (None if there is none)."""
    pointer = Path(directory) / KEYS_DIR / CURRENT_FILE
    try:
        name = pointer.read_bytes().decode("ascii").strip()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        name = ""
    if not _GENERATION.fullmatch(name) or not (pointer.parent / name).is_dir():
        raise FormatError(f"{pointer} does not name a key generation in {pointer.parent}")
    return name


# ------------------------------------------------------------------------------------------ key files


def init_client_keys(
    directory: str | os.PathLike,
    force: bool = False,
    *,
    keep_salt: bool = False,
    discard_histories: bool = False,
) -> KeyPaths:
    """Create the data owner's signing key, public key and secret salt in ``directory``, as one unit.

    Refuses (OffsiteError) if key material exists, unless ``force``: a new key makes earlier receipts
    unverifiable against it, and a new salt changes every dataset fingerprint. With budget histories in
    ``directory`` (they depend on the salt: fingerprints name their datasets), ``force`` also needs to
    be told what to do with them: ``keep_salt`` replaces only the signing key; ``discard_histories``
    replaces the salt too and moves the histories, record hashes and record key aside
    (``budgets.discarded-*``), where they are no longer enforced. The record-hash key is never
    replaced while histories are in force.
    """
    d = Path(directory)
    if keep_salt and discard_histories:
        raise OffsiteError("--keep-salt and --discard-histories contradict each other: choose one")
    if (keep_salt or discard_histories) and not force:
        raise OffsiteError("--keep-salt and --discard-histories only apply with --force")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    with exclusive_lock(d / KEYS_DIR / ".lock"):
        old = KeyPaths.in_dir(d)
        existing = old.existing()
        if existing and not force:
            raise OffsiteError(
                "refusing to overwrite existing key material: "
                + ", ".join(str(p) for p in existing)
                + " (use --force to replace it; receipts signed with the old key will no longer verify "
                "against the new one, and dataset fingerprints will change)"
            )
        if keep_salt and not old.salt.is_file():
            raise OffsiteError(f"--keep-salt: there is no salt to keep in {d}")
        salt = load_salt(old.salt) if keep_salt else secrets.token_bytes(SALT_BYTES)
        discarded = None
        if existing and not keep_salt:
            discarded = _settle_histories(d, discard_histories)
        generation = _write_generation(d / KEYS_DIR, Ed25519PrivateKey.generate(), salt)
        # The switch: one atomic rename. Before it the old generation is in force, after it the new.
        write_bytes_atomic(d / KEYS_DIR / CURRENT_FILE, f"{generation}\n".encode("ascii"), mode=0o600)
        _remove_other_generations(d, keep=generation)
    paths = KeyPaths.in_dir(d)
    return KeyPaths(paths.private_key, paths.public_key, paths.salt, discarded)


def _settle_histories(directory: Path, discard: bool) -> Path | None:
    """Refuse to replace the salt while budget histories depend on it, unless told to discard them."""
    from offsite.privacy import history  # the budget histories are the privacy package's

    if not history.histories_exist(directory):
        return None
    if not discard:
        raise OffsiteError(
            f"budget histories in {history.budgets_dir(directory)} depend on this salt (the fingerprints "
            "of their datasets) and on the record-hash key beside them. Use --force --keep-salt to replace "
            "only the signing key (histories stay in force), or --force --discard-histories to replace "
            "the salt too and move the histories aside, no longer enforced: the budget spent on every "
            "dataset would then be forgotten on this machine"
        )
    return history.discard_histories(directory)


def _write_generation(keys_dir: Path, key: Ed25519PrivateKey, salt: bytes) -> str:
    """Write a complete, fsynced generation under a fresh name (not yet in force); return the name."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"gen-{stamp}-{secrets.token_hex(4)}"
    stage = keys_dir / f".staging-{secrets.token_hex(8)}"
    stage.mkdir(mode=0o700)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Each file is 0600 (or 0644) from the moment it exists and complete or absent.
    write_new_file(stage / PRIVATE_KEY_FILE, private_pem, mode=0o600)
    write_new_file(stage / SALT_FILE, salt, mode=0o600)
    write_new_file(stage / PUBLIC_KEY_FILE, public_key_pem(key.public_key()), mode=0o644)
    fsync_directory(stage)
    os.rename(stage, keys_dir / name)
    fsync_directory(keys_dir)
    return name


def _remove_other_generations(directory: Path, keep: str) -> None:
    """Old generations, interrupted stagings and files of the older flat layout (never in force now)."""
    keys_dir = directory / KEYS_DIR
    for path in keys_dir.iterdir():
        if path.name != keep and (_GENERATION.fullmatch(path.name) or path.name.startswith(".staging-")):
            shutil.rmtree(path, ignore_errors=True)
    for name in (PRIVATE_KEY_FILE, SALT_FILE, PUBLIC_KEY_FILE):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()


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


def load_client_keys(directory: str | os.PathLike) -> tuple[Ed25519PrivateKey, bytes]:
    """The signing key and salt in force in ``directory``, checked to belong together."""
    paths = KeyPaths.in_dir(directory)
    if not paths.private_key.is_file() or not paths.salt.is_file():
        raise OffsiteError(f"no signing key in {Path(directory)}: run `offsite client keys init` first")
    private_key = load_private_key(paths.private_key)
    if public_key_raw(load_public_key(paths.public_key)) != public_key_raw(private_key.public_key()):
        raise IntegrityError(
            f"{paths.public_key} is not the public key of {paths.private_key}: the key files do not belong "
            "together (a key change interrupted by an older version of offsite?), and receipts signed now "
            "would not verify against the public key you hand out. Make a consistent set with "
            "`offsite client keys init --force --keep-salt`"
        )
    return private_key, load_salt(paths.salt)


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
