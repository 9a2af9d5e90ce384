"""Signed privacy receipts: what a data owner's DP training run spent, in a form anyone can re-check.

An adapter directory carries two files next to ``adapter.safetensors``:

``receipt.json``
    Canonical JSON (sorted keys, 2-space indent, trailing newline) with the fields below.
``receipt.sig``
    The Ed25519 signature over the *exact bytes* of ``receipt.json`` as written (never over a
    re-serialisation), stored as one line of standard base64 (with padding) of the raw 64-byte
    signature, followed by a newline.

The receipt carries mechanism histories, not just ε: the (σ, q, steps) phases of this run and the
whole history of the dataset it was accounted against, so that an auditor can recompute both ε values
with any accountant. It carries nothing derived from the data except the salted fingerprint (no record
count; note that q itself is chosen by the trainer and may be rounded up, which only overstates ε).

Layout (format_version 1)::

    format, format_version, created_at, run_id, bundle_id,
    dataset_id, dataset_fingerprint, fingerprint_scheme, adapter_sha256,
    mechanism, neighbouring_relation, delta, max_grad_norm, noise_seed,
    run_history: [{mechanism, noise_multiplier, sample_rate, steps}, ...],
    cumulative_history: [{run_id, mechanism, noise_multiplier, sample_rate, steps}, ...],
    epsilon: {this_run: {prv_upper, prv_eps_error, rdp}, cumulative: {prv_upper, prv_eps_error, rdp}},
    accountants: {prv, rdp}        (how the ε values were computed, in words)
    signer: {algorithm: "ed25519", public_key: base64 raw 32 bytes, public_key_fingerprint: sha256 hex},
    versions: {offsite, torch, opacus, transformers}
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from offsite import crypto
from offsite.errors import FormatError, IntegrityError, OffsiteError
from offsite.fileio import canonical_json, sha256_file, write_bytes_atomic
from offsite.privacy import accounting
from offsite.privacy.fingerprint import FINGERPRINT_SCHEME
from offsite.privacy.history import validate_dataset_id

FORMAT = "offsite-receipt"
FORMAT_VERSION = 1
RECEIPT_FILE = "receipt.json"
SIGNATURE_FILE = "receipt.sig"
ADAPTER_FILE = "adapter.safetensors"

#: Recomputed ε must agree with the stated one within this relative tolerance (plus, for PRV, the
#: stated eps_error: a different Opacus version may discretise slightly differently).
EPS_RTOL = 1e-3
#: A stated eps_error above this would make the PRV comparison meaningless.
MAX_EPS_ERROR = 0.5

ACCOUNTANTS = {
    "prv": "opacus.accountants.PRVAccountant: upper bound (estimate at delta - delta/1000, plus eps_error)",
    "rdp": "opacus.accountants.RDPAccountant: default orders",
}

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TOP_LEVEL = {
    "format", "format_version", "created_at", "run_id", "bundle_id", "dataset_id", "dataset_fingerprint",
    "fingerprint_scheme", "adapter_sha256", "mechanism", "neighbouring_relation", "delta", "max_grad_norm",
    "noise_seed", "run_history", "cumulative_history", "epsilon", "accountants", "signer", "versions",
}  # fmt: skip
_ENTRY_EXTRA = {"run_id"}


# ------------------------------------------------------------------------------------------ building


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shaped the run (read from metadata, nothing is imported)."""
    out = {}
    for name in ("offsite", "torch", "opacus", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _history_for_receipt(history: Sequence[Mapping[str, Any]], where: str) -> list[dict[str, Any]]:
    entries = accounting.validate_history(list(history), where)
    keep = ("run_id", *accounting.ENTRY_KEYS)
    return [{k: e[k] for k in keep if k in e} for e in entries]


def _covered(run: Sequence[Mapping[str, Any]], cumulative: Sequence[Mapping[str, Any]]) -> str | None:
    """None if every phase of ``run`` is accounted for in ``cumulative``, else why not.

    Each run phase needs its own cumulative entry with the same σ and q and at least as many steps
    (the history may have recorded steps ahead of execution, which only overstates ε).
    """
    free = list(cumulative)
    for i, e in enumerate(run):
        if e["steps"] == 0:
            continue
        match = next(
            (
                j
                for j, c in enumerate(free)
                if c["noise_multiplier"] == e["noise_multiplier"]
                and c["sample_rate"] == e["sample_rate"]
                and c["steps"] >= e["steps"]
            ),
            None,
        )
        if match is None:
            return (
                f"run_history[{i}] (σ={e['noise_multiplier']:g}, q={e['sample_rate']:g}, steps={e['steps']}) "
                "has no matching entry in cumulative_history"
            )
        free.pop(match)
    return None


def build_receipt(
    *,
    run_history: Sequence[Mapping[str, Any]],
    cumulative_history: Sequence[Mapping[str, Any]],
    delta: float,
    max_grad_norm: float,
    dataset_id: str,
    dataset_fingerprint: str,
    adapter_sha256: str,
    bundle_id: str,
    signer_public_key: Ed25519PublicKey,
    run_id: str | None = None,
    noise_seed: int | None = None,
    eps_error: float = accounting.DEFAULT_EPS_ERROR,
    created_at: str | None = None,
) -> dict[str, Any]:
    """Assemble (and validate) a receipt; ε values are computed here from the histories.

    ``cumulative_history`` is the dataset's whole recorded history *including* this run (e.g.
    ``history.load_history(...)`` after the run's last ``record``). ``noise_seed`` must be None
    except in tests: a seeded noise generator is not private, and the receipt says so.
    """
    run = _history_for_receipt(run_history, "run_history")
    cumulative = _history_for_receipt(cumulative_history, "cumulative_history")
    reason = _covered(run, cumulative)
    if reason:
        raise OffsiteError(f"cannot build receipt: {reason}")
    receipt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": created_at or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run_id": run_id,
        "bundle_id": bundle_id,
        "dataset_id": dataset_id,
        "dataset_fingerprint": dataset_fingerprint,
        "fingerprint_scheme": FINGERPRINT_SCHEME,
        "adapter_sha256": adapter_sha256,
        "mechanism": accounting.MECHANISM,
        "neighbouring_relation": accounting.NEIGHBOURING_RELATION,
        "delta": float(delta),
        "max_grad_norm": float(max_grad_norm) if isinstance(max_grad_norm, (int, float)) else max_grad_norm,
        "noise_seed": noise_seed,
        "run_history": run,
        "cumulative_history": cumulative,
        "epsilon": {
            "this_run": accounting.epsilon(run, delta, eps_error).to_dict(),
            "cumulative": accounting.epsilon(cumulative, delta, eps_error).to_dict(),
        },
        "accountants": dict(ACCOUNTANTS),
        "signer": {
            "algorithm": "ed25519",
            "public_key": crypto.public_key_to_b64(signer_public_key),
            "public_key_fingerprint": crypto.public_key_fingerprint(signer_public_key),
        },
        "versions": library_versions(),
    }
    return validate_receipt(receipt)


