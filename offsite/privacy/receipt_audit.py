"""Verifying a privacy receipt from the files alone: what `offsite audit receipt` reports.

The order is the point. The receipt's bytes are read once, bounded in size; the signature is checked
before anything else, and when it fails the audit stops there: nothing unauthenticated is accounted.
Then the signer's identity, the adapter's hash, the noise source (seeded noise fails), the sampling
rate (version 2: it must be the published grid value, so that it says nothing about N), δ against the
size bucket, the run's place in the dataset's history, both ε values recomputed with two accountants
from the mechanism histories, and (version 2) cumulative ε against the dataset's budget.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from offsite import crypto
from offsite.errors import FormatError, IntegrityError
from offsite.fileio import sha256_file
from offsite.privacy import accounting
from offsite.privacy.receipt_schema import (
    MAX_RECEIPT_BYTES,
    RECEIPT_FILE,
    SIGNATURE_FILE,
    parse_receipt,
    uncovered,
)

ADAPTER_FILE = "adapter.safetensors"
#: A signature file is one line of base64 (88 characters and a newline); anything much larger is not one.
MAX_SIGNATURE_BYTES = 1024

#: Recomputed ε must agree with the stated one within this relative tolerance (plus, for PRV, the
#: stated eps_error: a different Opacus version may discretise slightly differently).
EPS_RTOL = 1e-3

OK, FAIL, UNVERIFIED = "ok", "fail", "unverified"


@dataclass
class Check:
    """One line of a verification report. ``status`` is "ok", "fail" or "unverified" (not a failure)."""

    name: str
    status: str
    stated: str = ""
    recomputed: str = ""
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "status": self.status,
            "stated": self.stated,
            "recomputed": self.recomputed,
            "detail": self.detail,
        }


@dataclass
class VerificationReport:
    receipt_path: Path
    adapter_dir: Path
    checks: list[Check] = field(default_factory=list)
    receipt: dict[str, Any] | None = None
    format_version: int | None = None
    signer_verified: bool = False
    stopped: str | None = None
    """Why the audit stopped before its last check (a failed signature), else None."""

    @property
    def ok(self) -> bool:
        return self.stopped is None and all(c.status != FAIL for c in self.checks)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "receipt": str(self.receipt_path),
            "adapter": str(self.adapter_dir),
            "format_version": self.format_version,
            "signer_verified": self.signer_verified,
            "signer_fingerprint": (self.receipt or {}).get("signer", {}).get("public_key_fingerprint"),
            "stopped": self.stopped,
            "checks": [c.to_dict() for c in self.checks],
            "tolerance": {"relative": EPS_RTOL, "prv_absolute": "stated prv_eps_error"},
        }


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of the regular file ``path``, refusing more than ``limit`` bytes.

    A FIFO or device would block or never end; a huge file would be read whole: neither may stall
    an audit, so both are refused before reading.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise FormatError(f"{what} {path}: cannot be opened ({e.strerror})") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError(f"{what} {path}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise FormatError(f"{what} {path}: cannot be read ({e.strerror or e})") from e
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FormatError(f"{what} {path}: more than the {limit}-byte limit; refused before parsing")
    return data


def _compare(name: str, stated: float, recomputed: float, tol: float, what: str) -> Check:
    ok = abs(stated - recomputed) <= tol
    return Check(
        name,
        OK if ok else FAIL,
        f"{stated:.4f}",
        f"{recomputed:.4f}",
        f"{what}tolerance ±{tol:.2g}" + ("" if ok else f"; differs by {abs(stated - recomputed):.4g}"),
    )


def _signature(data: bytes, sig_path: Path, key: Ed25519PublicKey, receipt_name: str) -> Check:
    try:
        sig = crypto.decode_signature(read_bounded(sig_path, MAX_SIGNATURE_BYTES, "signature"), str(sig_path))
        crypto.verify(key, data, sig)
    except FileNotFoundError:
        return Check("signature", FAIL, detail=f"{sig_path} does not exist")
    except (FormatError, IntegrityError) as e:
        return Check("signature", FAIL, detail=str(e))
    return Check("signature", OK, detail=f"Ed25519 over the bytes of {receipt_name}")


def verify_receipt(
    adapter_dir: str | os.PathLike,
    public_key: Ed25519PublicKey | None = None,
    receipt_path: str | os.PathLike | None = None,
) -> VerificationReport:
    """Check a receipt (format version 1 or 2) against its adapter; see the module docstring.

    ``receipt_path`` defaults to ``ADAPTER/receipt.json``; the signature is read from ``receipt.sig``
    beside it. With ``public_key`` the signature is checked before the receipt is even parsed;
    without it, against the key embedded in the receipt, which proves integrity but not who signed
    (reported as "unverified"). Either way a bad signature ends the audit (``report.stopped``).

    Raises FormatError if the receipt is missing, too large, not a regular file, not JSON, or has a
    malformed field (the message names the field); every other problem is a failed check.
    """
    adapter_dir = Path(adapter_dir)
    receipt_path = Path(receipt_path) if receipt_path is not None else adapter_dir / RECEIPT_FILE
    sig_path = receipt_path.with_name(SIGNATURE_FILE)
    report = VerificationReport(receipt_path=receipt_path, adapter_dir=adapter_dir)
    try:
        data = read_bounded(receipt_path, MAX_RECEIPT_BYTES, "receipt")
    except FileNotFoundError as e:
        raise FormatError(f"receipt {receipt_path} does not exist") from e

    def stop_unless_signed(check: Check) -> bool:
        report.checks.append(check)
        if check.status != OK:
            report.stopped = "the signature does not verify: nothing else in the receipt was checked"
        return check.status == OK

    if public_key is not None and not stop_unless_signed(
        _signature(data, sig_path, public_key, receipt_path.name)
    ):
        return report
    version, receipt = parse_receipt(data, "receipt")
    report.receipt, report.format_version = receipt, version
    embedded = crypto.public_key_from_b64(receipt["signer"]["public_key"], "receipt.signer.public_key")
    if public_key is None and not stop_unless_signed(_signature(data, sig_path, embedded, receipt_path.name)):
        return report

    report.checks.append(_signer(report, receipt, public_key))
    report.checks.append(_adapter_hash(adapter_dir, receipt))
    report.checks.append(_noise_source(version, receipt))
    if version >= 2:
        report.checks.append(_sampling_grid(receipt))
        report.checks.append(_delta_vs_bucket(receipt))
    else:
        report.checks.append(
            Check(
                "sampling rate on the grid",
                UNVERIFIED,
                detail="format version 1 publishes q = batch size / N, from which the dataset size follows",
            )
        )
    reason = uncovered(receipt["run_history"], receipt["cumulative_history"])
    report.checks.append(
        Check(
            "run in cumulative history",
            FAIL if reason else OK,
            detail=reason or "every phase of this run is in the dataset history",
        )
    )
    cumulative_prv = _recompute_epsilons(report, receipt)
    if version >= 2:
        report.checks.append(_budget(receipt, cumulative_prv))
    else:
        report.checks.append(
            Check("budget", UNVERIFIED, detail="format version 1 does not record the dataset's budget")
        )
    return report


def _signer(
    report: VerificationReport, receipt: dict[str, Any], public_key: Ed25519PublicKey | None
) -> Check:
    embedded_fp = receipt["signer"]["public_key_fingerprint"]
    if public_key is None:
        return Check(
            "signer identity",
            UNVERIFIED,
            stated=embedded_fp[:16] + "…",
            detail="no public key given: checked against the key embedded in the receipt",
        )
    given_fp = crypto.public_key_fingerprint(public_key)
    report.signer_verified = given_fp == embedded_fp
    return Check(
        "signer identity",
        OK if report.signer_verified else FAIL,
        stated=embedded_fp[:16] + "…",
        recomputed=given_fp[:16] + "…",
        detail="the given key"
        if report.signer_verified
        else "the receipt names another signer than the given public key",
    )


def _adapter_hash(adapter_dir: Path, receipt: dict[str, Any]) -> Check:
    adapter = adapter_dir / ADAPTER_FILE
    stated = receipt["adapter_sha256"][:16] + "…"
    if not adapter.is_file():
        return Check("adapter hash", FAIL, stated, "", f"{adapter} does not exist or is not a file")
    try:
        actual = sha256_file(adapter)
    except OSError as e:
        return Check("adapter hash", FAIL, stated, "", f"{adapter} cannot be read ({e.strerror or e})")
    same = actual == receipt["adapter_sha256"]
    return Check(
        "adapter hash",
        OK if same else FAIL,
        stated,
        actual[:16] + "…",
        f"sha256 of {ADAPTER_FILE}" + ("" if same else ": not the adapter this receipt covers"),
    )


def _noise_source(version: int, receipt: dict[str, Any]) -> Check:
    if version == 1:
        seed = receipt["noise_seed"]
        if seed is not None:
            return Check(
                "noise source",
                FAIL,
                stated=f"seed {seed}",
                detail="the noise was seeded (a test-only setting): whoever knows the seed can remove it, "
                "so this run is not private",
            )
        return Check(
            "noise source",
            UNVERIFIED,
            stated="unnamed (v1)",
            detail="format version 1 does not name its generator; offsite then drew noise and sampling from "
            "torch's PRNG seeded from os.urandom, not from a cryptographic stream",
        )
    source = receipt["noise_source"]
    if source["seeded"]:
        return Check(
            "noise source",
            FAIL,
            stated=f"{source['generator']}, seeded",
            detail="the noise was seeded (a test-only setting): whoever knows the seed can remove it, "
            "so this run is not private",
        )
    return Check(
        "noise source",
        OK,
        stated=source["generator"],
        detail="ChaCha20 keyed from os.urandom, a new key per run; sampling from the same kind of stream",
    )


def _sampling_grid(receipt: dict[str, Any]) -> Check:
    bucket, nominal = receipt["size_bucket"], receipt["nominal_batch"]
    grid = nominal / bucket
    off = [
        (i, e["sample_rate"])
        for i, e in enumerate(receipt["run_history"])
        if e["steps"] > 0 and e["sample_rate"] != grid
    ]
    if off:
        i, q = off[0]
        return Check(
            "sampling rate on the grid",
            FAIL,
            stated=f"{q:.6g}",
            recomputed=f"{grid:.6g}",
            detail=f"run_history[{i}]: q is not nominal_batch / size_bucket = {nominal}/{bucket}; a q off "
            "the grid may be derived from the exact dataset size",
        )
    return Check(
        "sampling rate on the grid",
        OK,
        stated=f"{grid:.6g}",
        detail=f"q = nominal_batch / size_bucket = {nominal}/{bucket}: a function of the flags and the bucket",
    )


def _delta_vs_bucket(receipt: dict[str, Any]) -> Check:
    delta, bucket = receipt["delta"], receipt["size_bucket"]
    if delta < 1 / bucket:
        return Check("δ below 1/N", OK, f"{delta:g}", detail=f"δ < 1/size_bucket = 1/{bucket} ≤ 1/N")
    if delta >= 2 / bucket:
        return Check(
            "δ below 1/N",
            FAIL,
            f"{delta:g}",
            detail=f"δ ≥ 2/size_bucket > 1/N for every N in ({bucket // 2}, {bucket}]: δ this large permits "
            "releasing a record outright",
        )
    return Check(
        "δ below 1/N",
        UNVERIFIED,
        f"{delta:g}",
        detail=f"1/size_bucket ≤ δ < 2/size_bucket: δ < 1/N holds for some N in ({bucket // 2}, {bucket}], "
        "the receipt cannot show which",
    )


def _recompute_epsilons(report: VerificationReport, receipt: dict[str, Any]) -> float | None:
    """Append the four ε checks; return the recomputed cumulative PRV upper bound (None if it failed)."""
    delta = receipt["delta"]
    cumulative_prv = None
    for label, hist_key, eps_key in (
        ("ε this run", "run_history", "this_run"),
        ("ε cumulative", "cumulative_history", "cumulative"),
    ):
        stated = receipt["epsilon"][eps_key]
        history = receipt[hist_key]
        try:
            prv = accounting.epsilon_prv(history, delta, stated["prv_eps_error"])
            report.checks.append(
                _compare(
                    f"{label} (PRV upper)",
                    stated["prv_upper"],
                    prv,
                    EPS_RTOL * prv + stated["prv_eps_error"],
                    f"eps_error {stated['prv_eps_error']:g}; ",
                )
            )
            if eps_key == "cumulative":
                cumulative_prv = prv
        except accounting.AccountingError as e:
            report.checks.append(
                Check(f"{label} (PRV upper)", FAIL, f"{stated['prv_upper']:.4f}", "", str(e))
            )
        try:
            rdp = accounting.epsilon_rdp(history, delta)
            report.checks.append(_compare(f"{label} (RDP)", stated["rdp"], rdp, EPS_RTOL * rdp + 1e-9, ""))
        except accounting.AccountingError as e:
            report.checks.append(Check(f"{label} (RDP)", FAIL, f"{stated['rdp']:.4f}", "", str(e)))
    return cumulative_prv


def _budget(receipt: dict[str, Any], cumulative_prv: float | None) -> Check:
    budget, delta = receipt["budget"], receipt["delta"]
    stated = f"ε {budget['epsilon']:g} at δ {budget['delta']:g}"
    latest = budget["changes"][-1]
    problems = []
    if budget["delta"] != delta:
        problems.append(f"the budget's δ={budget['delta']:g} is not the receipt's δ={delta:g}")
    if (latest["epsilon"], latest["delta"]) != (budget["epsilon"], budget["delta"]):
        problems.append("the latest budget change is not the budget stated")
    if any(a["at"] > b["at"] for a, b in zip(budget["changes"], budget["changes"][1:], strict=False)):
        problems.append("budget changes are not in time order")
    limit = budget["epsilon"] * (1 + EPS_RTOL)
    if cumulative_prv is None:
        problems.append("cumulative ε could not be recomputed")
    elif cumulative_prv > limit:
        problems.append(f"cumulative ε={cumulative_prv:.4f} (PRV upper, recomputed) exceeds the budget")
    return Check(
        "budget",
        FAIL if problems else OK,
        stated,
        "" if cumulative_prv is None else f"ε {cumulative_prv:.4f}",
        "; ".join(problems)
        or f"cumulative ε within the dataset's budget (tolerance ×{1 + EPS_RTOL:g}), "
        f"{len(budget['changes'])} budget setting(s), inherits {budget['inherits'] or 'nothing'}",
    )
