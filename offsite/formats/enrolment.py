"""Enrolment: how a data owner becomes a client of a model owner's server, with no private key moving.

1. The data owner (``offsite client keys init`` or ``keys request``) makes a TLS key and writes an
   **enrolment request**: a certificate signing request for that key plus its receipt-signing
   (Ed25519) public key, the whole signed by that Ed25519 key (proof that the sender holds it).
2. The owner (``offsite owner enrol REQUEST --client-id ID``) checks both signatures, records the
   receipt key for ID, issues a client certificate and writes an **enrolment package**: the client
   certificate, the owner's CA certificate, the owner's signing public key, and ``enrolment.json``.
3. The data owner installs the package (``offsite client keys install DIR``), which checks that the
   certificate is for its own TLS key, comes from the CA in the package, and that the owner enrolled
   its own receipt key.
"""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from typing import Annotated, Literal

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509 import CertificateSigningRequest
from pydantic import StringConstraints

from offsite import crypto, pki
from offsite.errors import FormatError
from offsite.fileio import canonical_json
from offsite.formats.schema import Schema, parse

REQUEST_FORMAT = "offsite-enrolment-request"
PACKAGE_FORMAT = "offsite-enrolment"

# The files of an enrolment package.
CLIENT_CERT = "client.pem"
CA_CERT = "ca.pem"
OWNER_KEY = "owner_signing_key.pub.pem"
INFO = "enrolment.json"
PACKAGE_FILES = (CLIENT_CERT, CA_CERT, OWNER_KEY, INFO)

Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(pattern=pki.NAME_PATTERN.pattern.join("^$"))]
Address = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.:\[\]-]{1,260}:[0-9]{1,5}$")]


class EnrolmentRequest(Schema):
    format: Literal["offsite-enrolment-request"]
    format_version: Literal[1]
    csr: Annotated[str, StringConstraints(max_length=16384)]
    receipt_public_key: Annotated[str, StringConstraints(max_length=64)]
    created_at: Annotated[str, StringConstraints(max_length=64)]
    signature: Annotated[str, StringConstraints(max_length=128)]


class EnrolmentInfo(Schema):
    format: Literal["offsite-enrolment"]
    format_version: Literal[1]
    client_id: Name
    server_address: Address
    server_name: Annotated[str, StringConstraints(min_length=1, max_length=253)]
    client_cert_sha256: Hex64
    ca_cert_sha256: Hex64
    owner_key_fingerprint: Hex64
    receipt_key_fingerprint: Hex64
    issued_at: Annotated[str, StringConstraints(max_length=64)]


def _signed_part(doc: dict) -> bytes:
    return canonical_json({k: v for k, v in doc.items() if k != "signature"})


def make_request(tls_key: EllipticCurvePrivateKey, signing_key: Ed25519PrivateKey) -> bytes:
    doc = {
        "format": REQUEST_FORMAT,
        "format_version": 1,
        "csr": pki.csr_pem(pki.make_csr(tls_key)).decode("ascii"),
        "receipt_public_key": crypto.public_key_to_b64(signing_key.public_key()),
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    doc["signature"] = base64.b64encode(crypto.sign(signing_key, _signed_part(doc))).decode("ascii")
    return canonical_json(doc)


def read_request(data: bytes, what: str) -> tuple[CertificateSigningRequest, Ed25519PublicKey]:
    """Parse and check a request: its Ed25519 signature and its CSR's own signature."""
    request = parse(EnrolmentRequest, data, what)
    doc = request.model_dump()
    receipt_key = crypto.public_key_from_b64(request.receipt_public_key, f"{what}.receipt_public_key")
    signature = crypto.b64decode_strict(request.signature, f"{what}.signature")
    if len(signature) != crypto.SIGNATURE_BYTES:
        raise FormatError(f"{what}.signature: an Ed25519 signature has {crypto.SIGNATURE_BYTES} bytes")
    crypto.verify(receipt_key, _signed_part(doc), signature)
    csr = pki.parse_csr(request.csr.encode("ascii"), f"{what}.csr")
    if not csr.is_signature_valid:
        raise FormatError(f"{what}.csr: its signature does not verify")
    return csr, receipt_key


def make_info(
    *,
    client_id: str,
    server_address: str,
    server_name: str,
    client_cert_sha256: str,
    ca_cert_sha256: str,
    owner_key_fingerprint: str,
    receipt_key_fingerprint: str,
) -> bytes:
    info = EnrolmentInfo(
        format=PACKAGE_FORMAT,
        format_version=1,
        client_id=client_id,
        server_address=server_address,
        server_name=server_name,
        client_cert_sha256=client_cert_sha256,
        ca_cert_sha256=ca_cert_sha256,
        owner_key_fingerprint=owner_key_fingerprint,
        receipt_key_fingerprint=receipt_key_fingerprint,
        issued_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    return canonical_json(info.model_dump())


def read_info(data: bytes, what: str) -> EnrolmentInfo:
    return parse(EnrolmentInfo, data, what)