def write_receipt(
    adapter_dir: str | os.PathLike, receipt: Mapping[str, Any], private_key: Ed25519PrivateKey
) -> Path:
    """Write ``ADAPTER/receipt.json`` and sign exactly the bytes written into ``ADAPTER/receipt.sig``."""
    receipt = validate_receipt(dict(receipt))
    if receipt["signer"]["public_key"] != crypto.public_key_to_b64(private_key.public_key()):
        raise OffsiteError("receipt.signer.public_key is not the public key of the signing key")
    data = canonical_json(receipt)
    adapter_dir = Path(adapter_dir)
    write_bytes_atomic(adapter_dir / RECEIPT_FILE, data)
    # A crash between the two writes leaves a receipt whose signature does not verify: fails closed.
    write_bytes_atomic(adapter_dir / SIGNATURE_FILE, crypto.encode_signature(crypto.sign(private_key, data)))
    return adapter_dir / RECEIPT_FILE


# ------------------------------------------------------------------------------------------ validation


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _str(doc: Mapping[str, Any], key: str, max_len: int = 256, nullable: bool = False) -> None:
    v = doc[key]
    if v is None and nullable:
        return
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise FormatError(
            f"receipt.{key}: must be a non-empty string of at most {max_len} characters, got {v!r}"
        )


def _eps_block(v: Any, where: str) -> None:
    if not isinstance(v, Mapping) or set(v) != {"prv_upper", "prv_eps_error", "rdp"}:
        raise FormatError(f"{where}: must be an object with exactly prv_upper, prv_eps_error, rdp")
    for k in ("prv_upper", "rdp"):
        if not _num(v[k]) or v[k] < 0:
            raise FormatError(f"{where}.{k}: must be a finite number >= 0, got {v[k]!r}")
    if not _num(v["prv_eps_error"]) or not 0 < v["prv_eps_error"] <= MAX_EPS_ERROR:
        raise FormatError(
            f"{where}.prv_eps_error: must be a number in (0, {MAX_EPS_ERROR}], got {v['prv_eps_error']!r}"
        )


