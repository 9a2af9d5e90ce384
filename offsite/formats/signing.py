"""The owner's signature over a bundle: a detached Ed25519 signature of ``manifest.json``'s exact bytes.

``BUNDLE/manifest.sig`` (one line of base64, like ``receipt.sig``) sits beside the manifest. The
manifest lists the sha256 of every other file, so the signature covers the whole bundle. The owner
signs when it publishes a bundle to a job (``offsite owner publish``); ``offsite client fetch`` refuses
a bundle whose signature does not verify with the owner key of its enrolment package, before any
file is loaded. A bundle directory used by hand (``offsite client train BUNDLE``):

* signed, owner key known: the signature must verify (a bundle signed by anyone else is refused);
* signed, no owner key (not enrolled): trains, with a warning that the signature was not checked;
* unsigned: trains, with a warning.

The owner's signing key (``STATE/signing/``) is made by ``offsite owner init``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from offsite import crypto
from offsite.errors import IntegrityError

MANIFEST_SIGNATURE = "manifest.sig"
OWNER_PRIVATE_KEY = "owner_signing_key.pem"
OWNER_PUBLIC_KEY = "owner_signing_key.pub.pem"


class UnverifiedBundleWarning(UserWarning):
    """A bundle is used without an owner signature checked against a known key."""


def init_owner_signing_key(directory: str | os.PathLike) -> Path:
    """Make the owner's Ed25519 signing key (0600) and public key in ``directory``; refuse to replace."""
    from offsite.pki import write_secret

    directory = Path(directory)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_secret(directory / OWNER_PRIVATE_KEY, pem)
    (directory / OWNER_PUBLIC_KEY).write_bytes(crypto.public_key_pem(key.public_key()))
    return directory / OWNER_PRIVATE_KEY


def sign_manifest(manifest: bytes, key: Ed25519PrivateKey) -> bytes:
    """The content of ``manifest.sig`` for the exact bytes ``manifest``."""
    return crypto.encode_signature(crypto.sign(key, manifest))


def verify_manifest(manifest: bytes, signature_file: bytes, owner_key: Ed25519PublicKey) -> None:
    """IntegrityError unless ``signature_file`` is ``owner_key``'s signature over ``manifest``."""
    signature = crypto.decode_signature(signature_file, MANIFEST_SIGNATURE)
    try:
        crypto.verify(owner_key, manifest, signature)
    except IntegrityError:
        raise IntegrityError(
            "the bundle's manifest is not signed by the model owner you enrolled with "
            f"(key {crypto.public_key_fingerprint(owner_key)[:16]}…): refusing to use it"
        ) from None


def check_bundle_signature(
    bundle_dir: Path, manifest: bytes, signature: bytes | None, owner_key: Ed25519PublicKey | None
) -> str:
    """Apply the rules above to a bundle's manifest bytes and the bytes of its ``manifest.sig`` (None if
    it has none); return "verified", "unchecked" or "unsigned"."""
    if signature is None:
        warnings.warn(
            UnverifiedBundleWarning(
                f"bundle {bundle_dir} has no owner signature ({MANIFEST_SIGNATURE}): its files match its "
                "manifest, but nothing shows who made it"
            ),
            stacklevel=3,
        )
        return "unsigned"
    if owner_key is None:
        warnings.warn(
            UnverifiedBundleWarning(
                f"bundle {bundle_dir} is signed, but no owner key is known here (install an enrolment "
                "package with `offsite client keys install`): the signature was not checked"
            ),
            stacklevel=3,
        )
        return "unchecked"
    verify_manifest(manifest, signature, owner_key)
    return "verified"
