"""X.509 for the service's mutual TLS: the owner's CA, the server's certificate, data owners' requests.

Both sides need these (the owner issues, the data owner makes a key and a request, both check what they
are handed), and none of it touches the network, so it lives in the core and uses ``cryptography``
only. Ed25519 signing of manifests, receipts and submissions stays in ``offsite.crypto``.

Keys are ECDSA P-256: what every TLS stack (gRPC's BoringSSL included) accepts for certificates. A
private key is made on the machine that uses it and never leaves it: the data owner sends a
certificate signing request, the owner sends back a certificate.

A peer is identified by the sha256 of its certificate's DER bytes (``cert_sha256``), pinned when the
owner issues the certificate; that is how the server recognises (and revokes) a client.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
import secrets
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from offsite.errors import FormatError, IntegrityError, OffsiteError
from offsite.fileio import write_new_file

#: Certificates the owner issues are valid this long; re-enrol (a new request) to renew.
CA_DAYS = 3650
LEAF_DAYS = 825
#: Client ids and job ids: they appear in certificates, paths and tables.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_PEM_BYTES = 64 << 10


def validate_client_id(client_id: str) -> str:
    if not isinstance(client_id, str) or not NAME_PATTERN.fullmatch(client_id):
        raise OffsiteError(
            f"client id {client_id!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return client_id


# ------------------------------------------------------------------------------------------ keys


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(path: str | os.PathLike) -> ec.EllipticCurvePrivateKey:
    data = _read(path, "TLS private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise FormatError(f"{path} is not an unencrypted PEM private key") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FormatError(f"{path} is not an ECDSA private key")
    return key


def write_secret(path: str | os.PathLike, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the moment it exists, complete or not at all, never over
    another file (``fileio.write_new_file``); its directory is made 0700 if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_new_file(path, data, mode=0o600)


# ------------------------------------------------------------------------------------------ certificates


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock differences
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "offsite"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(common_name: str, days: int = CA_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = new_key()
    name = _name(common_name)
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key,
    common_name: str,
    san: x509.GeneralName,
    usage: x509.ObjectIdentifier,
    days: int,
) -> x509.Certificate:
    return (
        _builder(_name(common_name), ca_cert.subject, public_key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def server_san(name: str) -> x509.GeneralName:
    """An IP address SAN for a literal address, else a DNS name (clients check the host name)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not re.fullmatch(
        r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?",
        name,
    ):
        raise OffsiteError(f"server name {name!r} is neither a DNS name nor an IP address")
    return x509.DNSName(name)


def issue_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    server_key: ec.EllipticCurvePrivateKey,
    name: str,
    days: int = LEAF_DAYS,
) -> x509.Certificate:
    return _leaf(
        ca_key,
        ca_cert,
        server_key.public_key(),
        name,
        server_san(name),
        ExtendedKeyUsageOID.SERVER_AUTH,
        days,
    )


def make_csr(key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    """A request carrying the data owner's TLS public key; the owner chooses the name it certifies."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name("offsite data owner"))
        .sign(key, hashes.SHA256())
    )


def issue_client_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    client_id: str,
    days: int = LEAF_DAYS,
) -> x509.Certificate:
    """Certify the CSR's public key (only that is taken from the request) as ``client_id``."""
    validate_client_id(client_id)
    if not csr.is_signature_valid:
        raise IntegrityError("the certificate request's signature does not verify (not made with its key)")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
        raise FormatError("the certificate request's key must be ECDSA P-256")
    san = x509.UniformResourceIdentifier(f"urn:offsite:client:{client_id}")
    return _leaf(ca_key, ca_cert, public_key, client_id, san, ExtendedKeyUsageOID.CLIENT_AUTH, days)


# ------------------------------------------------------------------------------------------ reading


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise OffsiteError(f"{what} {path} does not exist") from e
    if len(data) > _MAX_PEM_BYTES:
        raise FormatError(f"{what} {path}: {len(data)} bytes is too large for a PEM file")
    return data


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def parse_cert(data: bytes, what: str) -> x509.Certificate:
    if len(data) > _MAX_PEM_BYTES:
        raise FormatError(f"{what}: too large for a certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise FormatError(f"{what}: not a PEM certificate") from e


def load_cert(path: str | os.PathLike) -> x509.Certificate:
    return parse_cert(_read(path, "certificate"), str(path))


def parse_csr(data: bytes, what: str) -> x509.CertificateSigningRequest:
    if len(data) > _MAX_PEM_BYTES:
        raise FormatError(f"{what}: too large for a certificate request")
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise FormatError(f"{what}: not a PEM certificate signing request") from e


def cert_sha256(cert: x509.Certificate) -> str:
    """The pin: sha256 of the certificate's DER bytes, hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def pem_cert_sha256(pem: bytes | str) -> str:
    """The pin of a PEM certificate as TLS reports it (``x509_pem_cert``), without parsing X.509."""
    text = pem.decode("ascii") if isinstance(pem, bytes) else pem
    try:
        der = ssl.PEM_cert_to_DER_cert(text.strip() + "\n")
    except ValueError as e:
        raise FormatError("peer certificate: not PEM") from e
    return hashlib.sha256(der).hexdigest()


def check_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate, what: str) -> None:
    """``cert`` carries a valid signature of ``ca_cert`` (refuse a certificate from another CA)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise IntegrityError(f"{what} was not issued by this owner's CA") from e
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise OffsiteError(
            f"{what} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d})"
        )


def same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def validate_name(value: str, what: str) -> str:
    """A job id or similar owner-chosen name: the same rule as client ids."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise FormatError(
            f"{what} {value!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value
