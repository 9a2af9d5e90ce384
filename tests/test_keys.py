"""The data owner's signing keys: file modes, refusal to overwrite, one unit under a kill at every write,
rotation rules while budget histories exist, signatures, and the CLI."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from offsite import crypto
from offsite.cli.keys import register_keys
from offsite.errors import IntegrityError, OffsiteError
from offsite.privacy import history, records
from offsite.privacy.accounting import make_entry


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
    paths = crypto.init_client_keys(tmp_path, force=True)
    assert paths.private_key.read_bytes() != before[0] and paths.salt.read_bytes() != before[1]
    assert os.stat(paths.private_key).st_mode & 0o777 == 0o600
    assert os.stat(paths.salt).st_mode & 0o777 == 0o600
    assert crypto.KeyPaths.in_dir(tmp_path) == paths
    # Only the generation in force is kept: the old private key is gone.
    assert [p.name for p in (tmp_path / crypto.KEYS_DIR).iterdir() if p.is_dir()] == [
        paths.private_key.parent.name
    ]


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
    paths = crypto.KeyPaths.in_dir(d)
    pub = crypto.load_public_key(paths.public_key)
    assert crypto.public_key_fingerprint(pub) in out
    assert str(paths.private_key) in out
    # Never print the private key or the salt.
    private_pem = paths.private_key.read_text()
    body = "".join(line for line in private_pem.splitlines() if "-----" not in line)
    assert body not in out and "PRIVATE KEY-----" not in out
    assert paths.salt.read_bytes().hex() not in out
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
    assert crypto.KeyPaths.in_dir(tmp_path / "default").private_key.is_file()


# -- one unit ---------------------------------------------------------------------------------------


def _key_set(directory: Path) -> tuple[str, str, bytes]:
    """(private key's public fingerprint, public key file's fingerprint, salt) of the set in force."""
    paths = crypto.KeyPaths.in_dir(directory)
    private = crypto.load_private_key(paths.private_key).public_key()
    public = crypto.load_public_key(paths.public_key)
    return (
        crypto.public_key_fingerprint(private),
        crypto.public_key_fingerprint(public),
        paths.salt.read_bytes(),
    )


def _init_in_subprocess(directory: Path, kill_at: int | None, log: Path) -> int:
    """`init_client_keys(directory, force=True)` in a real child process, killed at write ``kill_at``."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import crash; from offsite import crypto; "
        "crash.install(sys.argv[2], None if sys.argv[3] == '-' else int(sys.argv[3]), sys.argv[4]); "
        "crypto.init_client_keys(sys.argv[2], force=True)"
    )
    args = [sys.executable, "-c", script, str(Path(__file__).parent), str(directory)]
    args += ["-" if kill_at is None else str(kill_at), str(log)]
    return subprocess.run(args, capture_output=True, timeout=120).returncode


def test_key_change_is_one_unit_when_killed_at_any_write(tmp_path):
    """`keys init --force`, killed (SIGKILL) before each of its writes in turn, leaves the old set or the
    new one in force, never a private key beside another key's public key or another set's salt. (Kill
    points before an fsync are skipped: to a later process the disk looks as after a kill at the next
    write; see crash.py.)"""
    base = tmp_path / "base"
    crypto.init_client_keys(base)
    old = _key_set(base)
    dry = tmp_path / "dry"
    shutil.copytree(base, dry)
    assert _init_in_subprocess(dry, None, tmp_path / "dry.log") == 0
    points = (tmp_path / "dry.log").read_text().splitlines()
    assert any("rename" in p or "replace" in p for p in points) and len(points) >= 6
    seen_new = False
    for k in [k for k, p in enumerate(points, 1) if " fsync " not in p]:
        d = tmp_path / f"k{k}"
        shutil.copytree(base, d)
        assert _init_in_subprocess(d, k, tmp_path / f"k{k}.log") == -9, points[k - 1]
        private, public, salt = _key_set(d)
        assert private == public, f"killed before {points[k - 1]}: public key is not the private key's"
        if private == old[0]:
            assert salt == old[2], f"killed before {points[k - 1]}: old key with another salt"
        else:
            seen_new = True
            assert salt != old[2], f"killed before {points[k - 1]}: new key with the old salt"
        tune_keys = crypto.load_client_keys(d)  # what training signs with: the same consistent set
        assert crypto.public_key_fingerprint(tune_keys[0].public_key()) == private
        # The next init finishes the job and leaves one generation, no staging directory.
        crypto.init_client_keys(d, force=True)
        left = sorted(p.name for p in (d / crypto.KEYS_DIR).iterdir() if p.is_dir())
        assert len(left) == 1 and left[0].startswith("gen-")
    assert seen_new  # the last kill point comes after the switch


