"""Identity and trust: owner init, enrolment requests and packages, signed manifests. No private key
ever leaves the machine it was made on."""

from __future__ import annotations

import json
import shutil
import stat
import warnings

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID

from offsite import crypto, pki
from offsite.client import identity
from offsite.client.transfers import OffsiteClient
from offsite.errors import FormatError, IntegrityError, OffsiteError
from offsite.fileio import canonical_json, sha256_bytes
from offsite.formats import enrolment, signing
from offsite.formats.bundle import Bundle
from offsite.server import admin
from offsite.server.errors import AlreadyExistsError
from offsite.server.owner_state import OwnerPaths, OwnerState, init_owner
from offsite.wire.v1 import offsite_pb2 as pb


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_owner_init_makes_keys_0600_and_refuses_to_run_twice(tmp_path):
    paths = init_owner(tmp_path / "owner", "server.example.org", 7443)
    for key in (paths.ca_key, paths.server_key, paths.signing_key):
        assert _mode(key) == 0o600, key
    cert = pki.load_cert(paths.server_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["server.example.org"]
    assert (
        ExtendedKeyUsageOID.SERVER_AUTH
        in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    pki.check_issued_by(cert, pki.load_cert(paths.ca_cert), "server certificate")
    assert json.loads(paths.server_config.read_text()) == {"port": 7443, "server_name": "server.example.org"}
    before = paths.ca_key.read_bytes()
    with pytest.raises(OffsiteError, match="initialised already"):
        init_owner(tmp_path / "owner", "other", 1)
    assert paths.ca_key.read_bytes() == before
    ip = init_owner(tmp_path / "ip", "127.0.0.1")
    san = pki.load_cert(ip.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    with pytest.raises(OffsiteError, match="neither a DNS name nor an IP"):
        init_owner(tmp_path / "bad", "bad name!")


@pytest.fixture
def owner(tmp_path):
    init_owner(tmp_path / "owner", "localhost")
    with OwnerState(tmp_path / "owner") as state:
        yield state


def _client_keys(path):
    crypto.init_client_keys(path)
    return identity.write_request(path)


def test_enrolment_round_trip_without_moving_a_private_key(owner, tmp_path):
    request = _client_keys(tmp_path / "alice")
    assert _mode(tmp_path / "alice" / "tls" / "client.key") == 0o600
    assert b"PRIVATE" not in request.read_bytes()
    record = admin.enrol(owner, request.read_bytes(), "alice", tmp_path / "package", "request")
    package = tmp_path / "package"
    assert sorted(p.name for p in package.iterdir()) == sorted(enrolment.PACKAGE_FILES)
    assert not any(b"PRIVATE" in p.read_bytes() for p in package.iterdir())
    cert = pki.parse_cert((package / enrolment.CLIENT_CERT).read_bytes(), "client cert")
    assert pki.common_name(cert) == "alice" and pki.cert_sha256(cert) == record.cert_sha256
    assert (
        ExtendedKeyUsageOID.CLIENT_AUTH
        in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    assert record.receipt_key_fingerprint == crypto.public_key_fingerprint(
        crypto.load_public_key(crypto.KeyPaths.in_dir(tmp_path / "alice").public_key)
    )
    info = identity.install(tmp_path / "alice", package)
    assert (info.client_id, info.server_address) == ("alice", "localhost:50051")
    creds = identity.load_credentials(tmp_path / "alice")
    assert creds.client_id == "alice" and creds.server_name == "localhost"
    with pytest.raises(AlreadyExistsError):
        admin.enrol(owner, request.read_bytes(), "alice", tmp_path / "package2", "request")
    assert not (tmp_path / "package2").exists()  # nothing written for a refused enrolment


def test_tampered_requests_are_refused(owner, tmp_path):
    request = json.loads(_client_keys(tmp_path / "alice").read_bytes())
    _client_keys(tmp_path / "mallory")
    other = json.loads((tmp_path / "mallory" / "enrolment-request.json").read_bytes())
    for field in ("csr", "receipt_public_key"):
        forged = dict(request, **{field: other[field]})
        with pytest.raises(IntegrityError, match="signature does not match"):
            admin.enrol(owner, canonical_json(forged), "alice", tmp_path / f"p-{field}", "request")
    with pytest.raises(FormatError, match="request.format"):
        admin.enrol(owner, canonical_json(dict(request, format="x")), "alice", tmp_path / "p", "request")
    with pytest.raises(OffsiteError, match="client id"):
        admin.enrol(owner, canonical_json(request), "../evil", tmp_path / "p", "request")


def test_install_refuses_a_package_for_other_keys_or_from_another_ca(owner, tmp_path):
    admin.enrol(owner, _client_keys(tmp_path / "alice").read_bytes(), "alice", tmp_path / "pa", "r")
    admin.enrol(owner, _client_keys(tmp_path / "bob").read_bytes(), "bob", tmp_path / "pb", "r")
    with pytest.raises(IntegrityError, match="another TLS key"):
        identity.install(tmp_path / "alice", tmp_path / "pb")
    # a package whose certificate was issued by another CA
    forged = tmp_path / "forged"
    shutil.copytree(tmp_path / "pa", forged)
    other_key, other_ca = pki.make_ca("mallory")
    (forged / enrolment.CA_CERT).write_bytes(pki.cert_pem(other_ca))
    with pytest.raises(IntegrityError, match="not issued by this owner's CA"):
        identity.install(tmp_path / "alice", forged)
    # the owner enrolled another receipt key than this machine's (the request was swapped in transit)
    crypto.init_client_keys(tmp_path / "alice2")
    shutil.copytree(tmp_path / "alice" / "tls", tmp_path / "alice2" / "tls")
    with pytest.raises(IntegrityError, match="another receipt-signing key"):
        identity.install(tmp_path / "alice2", tmp_path / "pa")
    assert not (tmp_path / "alice2" / "enrolment").exists()
    with pytest.raises(OffsiteError, match="no enrolment package installed"):
        identity.load_credentials(tmp_path / "alice2")


def test_enrolment_needs_the_ca_key(owner, tmp_path):
    request = _client_keys(tmp_path / "alice")
    OwnerPaths(owner.paths.root).ca_key.rename(tmp_path / "offline-ca.key")
    with pytest.raises(OffsiteError, match="needs the CA key"):
        admin.enrol(owner, request.read_bytes(), "alice", tmp_path / "p", "request")


def test_keys_init_also_makes_the_tls_key_and_the_request(tmp_path, capsys):
    from offsite.cli.main import main

    assert main(["client", "keys", "init", "--dir", str(tmp_path / "k"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert _mode(tmp_path / "k" / "tls" / "client.key") == 0o600
    request = (tmp_path / "k" / "enrolment-request.json").read_bytes()
    csr, key = enrolment.read_request(request, "request")
    assert crypto.public_key_fingerprint(key) == info["public_key_fingerprint"]
    assert info["enrolment_request"].endswith("enrolment-request.json")
    tls_before = (tmp_path / "k" / "tls" / "client.key").read_bytes()
    assert main(["client", "keys", "request", "--dir", str(tmp_path / "k")]) == 0
    assert (tmp_path / "k" / "tls" / "client.key").read_bytes() == tls_before  # the key is kept


# ------------------------------------------------------------------------------------------ signed bundles


def _signed_copy(world, tmp_path, key=None):
    bundle = tmp_path / "bundle"
    shutil.copytree(world.bundle, bundle)
    key = key or crypto.load_private_key(OwnerPaths(world.owner).signing_key)
    (bundle / signing.MANIFEST_SIGNATURE).write_bytes(
        signing.sign_manifest((bundle / "manifest.json").read_bytes(), key)
    )
    return bundle


def test_bundle_signature_rules(world, tmp_path):
    owner_key = world.credentials("alice").owner_key
    bundle = _signed_copy(world, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Bundle.open(bundle, owner_key=owner_key).id == world.bundle_id
    forged = _signed_copy(world, tmp_path / "x", key=Ed25519PrivateKey.generate())
    with pytest.raises(IntegrityError, match="not signed by the model owner you enrolled with"):
        Bundle.open(forged, owner_key=owner_key)
    with pytest.warns(signing.UnverifiedBundleWarning, match="signature was not checked"):
        Bundle.open(forged)
    with pytest.warns(signing.UnverifiedBundleWarning, match="has no owner signature"):
        Bundle.open(world.bundle, owner_key=owner_key)


def test_training_refuses_a_bundle_signed_by_someone_else(world, tmp_path):
    from world import train_adapter

    forged = _signed_copy(world, tmp_path, key=Ed25519PrivateKey.generate())
    with pytest.raises(IntegrityError, match="not signed by the model owner"):
        train_adapter(world, "alice", tmp_path / "adapter", bundle=forged)
    assert not (tmp_path / "adapter").exists()


def test_fetch_refuses_manifests_not_signed_by_the_owner_or_with_unsafe_paths(world, tmp_path):
    client = OffsiteClient(world.credentials("alice"), world.clients["alice"], "127.0.0.1:1")
    manifest = (world.bundle / "manifest.json").read_bytes()
    owner = crypto.load_private_key(OwnerPaths(world.owner).signing_key)
    mallory = Ed25519PrivateKey.generate()
    job = pb.Job(
        job_id="j",
        bundle_id=sha256_bytes(manifest),
        manifest=manifest,
        manifest_signature=signing.sign_manifest(manifest, mallory),
    )
    with pytest.raises(IntegrityError, match="not signed by the model owner"):
        client.verified_manifest(job)
    with pytest.raises(IntegrityError, match="not signed by the owner"):
        client.verified_manifest(pb.Job(job_id="j", bundle_id=job.bundle_id, manifest=manifest))
    for path in ("../../.bashrc", "/etc/passwd", "a/../../b", "manifest.json"):
        doc = json.loads(manifest)
        doc["files"] = {path: "0" * 64}
        evil = canonical_json(doc)
        job = pb.Job(
            job_id="j",
            bundle_id=sha256_bytes(evil),
            manifest=evil,
            manifest_signature=signing.sign_manifest(evil, owner),
        )
        with pytest.raises(FormatError, match="plain relative path|not allowed|manifest.json"):
            client.verified_manifest(job)
    client.close()