def validate_receipt(doc: Any) -> dict[str, Any]:
    """Check every field of a receipt (untrusted input); FormatError names the first bad field."""
    if not isinstance(doc, Mapping):
        raise FormatError("receipt: must be a JSON object")
    missing = sorted(_TOP_LEVEL - set(doc))
    if missing:
        raise FormatError(
            f"receipt.{missing[0]}: missing"
            + (f" (also missing: {', '.join(missing[1:])})" if missing[1:] else "")
        )
    unknown = sorted(set(doc) - _TOP_LEVEL)
    if unknown:
        raise FormatError(
            f"receipt.{unknown[0]}: unknown field (format_version {FORMAT_VERSION} has no such field)"
        )
    if doc["format"] != FORMAT:
        raise FormatError(f"receipt.format: must be {FORMAT!r}, got {doc['format']!r}")
    if doc["format_version"] != FORMAT_VERSION or isinstance(doc["format_version"], bool):
        raise FormatError(
            f"receipt.format_version: this offsite reads version {FORMAT_VERSION}, got {doc['format_version']!r}"
        )
    for key in ("created_at", "bundle_id"):
        _str(doc, key)
    _str(doc, "run_id", 128, nullable=True)
    try:
        validate_dataset_id(doc["dataset_id"])
    except OffsiteError as e:
        raise FormatError(f"receipt.dataset_id: {e}") from e
    for key in ("dataset_fingerprint", "adapter_sha256"):
        if not isinstance(doc[key], str) or not _HEX64.fullmatch(doc[key]):
            raise FormatError(f"receipt.{key}: must be 64 lowercase hex digits, got {doc[key]!r}")
    if doc["fingerprint_scheme"] != FINGERPRINT_SCHEME:
        raise FormatError(
            f"receipt.fingerprint_scheme: must be {FINGERPRINT_SCHEME!r}, got {doc['fingerprint_scheme']!r}"
        )
    if doc["mechanism"] != accounting.MECHANISM:
        raise FormatError(f"receipt.mechanism: must be {accounting.MECHANISM!r}, got {doc['mechanism']!r}")
    if doc["neighbouring_relation"] != accounting.NEIGHBOURING_RELATION:
        raise FormatError(
            f"receipt.neighbouring_relation: must be {accounting.NEIGHBOURING_RELATION!r}, got {doc['neighbouring_relation']!r}"
        )
    accounting.validate_delta(doc["delta"], "receipt.delta")
    if not _num(doc["max_grad_norm"]) or doc["max_grad_norm"] <= 0:
        raise FormatError(f"receipt.max_grad_norm: must be a finite number > 0, got {doc['max_grad_norm']!r}")
    seed = doc["noise_seed"]
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise FormatError(f"receipt.noise_seed: must be null or an integer, got {seed!r}")
    for key in ("run_history", "cumulative_history"):
        entries = accounting.validate_history(doc[key], f"receipt.{key}")
        for i, e in enumerate(entries):
            extra = set(e) - set(accounting.ENTRY_KEYS) - _ENTRY_EXTRA
            if extra:
                raise FormatError(f"receipt.{key}[{i}].{sorted(extra)[0]}: unknown field")
            if "run_id" in e and not isinstance(e["run_id"], str):
                raise FormatError(f"receipt.{key}[{i}].run_id: must be a string")
    eps = doc["epsilon"]
    if not isinstance(eps, Mapping) or set(eps) != {"this_run", "cumulative"}:
        raise FormatError("receipt.epsilon: must be an object with exactly this_run and cumulative")
    for k in ("this_run", "cumulative"):
        _eps_block(eps[k], f"receipt.epsilon.{k}")
    if not isinstance(doc["accountants"], Mapping) or not all(
        isinstance(v, str) for v in doc["accountants"].values()
    ):
        raise FormatError("receipt.accountants: must be an object of strings")
    signer = doc["signer"]
    if not isinstance(signer, Mapping) or set(signer) != {
        "algorithm",
        "public_key",
        "public_key_fingerprint",
    }:
        raise FormatError(
            "receipt.signer: must be an object with exactly algorithm, public_key, public_key_fingerprint"
        )
    if signer["algorithm"] != "ed25519":
        raise FormatError(f"receipt.signer.algorithm: must be 'ed25519', got {signer['algorithm']!r}")
    if not isinstance(signer["public_key"], str):
        raise FormatError("receipt.signer.public_key: must be a base64 string")
    key = crypto.public_key_from_b64(signer["public_key"], "receipt.signer.public_key")
    if signer["public_key_fingerprint"] != crypto.public_key_fingerprint(key):
        raise FormatError("receipt.signer.public_key_fingerprint: does not match receipt.signer.public_key")
    versions = doc["versions"]
    if not isinstance(versions, Mapping) or not all(isinstance(v, str) for v in versions.values()):
        raise FormatError("receipt.versions: must be an object of strings")
    return json.loads(json.dumps(doc))  # a plain, independent copy


# ------------------------------------------------------------------------------------------ verifying


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
    signer_verified: bool = False

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "receipt": str(self.receipt_path),
            "adapter": str(self.adapter_dir),
            "signer_verified": self.signer_verified,
            "signer_fingerprint": (self.receipt or {}).get("signer", {}).get("public_key_fingerprint"),
            "checks": [c.to_dict() for c in self.checks],
            "tolerance": {"relative": EPS_RTOL, "prv_absolute": "stated prv_eps_error"},
        }