def test_loading_refuses_a_public_key_of_another_key(tmp_path):
    """What a crash in the older, file-by-file key change left: training must not sign with it."""
    from offsite.tune import DataOwnerKeys

    a, b = crypto.init_client_keys(tmp_path / "a"), crypto.init_client_keys(tmp_path / "b")
    flat = tmp_path / "flat"  # the older layout: files directly in the credentials directory
    flat.mkdir()
    shutil.copy(a.private_key, flat / crypto.PRIVATE_KEY_FILE)
    shutil.copy(a.salt, flat / crypto.SALT_FILE)
    shutil.copy(b.public_key, flat / crypto.PUBLIC_KEY_FILE)
    with pytest.raises(IntegrityError, match="not the public key of"):
        DataOwnerKeys.load(flat)
    shutil.copy(a.public_key, flat / crypto.PUBLIC_KEY_FILE)
    assert DataOwnerKeys.load(flat).salt == a.salt.read_bytes()  # a consistent older layout still loads
    paths = crypto.init_client_keys(flat, force=True, keep_salt=True)  # and moves to a generation
    assert not (flat / crypto.PRIVATE_KEY_FILE).exists() and paths.salt.read_bytes() == a.salt.read_bytes()


# -- rotation while budget histories exist ------------------------------------------------------------


def _with_history(tmp_path: Path) -> tuple[Path, bytes]:
    d = tmp_path / "client"
    crypto.init_client_keys(d)
    history.record("ds", "run-1", make_entry(1.0, 0.1, 10), d)
    key = records.load_key(history.budgets_dir(d), create=True)
    return d, key


def test_force_refuses_while_histories_depend_on_the_salt(tmp_path):
    d, _ = _with_history(tmp_path)
    before = _key_set(d)
    with pytest.raises(OffsiteError, match="--keep-salt.*--discard-histories"):
        crypto.init_client_keys(d, force=True)
    assert _key_set(d) == before and history.load_history("ds", d)
    with pytest.raises(OffsiteError, match="contradict"):
        crypto.init_client_keys(d, force=True, keep_salt=True, discard_histories=True)
    with pytest.raises(OffsiteError, match="only apply with --force"):
        crypto.init_client_keys(d, keep_salt=True)


def test_keep_salt_replaces_only_the_signing_key(tmp_path):
    d, key = _with_history(tmp_path)
    before = _key_set(d)
    crypto.init_client_keys(d, force=True, keep_salt=True)
    after = _key_set(d)
    assert after[0] != before[0] and after[2] == before[2]
    assert history.load_history("ds", d)[0]["run_id"] == "run-1"
    assert records.load_key(history.budgets_dir(d), create=False) == key  # never rotated


def test_discard_histories_moves_them_aside_and_replaces_the_salt(tmp_path):
    d, key = _with_history(tmp_path)
    before = _key_set(d)
    paths = crypto.init_client_keys(d, force=True, discard_histories=True)
    after = _key_set(d)
    assert after[0] != before[0] and after[2] != before[2]
    assert not history.histories_exist(d) and history.load_history("ds", d) == []
    moved = paths.discarded_histories
    assert moved.parent == d and moved.name.startswith("budgets.discarded-")
    assert (moved / "ds.json").is_file() and (moved / records.KEY_FILE).read_bytes() == key


def test_cli_keys_init_flags_and_show(tmp_path, capsys):
    d, _ = _with_history(tmp_path)
    args = _parser().parse_args(["client", "keys", "init", "--dir", str(d), "--force"])
    with pytest.raises(OffsiteError, match="--keep-salt"):
        args.func(args)
    args = _parser().parse_args(
        ["client", "keys", "init", "--dir", str(d), "--force", "--keep-salt", "--json"]
    )
    assert args.func(args) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["discarded_histories"] is None and Path(info["public_key"]).is_file()
    args = _parser().parse_args(["client", "keys", "show", "--dir", str(d), "--json"])
    assert args.func(args) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["public_key"] == info["public_key"]
    assert shown["public_key_fingerprint"] == info["public_key_fingerprint"]
