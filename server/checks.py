"""What the server checks before a submission counts. Every check raises an ``OffsiteError`` that
names what was wrong; the service records the first failure as the rejection reason.

In order, on the files of a fully received submission (each already matched its sha256 in the signed
envelope, and the envelope was checked when the upload began):

1. the adapter, by the one validator of received adapters (``offsite.formats.adapter.read_adapter``):
   safetensors only (no pickle, no ``torch.load``), the bundle id and model fingerprint of the job's
   bundle, the file's hash, tensor names, shapes and dtypes exactly the bundle's adapter table, every
   value finite;
2. the receipt (``offsite.privacy.receipt.verify_receipt``, called here and nowhere else on the
   server): the signature by the key enrolled for the caller, the adapter hash, ε recomputed, the
   bundle id; then the job's policy: cumulative ε on the dataset at most the job's maximum, δ at most
   the job's maximum, noise not seeded; no receipt only if the job allows non-private adapters.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from offsite.errors import MismatchError, OffsiteError
from offsite.fileio import sha256_bytes
from offsite.formats.adapter import read_adapter
from offsite.formats.spec import AdapterSpec
from offsite.formats.submission import RECEIPT_FILES
from offsite.server.errors import ChunkIntegrityError, PolicyError, SignatureError
from offsite.server.storage.base import JobRecord


@dataclass(frozen=True)
class ReceiptFacts:
    """What the ledger keeps of an accepted receipt (besides its exact bytes)."""

    dataset_id: str
    epsilon: float  # cumulative ε on the dataset, PRV upper bound
    delta: float
    receipt: bytes
    signature: bytes  # the exact bytes of receipt.sig
    cumulative_history: list  # the receipt's, validated: what the ledger composes


@contextlib.contextmanager
def _named_by_file(directory: Path) -> Iterator[None]:
    """Errors name the submission's files (``adapter.safetensors: ...``), never the directory the server
    keeps them in: a rejection reason goes back to the client and into the owner's records."""
    try:
        yield
    except OffsiteError as e:
        text = str(e).replace(f"{directory}{os.sep}", "").replace(str(directory), "the submission")
        if text == str(e):
            raise
        raise type(e)(text) from None


def check_adapter(directory: Path, manifest: dict, job: JobRecord) -> str:
    """Return the adapter's sha256 once it passes."""
    with _named_by_file(directory):
        adapter = read_adapter(
            directory,
            expected_tensors=manifest["adapter"]["tensors"],
            bundle_id=job.bundle_id,
            source_fingerprint=manifest["source"]["fingerprint"],
            expected_spec=AdapterSpec.from_json(manifest["adapter"]["spec"]),
        )
    return str(adapter.meta["sha256"]["adapter.safetensors"])


def check_receipt(
    directory: Path, job: JobRecord, enrolled_key: Ed25519PublicKey, declared: dict[str, str]
) -> ReceiptFacts | None:
    """The receipt against the caller's enrolled key and the job's policy; None for a non-private adapter.

    ``declared``: file name -> sha256 from the signed envelope; the bytes kept are checked against it.
    """
    if not all((directory / name).is_file() for name in RECEIPT_FILES):
        if job.allow_no_dp:
            return None
        raise PolicyError(
            f"job {job.job_id} accepts only adapters trained with differential privacy: the submission has "
            "no privacy receipt"
        )
    from offsite.privacy.receipt import verify_receipt

    with _named_by_file(directory):
        report = verify_receipt(directory, public_key=enrolled_key)
    receipt = report.receipt or {}
    failed = [c for c in report.checks if c.status == "fail"]
    if report.stopped or any(c.name in ("signature", "signer identity") for c in failed):
        raise SignatureError(
            "the receipt is not signed by the key enrolled for this client: "
            + "; ".join(f"{c.name}: {c.detail}" for c in failed if c.name in ("signature", "signer identity"))
        )
    if report.format_version != 2:
        # Version 1 published q = batch size / N, which gives the dataset size, and names no budget.
        raise PolicyError(
            f"receipt format version {report.format_version} is not accepted: train again with this "
            "version of offsite (receipt format 2)"
        )
    if any(c.name == "noise source" for c in failed):
        raise PolicyError("the receipt's noise was seeded (a test-only setting): the run is not private")
    if failed:
        raise MismatchError(
            "the receipt does not verify: " + "; ".join(f"{c.name}: {c.detail or 'failed'}" for c in failed)
        )
    if receipt.get("bundle_id") != job.bundle_id:
        raise MismatchError(f"the receipt is for bundle {str(receipt.get('bundle_id'))[:12]}…, not the job's")
    epsilon = float(receipt["epsilon"]["cumulative"]["prv_upper"])
    delta = float(receipt["delta"])
    if delta > job.max_delta:
        raise PolicyError(f"the receipt's δ = {delta:g} is above the job's maximum δ = {job.max_delta:g}")
    if epsilon > job.max_epsilon:
        raise PolicyError(
            f"the receipt's cumulative ε = {epsilon:.4g} on dataset {receipt['dataset_id']!r} is above the "
            f"job's maximum ε = {job.max_epsilon:g}"
        )
    kept = {name: (directory / name).read_bytes() for name in RECEIPT_FILES}
    for name, data in kept.items():
        if sha256_bytes(data) != declared.get(name):
            raise ChunkIntegrityError(f"{name} changed after it was received")
    # What the ledger composes comes from the very bytes it keeps (the ones whose hash was just checked).
    from offsite.privacy.receipt_schema import parse_receipt

    _, kept_receipt = parse_receipt(kept[RECEIPT_FILES[0]], RECEIPT_FILES[0])
    if kept_receipt != receipt:
        raise ChunkIntegrityError(f"{RECEIPT_FILES[0]} changed while it was being checked")
    return ReceiptFacts(
        str(receipt["dataset_id"]),
        epsilon,
        delta,
        kept[RECEIPT_FILES[0]],
        kept[RECEIPT_FILES[1]],
        list(kept_receipt["cumulative_history"]),
    )
