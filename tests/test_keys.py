"""The data owner's signing keys: file modes, refusal to overwrite, signatures, and the CLI."""

from __future__ import annotations

import argparse
import hashlib
import os

import pytest

from offsite import crypto
from offsite.cli.keys import register_keys
from offsite.errors import IntegrityError, OffsiteError


def _parser() -> argparse.ArgumentParser:
    # The `client` role parser calls register_keys; build just that much here (main.py imports
    # modules other people are still writing).
    parser = argparse.ArgumentParser(prog="offsite")
    roles = parser.add_subparsers(dest="command", required=True)
    client = roles.add_parser("client")
    register_keys(client.add_subparsers(dest="client_command", required=True))
    return parser


def test_init_creates_private_files_with_0600(tmp_path):
    paths = crypto.init_client_keys(tmp_path / "keys")
    assert os.stat(paths.private_key).st_mode & 0o777 == 0o600
    assert os.stat(paths.salt).st_mode & 0o777 == 0o600
    assert len(paths.salt.read_bytes()) == 32
    assert b"PRIVATE KEY" in paths.private_key.read_bytes()
    assert b"PUBLIC KEY" in paths.public_key.read_bytes()
    assert not any(p.name.endswith(".tmp") for p in paths.private_key.parent.iterdir())


def test_0600_from_creation_even_with_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        paths = crypto.init_client_keys(tmp_path / "k")
    finally:
        os.umask(old)
    assert os.stat(paths.private_key).st_mode & 0o777 == 0o600
    assert os.stat(paths.salt).st_mode & 0o777 == 0o600


def test_refuses_to_overwrite_unless_forced(tmp_path):
    paths = crypto.init_client_keys(tmp_path)
    before = paths.private_key.read_bytes(), paths.salt.read_bytes()
    with pytest.raises(OffsiteError, match="refusing to overwrite"):
        crypto.init_client_keys(tmp_path)
    assert (paths.private_key.read_bytes(), paths.salt.read_bytes()) == before
    crypto.init_client_keys(tmp_path, force=True)
    assert paths.private_key.read_bytes() != before[0] and paths.salt.read_bytes() != before[1]
    assert os.stat(paths.private_key).st_mode & 0o777 == 0o600
    assert os.stat(paths.salt).st_mode & 0o777 == 0o600


def test_sign_verify_and_fingerprint(tmp_path):
    paths = crypto.init_client_keys(tmp_path)
    priv, pub = crypto.load_private_key(paths.private_key), crypto.load_public_key(paths.public_key)
    sig = crypto.sign(priv, b"hello")
    assert len(sig) == 64
    crypto.verify(pub, b"hello", sig)
    with pytest.raises(IntegrityError):
        crypto.verify(pub, b"hellO", sig)
    other = crypto.load_public_key(crypto.init_client_keys(tmp_path / "other").public_key)
    with pytest.raises(IntegrityError):
        crypto.verify(other, b"hello", sig)
    assert crypto.public_key_fingerprint(pub) == hashlib.sha256(crypto.public_key_raw(pub)).hexdigest()
    assert crypto.decode_signature(crypto.encode_signature(sig)) == sig
    assert crypto.public_key_fingerprint(crypto.public_key_from_b64(crypto.public_key_to_b64(pub))) == (
        crypto.public_key_fingerprint(pub)
    )


def test_load_rejects_wrong_files(tmp_path):
    paths = crypto.init_client_keys(tmp_path)
    with pytest.raises(OffsiteError):
        crypto.load_private_key(paths.public_key)
    with pytest.raises(OffsiteError):
        crypto.load_public_key(paths.salt)
    with pytest.raises(OffsiteError, match="keys init"):
        crypto.load_private_key(tmp_path / "missing.pem")


def test_cli_keys_init(tmp_path, capsys):
    d = tmp_path / "owner"
    args = _parser().parse_args(["client", "keys", "init", "--dir", str(d)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    pub = crypto.load_public_key(d / crypto.PUBLIC_KEY_FILE)
    assert crypto.public_key_fingerprint(pub) in out
    assert str(d / crypto.PRIVATE_KEY_FILE) in out
    # Never print the private key or the salt.
    private_pem = (d / crypto.PRIVATE_KEY_FILE).read_text()
    body = "".join(line for line in private_pem.splitlines() if "-----" not in line)
    assert body not in out and "PRIVATE KEY-----" not in out
    assert (d / crypto.SALT_FILE).read_bytes().hex() not in out
    # A second init refuses; --force replaces.
    args = _parser().parse_args(["client", "keys", "init", "--dir", str(d)])
    with pytest.raises(OffsiteError, match="--force"):
        args.func(args)
    args = _parser().parse_args(["client", "keys", "init", "--dir", str(d), "--force"])
    assert args.func(args) == 0


def test_cli_keys_init_default_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFSITE_CLIENT_DIR", str(tmp_path / "default"))
    args = _parser().parse_args(["client", "keys", "init"])
    assert args.func(args) == 0
    assert (tmp_path / "default" / crypto.PRIVATE_KEY_FILE).is_file()
