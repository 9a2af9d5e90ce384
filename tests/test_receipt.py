"""Signed privacy receipts: round trip, tampering, wrong keys, malformed fields, and `offsite audit`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from offsite import crypto
from offsite.cli.audit import register
from offsite.errors import FormatError, OffsiteError
from offsite.fileio import canonical_json, sha256_file
from offsite.privacy import history
from offsite.privacy.accounting import epsilon_prv, make_entry
from offsite.privacy.fingerprint import dataset_fingerprint
from offsite.privacy.receipt import (
    RECEIPT_FILE,
    SIGNATURE_FILE,
    build_receipt,
    validate_receipt,
    verify_receipt,
    write_receipt,
)

DELTA = 1e-5


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("owner")
    paths = crypto.init_client_keys(d)
    return crypto.load_private_key(paths.private_key), crypto.load_public_key(paths.public_key), paths


@pytest.fixture
def adapter(tmp_path, keys) -> Path:
    """An adapter directory with a signed receipt, accounted against a dataset history of two runs."""
    priv, pub, paths = keys
    adir = tmp_path / "adapter"
    adir.mkdir()
    save_file({"lora_A": torch.zeros(2, 3), "lora_B": torch.ones(3, 2)}, str(adir / "adapter.safetensors"))
    client = tmp_path / "client"
    history.record("ds1", "run-1", make_entry(1.2, 0.02, 60), client)  # an earlier run
    run = [make_entry(1.0, 0.02, 40), make_entry(1.5, 0.02, 20)]  # this run: two phases
    for e in run:
        history.record("ds1", "run-2", e, client)
    receipt = build_receipt(
        run_history=run,
        cumulative_history=history.mechanism_history(history.load_history("ds1", client)),
        delta=DELTA,
        max_grad_norm=1.0,
        dataset_id="ds1",
        dataset_fingerprint=dataset_fingerprint(["a", "b", "c"], crypto.load_salt(paths.salt)),
        adapter_sha256=sha256_file(adir / "adapter.safetensors"),
        bundle_id="bundle-123",
        signer_public_key=pub,
        run_id="run-2",
    )
    write_receipt(adir, receipt, priv)
    return adir


def _audit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offsite")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def _audit(*argv: str) -> int:
    args = _audit_parser().parse_args(["audit", "receipt", *argv])
    return args.func(args)


def test_round_trip(adapter, keys):
    _, pub, _ = keys
    report = verify_receipt(adapter, pub)
    assert report.ok and report.signer_verified, report.to_dict()
    names = [c.name for c in report.checks]
    assert names == [
        "signature",
        "signer identity",
        "adapter hash",
        "run in cumulative history",
        "ε this run (PRV upper)",
        "ε this run (RDP)",
        "ε cumulative (PRV upper)",
        "ε cumulative (RDP)",
    ]
    r = report.receipt
    assert r["format"] == "offsite-receipt" and r["format_version"] == 1
    assert r["noise_seed"] is None and r["neighbouring_relation"] == "add/remove one record"
    assert len(r["run_history"]) == 2 and len(r["cumulative_history"]) == 3
    # Cumulative ε composes all three phases: more than this run, less than the sum.
    e = r["epsilon"]
    assert e["this_run"]["prv_upper"] < e["cumulative"]["prv_upper"]
    assert e["cumulative"]["prv_upper"] < e["this_run"]["prv_upper"] + epsilon_prv(
        [make_entry(1.2, 0.02, 60)], DELTA
    )
    assert set(r["versions"]) == {"offsite", "torch", "opacus", "transformers"}
    # The receipt on disk is canonical JSON and the signature file is base64 text of 64 bytes.
    data = (adapter / RECEIPT_FILE).read_bytes()
    assert canonical_json(json.loads(data)) == data
    assert len(crypto.decode_signature((adapter / SIGNATURE_FILE).read_bytes())) == 64


def test_receipt_holds_nothing_derived_from_the_data(adapter):
    doc = json.loads((adapter / RECEIPT_FILE).read_text())
    flat = json.dumps(doc)
    for word in ("dataset_size", "num_records", "n_records", "num_examples"):
        assert word not in flat


def test_without_pubkey_signer_is_unverified(adapter):
    report = verify_receipt(adapter)
    assert report.ok and not report.signer_verified
    assert report.check("signer identity").status == "unverified"
    assert report.check("signature").status == "ok"


def test_tampered_receipt_fails_signature(adapter, keys):
    _, pub, _ = keys
    path = adapter / RECEIPT_FILE
    data = bytearray(path.read_bytes())
    i = data.index(b'"bundle-123"') + 8
    data[i] = ord("4")  # one byte: bundle-123 -> bundle-423, still valid JSON
    path.write_bytes(bytes(data))
    for key in (pub, None):
        report = verify_receipt(adapter, key)
        assert not report.ok
        assert report.check("signature").status == "fail"


def test_tampered_epsilon_fails_recomputation_too(adapter, keys):
    _, pub, _ = keys
    path = adapter / RECEIPT_FILE
    doc = json.loads(path.read_text())
    doc["epsilon"]["cumulative"]["prv_upper"] /= 2
    path.write_bytes(canonical_json(doc))
    report = verify_receipt(adapter, pub)
    assert report.check("signature").status == "fail"
    assert report.check("ε cumulative (PRV upper)").status == "fail"
    assert report.check("ε this run (PRV upper)").status == "ok"


def test_tampered_adapter_fails_hash(adapter, keys):
    _, pub, _ = keys
    save_file({"lora_A": torch.ones(2, 3), "lora_B": torch.ones(3, 2)}, str(adapter / "adapter.safetensors"))
    report = verify_receipt(adapter, pub)
    assert not report.ok
    assert report.check("adapter hash").status == "fail"
    assert report.check("signature").status == "ok"


def test_wrong_pubkey_fails(adapter, tmp_path):
    other = crypto.load_public_key(crypto.init_client_keys(tmp_path / "other").public_key)
    report = verify_receipt(adapter, other)
    assert not report.ok and not report.signer_verified
    assert report.check("signature").status == "fail"
    assert report.check("signer identity").status == "fail"


def test_missing_signature_fails(adapter):
    (adapter / SIGNATURE_FILE).unlink()
    report = verify_receipt(adapter)
    assert report.check("signature").status == "fail"


def _valid_doc(adapter: Path) -> dict:
    return json.loads((adapter / RECEIPT_FILE).read_text())


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (
            lambda d: d["run_history"][0].__setitem__("noise_multiplier", -1.0),
            "run_history[0].noise_multiplier",
        ),
        (
            lambda d: d["cumulative_history"][1].__setitem__("sample_rate", 1.5),
            "cumulative_history[1].sample_rate",
        ),
        (lambda d: d["run_history"][1].__setitem__("steps", -3), "run_history[1].steps"),
        (lambda d: d.pop("delta"), "receipt.delta"),
        (lambda d: d.__setitem__("delta", 1.0), "receipt.delta"),
        (lambda d: d.pop("max_grad_norm"), "receipt.max_grad_norm"),
        (lambda d: d.__setitem__("max_grad_norm", 0), "receipt.max_grad_norm"),
        (lambda d: d.__setitem__("adapter_sha256", "xyz"), "receipt.adapter_sha256"),
        (lambda d: d.__setitem__("dataset_id", "../etc"), "receipt.dataset_id"),
        (lambda d: d.__setitem__("noise_seed", "7"), "receipt.noise_seed"),
        (lambda d: d.__setitem__("dataset_size", 1000), "receipt.dataset_size"),
        (
            lambda d: d["epsilon"]["this_run"].__setitem__("prv_eps_error", 5.0),
            "receipt.epsilon.this_run.prv_eps_error",
        ),
        (
            lambda d: d["signer"].__setitem__("public_key_fingerprint", "0" * 64),
            "receipt.signer.public_key_fingerprint",
        ),
        (lambda d: d.__setitem__("format_version", 2), "receipt.format_version"),
    ],
)
def test_bad_field_is_rejected_by_name(adapter, mutate, field):
    doc = _valid_doc(adapter)
    mutate(doc)
    with pytest.raises(FormatError) as info:
        validate_receipt(doc)
    assert field in str(info.value)
    # verify_receipt on the file rejects it the same way.
    (adapter / RECEIPT_FILE).write_bytes(canonical_json(doc))
    with pytest.raises(FormatError, match=field.replace("[", r"\[").replace("]", r"\]")):
        verify_receipt(adapter)


def test_receipt_must_cover_run_in_cumulative(keys):
    _, pub, _ = keys
    with pytest.raises(OffsiteError, match="no matching entry in cumulative_history"):
        build_receipt(
            run_history=[make_entry(1.0, 0.02, 40)],
            cumulative_history=[make_entry(1.0, 0.02, 10)],
            delta=DELTA,
            max_grad_norm=1.0,
            dataset_id="ds1",
            dataset_fingerprint="0" * 64,
            adapter_sha256="0" * 64,
            bundle_id="b",
            signer_public_key=pub,
        )


def test_write_refuses_a_key_that_is_not_the_signer(adapter, tmp_path):
    other = crypto.load_private_key(crypto.init_client_keys(tmp_path / "o").private_key)
    with pytest.raises(OffsiteError, match="signer.public_key"):
        write_receipt(adapter, _valid_doc(adapter), other)


# ---------------------------------------------------------------------------------------- CLI


def test_cli_audit_ok(adapter, keys, capsys):
    _, _, paths = keys
    code = _audit(str(adapter / RECEIPT_FILE), "--adapter", str(adapter), "--pubkey", str(paths.public_key))
    out = capsys.readouterr()
    assert code == 0, out
    assert "receipt verified" in out.out and "adapter hash" in out.out


def test_cli_audit_without_pubkey_says_unverified(adapter, capsys):
    assert _audit(str(adapter / RECEIPT_FILE), "--adapter", str(adapter)) == 0
    out = capsys.readouterr()
    assert "unverified" in out.out + out.err


def test_cli_audit_json_and_failure_exit(adapter, keys, capsys):
    _, _, paths = keys
    assert _audit(str(adapter / RECEIPT_FILE), "--adapter", str(adapter), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["signer_verified"] is False
    save_file({"x": torch.zeros(1)}, str(adapter / "adapter.safetensors"))
    code = _audit(
        str(adapter / RECEIPT_FILE), "--adapter", str(adapter), "--pubkey", str(paths.public_key), "--json"
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["ok"] is False
    assert {c["name"]: c["status"] for c in report["checks"]}["adapter hash"] == "fail"
    assert _audit(str(adapter / RECEIPT_FILE), "--adapter", str(adapter)) == 1


def test_cli_audit_receipt_elsewhere(adapter, tmp_path, keys, capsys):
    # RECEIPT need not live inside --adapter: receipt.sig is read from beside it.
    _, _, paths = keys
    elsewhere = tmp_path / "inbox"
    elsewhere.mkdir()
    for name in (RECEIPT_FILE, SIGNATURE_FILE):
        (elsewhere / name).write_bytes((adapter / name).read_bytes())
    code = _audit(str(elsewhere / RECEIPT_FILE), "--adapter", str(adapter), "--pubkey", str(paths.public_key))
    assert code == 0, capsys.readouterr()


def test_cli_audit_malformed_receipt_json_mode(adapter, capsys):
    (adapter / RECEIPT_FILE).write_text("{not json")
    assert _audit(str(adapter / RECEIPT_FILE), "--adapter", str(adapter), "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and "not valid JSON" in report["error"]
    with pytest.raises(FormatError):
        _audit(str(adapter / RECEIPT_FILE), "--adapter", str(adapter))
