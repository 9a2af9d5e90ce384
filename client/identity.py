"""The data owner's credentials for the service, in its keys directory (``--keys-dir``, default
``$OFFSITE_CLIENT_DIR``), beside the receipt-signing key and salt of ``offsite client keys init``::

    tls/client.key              ECDSA P-256 key of the client certificate (0600; never leaves this machine)
    enrolment-request.json      the request to send to the model owner (public: a CSR and the public key)
    enrolment/                  the installed enrolment package:
      client.pem                  this client's certificate, issued by the owner's CA
      ca.pem                      the owner's CA (the server's certificate must chain to it)
      owner_signing_key.pub.pem   the owner's key that signs bundle manifests
      enrolment.json              client id, server address and name, fingerprints
    checkpoints/                the owner's signed ledger checkpoints (``offsite.client.checkpoints``)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from offsite import crypto, pki
from offsite.errors import FormatError, IntegrityError, OffsiteError
from offsite.fileio import staged_directory, write_bytes_atomic
from offsite.formats import enrolment

REQUEST_FILE = "enrolment-request.json"


@dataclass(frozen=True)
class ClientPaths:
    root: Path

    @property
    def tls_key(self) -> Path:
        return self.root / "tls" / "client.key"

    @property
    def request(self) -> Path:
        return self.root / REQUEST_FILE

    @property
    def enrolment(self) -> Path:
        return self.root / "enrolment"

    def package_file(self, name: str) -> Path:
        return self.enrolment / name


def make_tls_key(root: str | os.PathLike, force: bool = False) -> Path:
    """The TLS key (0600), made here; kept if present unless ``force`` (then the old one is replaced)."""
    paths = ClientPaths(Path(root))
    if paths.tls_key.exists() and not force:
        return paths.tls_key
    pem = pki.key_pem(pki.new_key())
    if paths.tls_key.exists():
        tmp = paths.tls_key.with_name(".client.key.new")
        tmp.unlink(missing_ok=True)
        pki.write_secret(tmp, pem)
        os.replace(tmp, paths.tls_key)
    else:
        pki.write_secret(paths.tls_key, pem)
    return paths.tls_key


def write_request(root: str | os.PathLike) -> Path:
    """An enrolment request for the TLS key and the receipt-signing key in ``root`` (makes the TLS key
    if there is none)."""
    paths = ClientPaths(Path(root))
    signing_key = crypto.load_private_key(crypto.KeyPaths.in_dir(paths.root).private_key)
    make_tls_key(paths.root)
    request = enrolment.make_request(pki.load_key(paths.tls_key), signing_key)
    write_bytes_atomic(paths.request, request)
    return paths.request


def _read_package_file(directory: Path, name: str) -> bytes:
    path = directory / name
    if path.is_symlink() or not path.is_file():
        raise FormatError(f"{directory} is not an enrolment package: {name} is missing or not a regular file")
    data = path.read_bytes()
    if len(data) > 1 << 20:
        raise FormatError(f"{path}: too large")
    return data


def check_package(root: Path, directory: Path) -> enrolment.EnrolmentInfo:
    """Every check ``install`` makes, on a package directory; returns its ``enrolment.json``."""
    files = {name: _read_package_file(directory, name) for name in enrolment.PACKAGE_FILES}
    info = enrolment.read_info(files[enrolment.INFO], str(directory / enrolment.INFO))
    cert = pki.parse_cert(files[enrolment.CLIENT_CERT], enrolment.CLIENT_CERT)
    ca = pki.parse_cert(files[enrolment.CA_CERT], enrolment.CA_CERT)
    pki.check_issued_by(cert, ca, "the client certificate")
    if pki.cert_sha256(cert) != info.client_cert_sha256 or pki.cert_sha256(ca) != info.ca_cert_sha256:
        raise IntegrityError(f"{directory}: the certificates are not the ones enrolment.json names")
    paths = ClientPaths(root)
    if not pki.same_public_key(cert, pki.load_key(paths.tls_key)):
        raise IntegrityError(
            "the enrolment package certifies another TLS key than this machine's "
            f"({paths.tls_key}): was it made for another request?"
        )
    signing_public = crypto.load_public_key(crypto.KeyPaths.in_dir(root).public_key)
    if crypto.public_key_fingerprint(signing_public) != info.receipt_key_fingerprint:
        raise IntegrityError(
            "the owner enrolled another receipt-signing key than this machine's: send a fresh request "
            "(`offsite client keys request`)"
        )
    owner_key = crypto.load_public_key(directory / enrolment.OWNER_KEY)
    if crypto.public_key_fingerprint(owner_key) != info.owner_key_fingerprint:
        raise IntegrityError(f"{directory}: the owner key is not the one enrolment.json names")
    return info


def install(root: str | os.PathLike, directory: str | os.PathLike) -> enrolment.EnrolmentInfo:
    """Check an enrolment package and install it (replacing an earlier one, all or nothing)."""
    root, directory = Path(root), Path(directory)
    info = check_package(root, directory)
    paths = ClientPaths(root)
    with staged_directory(paths.enrolment, overwrite=True) as stage:
        for name in enrolment.PACKAGE_FILES:
            write_bytes_atomic(stage / name, (directory / name).read_bytes())
    return info


@dataclass(frozen=True)
class Credentials:
    """Everything a call to the owner's server needs."""

    client_id: str
    server_address: str
    server_name: str
    tls_key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    owner_key: Ed25519PublicKey
    signing_key: Ed25519PrivateKey


def load_credentials(root: str | os.PathLike) -> Credentials:
    root = Path(root)
    paths = ClientPaths(root)
    if not (paths.enrolment / enrolment.INFO).is_file():
        raise OffsiteError(
            f"no enrolment package installed in {root}: send {paths.request.name} (from `offsite client keys "
            "init` or `keys request`) to the model owner, then `offsite client keys install DIR`"
        )
    info = check_package(root, paths.enrolment)
    return Credentials(
        client_id=info.client_id,
        server_address=info.server_address,
        server_name=info.server_name,
        tls_key_pem=paths.tls_key.read_bytes(),
        cert_pem=(paths.enrolment / enrolment.CLIENT_CERT).read_bytes(),
        ca_pem=(paths.enrolment / enrolment.CA_CERT).read_bytes(),
        owner_key=crypto.load_public_key(paths.enrolment / enrolment.OWNER_KEY),
        signing_key=crypto.load_private_key(crypto.KeyPaths.in_dir(root).private_key),
    )


def owner_key(root: str | os.PathLike) -> Ed25519PublicKey | None:
    """The owner's signing key from the installed enrolment package, or None if none is installed."""
    path = ClientPaths(Path(root)).package_file(enrolment.OWNER_KEY)
    return crypto.load_public_key(path) if path.is_file() else None
