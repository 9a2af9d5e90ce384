"""Signed privacy receipts: round trip, tampering, wrong keys, malformed fields, limits, version 1, and
`offsite audit receipt` (table and --json)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from offsite import crypto
from offsite.cli.audit import register
from offsite.errors import FormatError, OffsiteError
from offsite.fileio import canonical_json, sha256_file
from offsite.privacy import accounting, history
from offsite.privacy.accounting import epsilon_prv, make_entry
from offsite.privacy.fingerprint import dataset_fingerprint
from offsite.privacy.receipt import (
    RECEIPT_FILE,
    SIGNATURE_FILE,
    build_receipt,
    first_run_budget,
    validate_receipt,
    write_receipt,
)
from offsite.privacy.receipt_audit import verify_receipt

DELTA = 1e-5
BUCKET, NOMINAL = 512, 8
Q = NOMINAL / BUCKET  # the grid value of this receipt's run
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("owner")
    paths = crypto.init_client_keys(d)
    return crypto.load_private_key(paths.private_key), crypto.load_public_key(paths.public_key), paths


def _build(pub, paths, adir: Path, run, cumulative, **kw) -> dict:
    args = dict(
        run_history=run,
        cumulative_history=cumulative,
        delta=DELTA,
        max_grad_norm=1.0,
        size_bucket=BUCKET,
        nominal_batch=NOMINAL,
        budget=first_run_budget(8.0, DELTA, at="2025-06-01T12:00:00Z"),
        dataset_id="ds1",
        dataset_fingerprint=dataset_fingerprint(["a", "b", "c"], crypto.load_salt(paths.salt)),
        adapter_sha256=sha256_file(adir / "adapter.safetensors"),
        bundle_id="bundle-123",
        signer_public_key=pub,
        run_id="run-2",
    )
    args.update(kw)
    return build_receipt(**args)


def _adapter_dir(tmp_path: Path) -> Path:
    adir = tmp_path / "adapter"
    adir.mkdir()
    save_file({"lora_A": torch.zeros(2, 3), "lora_B": torch.ones(3, 2)}, str(adir / "adapter.safetensors"))
    return adir


@pytest.fixture
def adapter(tmp_path, keys) -> Path:
    """An adapter directory with a signed receipt, accounted against a dataset history of two runs."""
    priv, pub, paths = keys
    adir = _adapter_dir(tmp_path)
    client = tmp_path / "client"
    history.record("ds1", "run-1", make_entry(1.2, 0.02, 60), client)  # an earlier run
    run = [make_entry(1.0, Q, 40), make_entry(1.5, Q, 20)]  # this run: two phases
    for e in run:
        history.record("ds1", "run-2", e, client)
    cumulative = history.mechanism_history(history.load_history("ds1", client))
    write_receipt(adir, _build(pub, paths, adir, run, cumulative), priv)
    return adir


def _resign(adapter: Path, doc: dict, priv) -> None:
    """What a data owner who lies in its own receipt would do: edit, then sign the edited bytes."""
    data = canonical_json(doc)
    (adapter / RECEIPT_FILE).write_bytes(data)
    (adapter / SIGNATURE_FILE).write_bytes(crypto.encode_signature(crypto.sign(priv, data)))


def _no_accounting(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("accounting ran on a receipt that should have been refused first")

    monkeypatch.setattr(accounting, "epsilon_prv", refuse)
    monkeypatch.setattr(accounting, "epsilon_rdp", refuse)


def _audit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offsite")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def _audit(*argv: str) -> int:
    args = _audit_parser().parse_args(["audit", "receipt", *map(str, argv)])
    return args.func(args)


def _doc(adapter: Path) -> dict:
    return json.loads((adapter / RECEIPT_FILE).read_text())


V2_CHECKS = [
    "signature",
    "signer identity",
    "adapter hash",
    "noise source",
    "sampling rate on the grid",
    "δ below 1/N",
    "run in cumulative history",
    "ε this run (PRV upper)",
    "ε this run (RDP)",
    "ε cumulative (PRV upper)",
    "ε cumulative (RDP)",
    "budget",
]


def test_round_trip(adapter, keys):
    _, pub, _ = keys
    report = verify_receipt(adapter, pub)
    assert report.ok and report.signer_verified, report.to_dict()
    assert [c.name for c in report.checks] == V2_CHECKS
    assert report.format_version == 2 and report.to_dict()["format_version"] == 2
    r = report.receipt
    assert r["format"] == "offsite-receipt" and r["format_version"] == 2
    assert r["noise_source"] == {"generator": "chacha20-box-muller", "seeded": False}
    assert (r["size_bucket"], r["nominal_batch"]) == (BUCKET, NOMINAL)
    assert r["budget"]["epsilon"] == 8.0 and r["budget"]["changes"][0]["how"] == "first-run"
    assert r["neighbouring_relation"] == "add/remove one record"
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
    flat = json.dumps(_doc(adapter))
    for word in ("dataset_size", "num_records", "n_records", "num_examples", "expected_batch"):
        assert word not in flat


def test_without_pubkey_signer_is_unverified(adapter):
    report = verify_receipt(adapter)
    assert report.ok and not report.signer_verified
    assert report.check("signer identity").status == "unverified"
    assert report.check("signature").status == "ok"


def test_tampered_receipt_stops_at_the_signature(adapter, keys, monkeypatch):
    _, pub, _ = keys
    path = adapter / RECEIPT_FILE
    data = bytearray(path.read_bytes())
    i = data.index(b'"bundle-123"') + 8
    data[i] = ord("4")  # one byte: bundle-123 -> bundle-423, still valid JSON
    path.write_bytes(bytes(data))
    _no_accounting(monkeypatch)
    for key in (pub, None):
        report = verify_receipt(adapter, key)
        assert not report.ok and report.stopped
        assert [(c.name, c.status) for c in report.checks] == [("signature", "fail")]
    # With the key given, nothing of the receipt was even parsed.
    assert verify_receipt(adapter, pub).format_version is None


def test_tampered_epsilon_is_never_accounted_unsigned_but_fails_when_signed(adapter, keys, monkeypatch):
    priv, pub, _ = keys
    doc = _doc(adapter)
    doc["epsilon"]["cumulative"]["prv_upper"] /= 2
    (adapter / RECEIPT_FILE).write_bytes(canonical_json(doc))
    with monkeypatch.context() as m:
        _no_accounting(m)
        report = verify_receipt(adapter, pub)
    assert report.stopped and report.check("signature").status == "fail"
    # A data owner lying in its own, validly signed receipt is caught by the recomputation.
    _resign(adapter, doc, priv)
    report = verify_receipt(adapter, pub)
    assert report.check("signature").status == "ok" and not report.ok
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
    assert not report.ok and not report.signer_verified and report.stopped
    assert report.check("signature").status == "fail"


def test_missing_signature_fails(adapter):
    (adapter / SIGNATURE_FILE).unlink()
    report = verify_receipt(adapter)
    assert report.check("signature").status == "fail" and not report.ok


def test_seeded_noise_fails_the_audit(tmp_path, keys, capsys):
    priv, pub, paths = keys
    adir = _adapter_dir(tmp_path)
    run = [make_entry(1.0, Q, 40)]
    write_receipt(adir, _build(pub, paths, adir, run, run, noise_seeded=True), priv)
    report = verify_receipt(adir, pub)
    assert not report.ok
    noise = report.check("noise source")
    assert noise.status == "fail" and "seeded" in noise.detail
    assert all(c.status == "ok" for c in report.checks if c.name != "noise source")
    assert _audit(adir / RECEIPT_FILE, "--adapter", adir, "--pubkey", paths.public_key, "--json") == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["format_version"] == 2
    (row,) = [c for c in out["checks"] if c["status"] == "fail"]
    assert row["name"] == "noise source" and "not private" in row["detail"]


def test_sampling_rate_off_the_grid_fails(adapter, keys):
    priv, pub, _ = keys
    doc = _doc(adapter)
    doc["size_bucket"] = 1024  # q = 8/512 is no longer nominal_batch / size_bucket
    _resign(adapter, doc, priv)
    assert verify_receipt(adapter, pub).check("sampling rate on the grid").status == "fail"


@pytest.mark.parametrize(("delta", "status"), [(1e-5, "ok"), (0.0025, "unverified"), (0.01, "fail")])
def test_delta_against_the_size_bucket(adapter, keys, delta, status):
    priv, pub, _ = keys
    doc = _doc(adapter)
    doc["delta"] = delta  # 1/512 ≈ 0.00195, 2/512 ≈ 0.0039
    _resign(adapter, doc, priv)
    assert verify_receipt(adapter, pub).check("δ below 1/N").status == status


def test_budget_exceeded_or_inconsistent_fails(tmp_path, keys):
    priv, pub, paths = keys
    adir = _adapter_dir(tmp_path)
    run = [make_entry(1.0, Q, 400)]
    spent = epsilon_prv(run, DELTA)
    write_receipt(adir, _build(pub, paths, adir, run, run, budget=first_run_budget(spent * 0.9, DELTA)), priv)
    check = verify_receipt(adir, pub).check("budget")
    assert check.status == "fail" and "exceeds the budget" in check.detail
    doc = _doc(adir)
    doc["budget"] = first_run_budget(spent * 2, DELTA)
    doc["budget"]["changes"].append(
        {"epsilon": spent * 3, "delta": DELTA, "at": "2000-01-01T00:00:00Z", "how": "set-budget"}
    )
    _resign(adir, doc, priv)
    detail = verify_receipt(adir, pub).check("budget").detail
    assert "latest budget change" in detail and "time order" in detail
    with pytest.raises(OffsiteError, match="budget's δ"):
        _build(pub, paths, adir, run, run, budget=first_run_budget(8.0, 1e-6))


V2_MUTATIONS = [
    (lambda d: d["run_history"][0].__setitem__("noise_multiplier", -1.0), "run_history[0].noise_multiplier"),
    (
        lambda d: d["cumulative_history"][1].__setitem__("sample_rate", 1.5),
        "cumulative_history[1].sample_rate",
    ),
    (lambda d: d["run_history"][1].__setitem__("steps", -3), "run_history[1].steps"),
    (lambda d: d["run_history"][1].__setitem__("steps", True), "run_history[1].steps"),
    (lambda d: d.pop("delta"), "receipt.delta"),
    (lambda d: d.__setitem__("delta", 1.0), "receipt.delta"),
    (lambda d: d.pop("max_grad_norm"), "receipt.max_grad_norm"),
    (lambda d: d.__setitem__("max_grad_norm", 0), "receipt.max_grad_norm"),
    (lambda d: d.__setitem__("adapter_sha256", "xyz"), "receipt.adapter_sha256"),
    (lambda d: d.__setitem__("dataset_id", "../etc"), "receipt.dataset_id"),
    (lambda d: d.__setitem__("run_id", "a/b"), "receipt.run_id"),
    (lambda d: d["noise_source"].__setitem__("seeded", "no"), "receipt.noise_source.seeded"),
    (lambda d: d["noise_source"].__setitem__("generator", "torch"), "receipt.noise_source.generator"),
    (lambda d: d.__setitem__("noise_seed", None), "receipt.noise_seed"),
    (lambda d: d.__setitem__("dataset_size", 1000), "receipt.dataset_size"),
    (lambda d: d.__setitem__("size_bucket", 48), "size_bucket must be a power of two"),
    (lambda d: d.__setitem__("nominal_batch", 1024), "nominal_batch must not exceed"),
    (lambda d: d["budget"]["changes"][0].__setitem__("how", "guess"), "receipt.budget.changes[0].how"),
    (lambda d: d["budget"]["changes"][0].__setitem__("at", "yesterday"), "receipt.budget.changes[0].at"),
    (lambda d: d["budget"].__setitem__("changes", []), "receipt.budget.changes"),
    (lambda d: d["budget"].__setitem__("inherits", ["../x"]), "receipt.budget.inherits[0]"),
    (lambda d: d.__setitem__("created_at", "today"), "receipt.created_at"),
    (
        lambda d: d["epsilon"]["this_run"].__setitem__("prv_eps_error", 5.0),
        "receipt.epsilon.this_run.prv_eps_error",
    ),
    (lambda d: d["signer"].__setitem__("public_key_fingerprint", "0" * 64), "receipt.signer"),
    (lambda d: d.__setitem__("format_version", 3), "receipt.format_version"),
]


@pytest.mark.parametrize(("mutate", "field"), V2_MUTATIONS)
def test_bad_field_is_rejected_by_name(adapter, mutate, field):
    doc = _doc(adapter)
    mutate(doc)
    with pytest.raises(FormatError) as info:
        validate_receipt(doc)
    assert field in str(info.value)
    # verify_receipt on the file rejects it the same way.
    (adapter / RECEIPT_FILE).write_bytes(canonical_json(doc))
    with pytest.raises(FormatError) as info:
        verify_receipt(adapter)
    assert field in str(info.value)


def test_a_signed_receipt_that_is_not_canonical_is_refused(adapter, keys):
    # A duplicated key is resolved differently by different JSON readers: what was signed must have
    # one reading. So must padding and reordering, which canonical writing never produces.
    priv, pub, _ = keys
    data = (adapter / RECEIPT_FILE).read_bytes()
    variants = [
        data.replace(b'\n  "delta": 1e-05,', b'\n  "delta": 0.5,\n  "delta": 1e-05,'),
        data.replace(b'"delta": 1e-05', b'"delta":  1e-05'),
        data + b"\n",
        json.dumps(dict(reversed(json.loads(data).items())), indent=2).encode() + b"\n",  # unsorted
    ]
    for variant in variants:
        assert variant != data
        (adapter / RECEIPT_FILE).write_bytes(variant)
        (adapter / SIGNATURE_FILE).write_bytes(crypto.encode_signature(crypto.sign(priv, variant)))
        with pytest.raises(FormatError, match="canonical"):
            verify_receipt(adapter, pub)


def test_a_tiny_eps_error_cannot_stall_the_audit(adapter, keys):
    # eps_error sets PRV's grid spacing: 1e-9 would ask for ~10^9 points. It is refused, not computed.
    priv, pub, _ = keys
    doc = _doc(adapter)
    doc["epsilon"]["cumulative"]["prv_eps_error"] = 1e-9
    _resign(adapter, doc, priv)
    check = verify_receipt(adapter, pub).check("ε cumulative (PRV upper)")
    assert check.status == "fail" and "grid points" in check.detail


def test_a_tiny_sigma_is_refused_by_name_not_a_traceback(adapter, keys, monkeypatch, capsys):
    # σ = 5e-324 makes Opacus' RDP analysis divide by zero (and σ = 1e-160 stalls it): refused before.
    priv, pub, _ = keys
    doc = _doc(adapter)
    doc["run_history"][0]["noise_multiplier"] = doc["cumulative_history"][0]["noise_multiplier"] = 5e-324
    _resign(adapter, doc, priv)
    _no_accounting(monkeypatch)
    with pytest.raises(FormatError, match=r"run_history\[0\]\.noise_multiplier.*below 0\.001"):
        verify_receipt(adapter, pub)
    assert _audit(adapter / RECEIPT_FILE, "--adapter", adapter, "--json") == 1
    assert "below 0.001" in json.loads(capsys.readouterr().out)["error"]


def test_receipt_must_cover_run_in_cumulative(keys, tmp_path):
    _, pub, paths = keys
    adir = _adapter_dir(tmp_path)
    with pytest.raises(OffsiteError, match="no matching entry in cumulative_history"):
        _build(pub, paths, adir, [make_entry(1.0, Q, 40)], [make_entry(1.0, Q, 10)])


def test_coverage_check_is_a_matching_and_fast_on_long_histories():
    from offsite.privacy.receipt_schema import uncovered

    run = [make_entry(1.0, Q, 10), make_entry(1.0, Q, 30)]
    # First-fit would give the 30-step entry to the 10-step phase; pairing largest with largest works.
    assert uncovered(run, [make_entry(1.0, Q, 30), make_entry(1.0, Q, 10)]) is None
    assert uncovered(run, [make_entry(1.0, Q, 30), make_entry(1.0, Q, 9)]) is not None
    long = [make_entry(1.0, Q, 1)] * 5000
    assert uncovered(long, long) is None  # 5,000 × 5,000 pairs: the old quadratic scan took seconds


def test_write_refuses_a_key_that_is_not_the_signer(adapter, tmp_path):
    other = crypto.load_private_key(crypto.init_client_keys(tmp_path / "o").private_key)
    with pytest.raises(OffsiteError, match="signer.public_key"):
        write_receipt(adapter, _doc(adapter), other)


# ------------------------------------------------------------------------------------ limits


def test_receipt_over_one_mib_is_refused_before_parsing(adapter, keys, monkeypatch, capsys):
    priv, pub, paths = keys
    data = (adapter / RECEIPT_FILE).read_bytes()
    big = data[:-2] + b" " * (1 << 20) + data[-2:]  # still valid JSON, validly signed
    (adapter / RECEIPT_FILE).write_bytes(big)
    (adapter / SIGNATURE_FILE).write_bytes(crypto.encode_signature(crypto.sign(priv, big)))
    _no_accounting(monkeypatch)
    for key in (pub, None):
        with pytest.raises(FormatError, match="1048576-byte limit"):
            verify_receipt(adapter, key)
    assert _audit(adapter / RECEIPT_FILE, "--adapter", adapter, "--json") == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and "limit" in out["error"] and out["format_version"] is None


def test_more_than_10000_history_entries_are_refused_before_accounting(adapter, keys, monkeypatch):
    priv, pub, _ = keys
    doc = _doc(adapter)
    doc["cumulative_history"] = [make_entry(1.0, Q, 1)] * 9_999  # 2 run phases + 9,999 = 10,001
    data = json.dumps(doc, separators=(",", ":")).encode()  # compact: fits in 1 MiB
    assert len(data) < 1 << 20
    (adapter / RECEIPT_FILE).write_bytes(data)
    (adapter / SIGNATURE_FILE).write_bytes(crypto.encode_signature(crypto.sign(priv, data)))
    _no_accounting(monkeypatch)
    with pytest.raises(FormatError, match="10001 entries together, more than 10000"):
        verify_receipt(adapter, pub)


def test_a_3000_entry_receipt_is_audited_quickly_and_exactly(tmp_path, keys):
    # 3,000 phases of one mechanism (a run resumed 3,000 times, say): today's audit composes them
    # as one phase of 3,000·n steps instead of 3,000 PRV discretisations (minutes before).
    priv, pub, paths = keys
    adir = _adapter_dir(tmp_path)
    run = [make_entry(1.0, Q, 2)]
    cumulative = [dict(make_entry(1.0, Q, 2), run_id=f"r{i}") for i in range(3000)]
    write_receipt(adir, _build(pub, paths, adir, run, cumulative), priv)
    report = verify_receipt(adir, pub)
    assert report.ok, report.to_dict()
    grouped = epsilon_prv([make_entry(1.0, Q, 6000)], DELTA)
    assert report.receipt["epsilon"]["cumulative"]["prv_upper"] == pytest.approx(grouped, abs=1e-9)


def test_a_fifo_or_directory_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "receipt.json"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        verify_receipt(tmp_path, receipt_path=fifo)
    with pytest.raises(FormatError, match="not a regular file|cannot be opened"):
        verify_receipt(tmp_path, receipt_path=tmp_path)


# --------------------------------------------------------------------------------- version 1


def test_version_1_receipts_are_still_read(tmp_path, capsys):
    v1 = DATA / "receipt-v1"
    key = crypto.load_public_key(v1 / "signing_key.pub.pem")
    report = verify_receipt(v1, key)
    assert report.format_version == 1 and report.ok, report.to_dict()
    assert report.check("noise source").status == "unverified"
    assert [c.name for c in report.checks] == [n for n in V2_CHECKS if n != "δ below 1/N"]
    unverified = {c.name for c in report.checks if c.status == "unverified"}
    assert unverified == {"noise source", "sampling rate on the grid", "budget"}
    assert _audit(v1 / RECEIPT_FILE, "--adapter", v1, "--pubkey", v1 / "signing_key.pub.pem") == 0
    assert "format version 1" in capsys.readouterr().out
    assert _audit(v1 / RECEIPT_FILE, "--adapter", v1, "--json") == 0
    assert json.loads(capsys.readouterr().out)["format_version"] == 1
    # Version 1 is checked by its own schema: a v2 field in a v1 receipt is refused by name.
    doc = json.loads((v1 / RECEIPT_FILE).read_text())
    doc["size_bucket"] = 64
    with pytest.raises(FormatError, match="receipt.size_bucket"):
        validate_receipt(doc)


def test_version_1_receipt_with_a_noise_seed_fails(capsys):
    v1 = DATA / "receipt-v1-seeded"
    report = verify_receipt(v1, crypto.load_public_key(v1 / "signing_key.pub.pem"))
    assert report.format_version == 1 and not report.ok
    assert report.check("noise source").status == "fail"
    assert _audit(v1 / RECEIPT_FILE, "--adapter", v1, "--json") == 1
    out = json.loads(capsys.readouterr().out)
    assert {c["name"]: c["status"] for c in out["checks"]}["noise source"] == "fail"


# ---------------------------------------------------------------------------------------- CLI


def test_cli_audit_ok(adapter, keys, capsys):
    _, _, paths = keys
    code = _audit(adapter / RECEIPT_FILE, "--adapter", adapter, "--pubkey", paths.public_key)
    out = capsys.readouterr()
    assert code == 0, out
    assert "receipt verified" in out.out and "adapter hash" in out.out and "format version 2" in out.out


def test_cli_audit_without_pubkey_says_unverified(adapter, capsys):
    assert _audit(adapter / RECEIPT_FILE, "--adapter", adapter) == 0
    out = capsys.readouterr()
    assert "unverified" in out.out + out.err


def test_cli_audit_json_and_failure_exit(adapter, keys, capsys):
    _, _, paths = keys
    assert _audit(adapter / RECEIPT_FILE, "--adapter", adapter, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["signer_verified"] is False
    save_file({"x": torch.zeros(1)}, str(adapter / "adapter.safetensors"))
    code = _audit(adapter / RECEIPT_FILE, "--adapter", adapter, "--pubkey", paths.public_key, "--json")
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["ok"] is False
    assert {c["name"]: c["status"] for c in report["checks"]}["adapter hash"] == "fail"
    assert _audit(adapter / RECEIPT_FILE, "--adapter", adapter) == 1


def test_cli_audit_stopped_at_the_signature(adapter, keys, capsys):
    _, _, paths = keys
    (adapter / SIGNATURE_FILE).write_bytes(crypto.encode_signature(b"\0" * 64))
    code = _audit(adapter / RECEIPT_FILE, "--adapter", adapter, "--pubkey", paths.public_key, "--json")
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["stopped"] and [c["name"] for c in report["checks"]] == ["signature"]
    assert _audit(adapter / RECEIPT_FILE, "--adapter", adapter) == 1
    assert "audit stopped" in capsys.readouterr().out


def test_cli_audit_receipt_elsewhere(adapter, tmp_path, keys, capsys):
    # RECEIPT need not live inside --adapter: receipt.sig is read from beside it.
    _, _, paths = keys
    elsewhere = tmp_path / "inbox"
    elsewhere.mkdir()
    for name in (RECEIPT_FILE, SIGNATURE_FILE):
        shutil.copy(adapter / name, elsewhere / name)
    code = _audit(elsewhere / RECEIPT_FILE, "--adapter", adapter, "--pubkey", paths.public_key)
    assert code == 0, capsys.readouterr()


def test_cli_audit_errors_are_json_in_json_mode(adapter, tmp_path, capsys):
    (tmp_path / "bad.pem").write_text("not a key")
    cases = [
        ("{not json", []),  # unparseable receipt
        (None, ["--pubkey", tmp_path / "bad.pem"]),  # unreadable public key
        (None, ["--pubkey", tmp_path / "missing.pem"]),
        (None, ["--pubkey", tmp_path]),  # a directory
        (None, ["--pubkey", tmp_path / "fifo.pem"]),  # a FIFO: refused, never waited on
    ]
    os.mkfifo(tmp_path / "fifo.pem")
    for content, extra in cases:
        if content is not None:
            (adapter / RECEIPT_FILE).write_text(content)
        assert _audit(adapter / RECEIPT_FILE, "--adapter", adapter, "--json", *extra) == 1
        report = json.loads(capsys.readouterr().out)
        assert report["ok"] is False and report["error"] and report["checks"] == []
    (adapter / RECEIPT_FILE).write_text("{not json")
    with pytest.raises(FormatError):
        _audit(adapter / RECEIPT_FILE, "--adapter", adapter)


def test_docs_receipt_table_lists_exactly_the_schema_fields():
    import re

    from offsite.privacy.receipt_schema import ReceiptV2

    docs = (Path(__file__).parents[1] / "docs" / "formats.md").read_text()
    section = docs[docs.index("## Privacy receipt") :]
    table = section[: section.index("\nLimits:")]
    documented = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            documented |= set(re.findall(r"`([a-z0-9_]+)`", line.split("|")[1]))
    assert documented == set(ReceiptV2.model_fields)
