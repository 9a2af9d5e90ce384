"""Building, signing and writing privacy receipts (the format is in ``receipt_schema``).

An adapter directory carries two files next to ``adapter.safetensors``: ``receipt.json``, canonical
JSON, and ``receipt.sig``, the Ed25519 signature over the *exact bytes* of ``receipt.json`` as
written (never over a re-serialisation). ε values are computed here from the histories, with the
same accountants the audit (``receipt_audit``) recomputes them with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from offsite import crypto
from offsite.errors import OffsiteError
from offsite.fileio import canonical_json, write_bytes_atomic
from offsite.privacy import accounting
from offsite.privacy.fingerprint import FINGERPRINT_SCHEME
from offsite.privacy.receipt_schema import (
    FORMAT,
    FORMAT_VERSION,
    NOISE_GENERATOR,
    RECEIPT_FILE,
    SIGNATURE_FILE,
    uncovered,
    validate_receipt,
)

__all__ = [
    "ACCOUNTANTS",
    "RECEIPT_FILE",
    "SIGNATURE_FILE",
    "build_receipt",
    "first_run_budget",
    "library_versions",
    "utc_now",
    "validate_receipt",
    "verify_receipt",
    "write_receipt",
]

ACCOUNTANTS = {
    "prv": "opacus.accountants.PRVAccountant: upper bound (estimate at delta - delta/1000, plus eps_error)",
    "rdp": "opacus.accountants.RDPAccountant: default orders",
}


def utc_now() -> str:
    """The receipt's time format: ``YYYY-MM-DDTHH:MM:SSZ``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shaped the run (read from metadata, nothing is imported)."""
    out = {}
    for name in ("offsite", "torch", "opacus", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def first_run_budget(epsilon: float, delta: float, at: str | None = None) -> dict[str, Any]:
    """The ``budget`` of a dataset whose only budget setting is this run's own ε and δ."""
    at = at or utc_now()
    return {
        "epsilon": float(epsilon),
        "delta": float(delta),
        "changes": [{"epsilon": float(epsilon), "delta": float(delta), "at": at, "how": "first-run"}],
        "inherits": [],
    }


def _history_for_receipt(history: Sequence[Mapping[str, Any]], where: str) -> list[dict[str, Any]]:
    entries = accounting.validate_history(list(history), where)
    keep = ("run_id", *accounting.ENTRY_KEYS)
    return [{k: e[k] for k in keep if k in e} for e in entries]


def build_receipt(
    *,
    run_history: Sequence[Mapping[str, Any]],
    cumulative_history: Sequence[Mapping[str, Any]],
    delta: float,
    max_grad_norm: float,
    size_bucket: int,
    nominal_batch: int,
    budget: Mapping[str, Any],
    dataset_id: str,
    dataset_fingerprint: str,
    adapter_sha256: str,
    bundle_id: str,
    signer_public_key: Ed25519PublicKey,
    run_id: str,
    noise_seeded: bool = False,
    eps_error: float = accounting.DEFAULT_EPS_ERROR,
    created_at: str | None = None,
) -> dict[str, Any]:
    """Assemble (and validate) a version-2 receipt; ε values are computed here from the histories.

    ``cumulative_history`` is the dataset's whole recorded history *including* this run.
    ``budget`` has the shape ``{"epsilon", "delta", "changes": [...], "inherits": [...]}`` (see
    ``receipt_schema.Budget``); its δ must be the receipt's. ``noise_seeded`` must be False except in
    tests: a seeded noise generator is not private, the receipt says so and the audit fails it.
    """
    run = _history_for_receipt(run_history, "run_history")
    cumulative = _history_for_receipt(cumulative_history, "cumulative_history")
    reason = uncovered(run, cumulative)
    if reason:
        raise OffsiteError(f"cannot build receipt: {reason}")
    if float(budget["delta"]) != float(delta):
        raise OffsiteError(
            f"cannot build receipt: the budget's δ={budget['delta']:g} is not the run's δ={delta:g}"
        )
    receipt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": created_at or utc_now(),
        "run_id": run_id,
        "bundle_id": bundle_id,
        "dataset_id": dataset_id,
        "dataset_fingerprint": dataset_fingerprint,
        "fingerprint_scheme": FINGERPRINT_SCHEME,
        "adapter_sha256": adapter_sha256,
        "mechanism": accounting.MECHANISM,
        "neighbouring_relation": accounting.NEIGHBOURING_RELATION,
        "delta": float(delta),
        "max_grad_norm": float(max_grad_norm),
        "size_bucket": int(size_bucket),
        "nominal_batch": int(nominal_batch),
        "noise_source": {"generator": NOISE_GENERATOR, "seeded": bool(noise_seeded)},
        "budget": dict(budget),
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


# Callers that import the audit from here keep working; it lives in receipt_audit.
from offsite.privacy.receipt_audit import verify_receipt  # noqa: E402