def _compare(name: str, stated: float, recomputed: float, tol: float, what: str) -> Check:
    ok = abs(stated - recomputed) <= tol
    return Check(
        name,
        "ok" if ok else "fail",
        f"{stated:.4f}",
        f"{recomputed:.4f}",
        f"{what}tolerance ±{tol:.2g}" + ("" if ok else f"; differs by {abs(stated - recomputed):.4g}"),
    )


def verify_receipt(
    adapter_dir: str | os.PathLike,
    public_key: Ed25519PublicKey | None = None,
    receipt_path: str | os.PathLike | None = None,
) -> VerificationReport:
    """Check a receipt: signature, signer identity, adapter hash, and both ε recomputed two ways.

    ``receipt_path`` defaults to ``ADAPTER/receipt.json``; the signature is read from ``receipt.sig``
    beside it. Without ``public_key`` the signature is checked against the key embedded in the
    receipt, which proves integrity but not who signed (reported as "unverified").

    Raises FormatError if the receipt is missing, not JSON, or has a malformed field (the message
    names the field); every other problem is a failed check in the returned report.
    """
    adapter_dir = Path(adapter_dir)
    receipt_path = Path(receipt_path) if receipt_path is not None else adapter_dir / RECEIPT_FILE
    report = VerificationReport(receipt_path=receipt_path, adapter_dir=adapter_dir)
    try:
        data = receipt_path.read_bytes()
    except FileNotFoundError as e:
        raise FormatError(f"receipt {receipt_path} does not exist") from e
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(
            f"receipt {receipt_path} is not valid JSON ({e}); it may have been tampered with"
        ) from e
    receipt = validate_receipt(doc)
    report.receipt = receipt
    embedded = crypto.public_key_from_b64(receipt["signer"]["public_key"], "receipt.signer.public_key")
    embedded_fp = receipt["signer"]["public_key_fingerprint"]

    # Signature: over the bytes on disk, with the given key if any, else with the embedded one.
    key = public_key if public_key is not None else embedded
    sig_path = receipt_path.with_name(SIGNATURE_FILE)
    try:
        sig = crypto.decode_signature(sig_path.read_bytes(), str(sig_path))
        crypto.verify(key, data, sig)
        report.checks.append(
            Check("signature", "ok", detail=f"Ed25519 over the bytes of {receipt_path.name}")
        )
        sig_ok = True
    except FileNotFoundError:
        report.checks.append(Check("signature", "fail", detail=f"{sig_path} does not exist"))
        sig_ok = False
    except (FormatError, IntegrityError) as e:
        report.checks.append(Check("signature", "fail", detail=str(e)))
        sig_ok = False

    if public_key is None:
        report.checks.append(
            Check(
                "signer identity",
                "unverified",
                stated=embedded_fp[:16] + "…",
                detail="no public key given: checked against the key embedded in the receipt",
            )
        )
    else:
        given_fp = crypto.public_key_fingerprint(public_key)
        same = given_fp == embedded_fp
        report.signer_verified = same and sig_ok
        report.checks.append(
            Check(
                "signer identity",
                "ok" if report.signer_verified else "fail",
                stated=embedded_fp[:16] + "…",
                recomputed=given_fp[:16] + "…",
                detail="the given key"
                if same
                else "the receipt names another signer than the given public key",
            )
        )

    adapter = adapter_dir / ADAPTER_FILE
    if adapter.is_file():
        actual = sha256_file(adapter)
        same = actual == receipt["adapter_sha256"]
        report.checks.append(
            Check(
                "adapter hash",
                "ok" if same else "fail",
                receipt["adapter_sha256"][:16] + "…",
                actual[:16] + "…",
                f"sha256 of {ADAPTER_FILE}" + ("" if same else ": not the adapter this receipt covers"),
            )
        )
    else:
        report.checks.append(
            Check(
                "adapter hash", "fail", receipt["adapter_sha256"][:16] + "…", "", f"{adapter} does not exist"
            )
        )

    reason = _covered(receipt["run_history"], receipt["cumulative_history"])
    report.checks.append(
        Check(
            "run in cumulative history",
            "fail" if reason else "ok",
            detail=reason or "every phase of this run is in the dataset history",
        )
    )

    delta = receipt["delta"]
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
        except accounting.AccountingError as e:
            report.checks.append(
                Check(f"{label} (PRV upper)", "fail", f"{stated['prv_upper']:.4f}", "", str(e))
            )
        rdp = accounting.epsilon_rdp(history, delta)
        report.checks.append(_compare(f"{label} (RDP)", stated["rdp"], rdp, EPS_RTOL * rdp + 1e-9, ""))
    return report
