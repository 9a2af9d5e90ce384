"""The owner's own operations on its state, run from the command line with or without a server running.

Enrol and revoke data owners, grant budgets, record issued bundles, publish a bundle to a job, list
submissions, hand an accepted submission to the plug-in (and record it), export the ledger. Each works
on the state directory directly (the server, if it runs, sees the change through the same database: a
revocation ends the client's open streams within a second). Enrolments, revocations, grants and
plug-ins are entries of the ledger, appended in the transaction of the change itself.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from offsite import crypto, pki
from offsite.errors import FormatError, OffsiteError
from offsite.fileio import (
    SAFETENSORS_DTYPES,
    check_new_output,
    sha256_bytes,
    staged_directory,
    write_bytes_atomic,
    write_new_file,
)
from offsite.formats import enrolment, signing
from offsite.formats.bundle import MANIFEST, Bundle
from offsite.formats.safetensors_file import ITEM_SIZE
from offsite.privacy import accounting, history
from offsite.server import budgets
from offsite.server import ledger as ledger_records
from offsite.server.errors import NotFoundError, PermissionDeniedError
from offsite.server.owner_state import OwnerState, read_server_config
from offsite.server.storage.base import ClientRecord, JobRecord, SubmissionRecord, SubmissionState, utc_now

#: The adapter file may exceed its tensors' bytes by this much (the safetensors header).
ADAPTER_HEADER_ALLOWANCE = 1 << 20


# ------------------------------------------------------------------------------------------ clients


def enrol(
    state: OwnerState, request: bytes, client_id: str, out: str | os.PathLike, what: str
) -> ClientRecord:
    """Check an enrolment request, certify its TLS key as ``client_id``, record it, write the package.

    The package directory appears only complete, and only once the client is recorded.
    """
    pki.validate_client_id(client_id)
    out = check_new_output(out)
    csr, receipt_key = enrolment.read_request(request, what)
    paths = state.paths
    config = read_server_config(paths)
    ca_cert = pki.load_cert(paths.ca_cert)
    if not paths.ca_key.exists():
        raise OffsiteError(
            f"{paths.ca_key} is not here: enrolment needs the CA key (keep it offline and bring it back "
            "to enrol)"
        )
    cert = pki.issue_client_cert(pki.load_key(paths.ca_key), ca_cert, csr, client_id)
    owner_key = crypto.load_public_key(paths.signing_public_key)
    record = ClientRecord(
        client_id=client_id,
        cert_sha256=pki.cert_sha256(cert),
        cert_pem=pki.cert_pem(cert),
        receipt_key=crypto.public_key_to_b64(receipt_key),
        receipt_key_fingerprint=crypto.public_key_fingerprint(receipt_key),
        enrolled_at=utc_now(),
    )
    with staged_directory(out) as stage:
        write_bytes_atomic(stage / enrolment.CLIENT_CERT, record.cert_pem)
        write_bytes_atomic(stage / enrolment.CA_CERT, pki.cert_pem(ca_cert))
        write_bytes_atomic(stage / enrolment.OWNER_KEY, crypto.public_key_pem(owner_key))
        info = enrolment.make_info(
            client_id=client_id,
            server_address=config.address,
            server_name=config.server_name,
            client_cert_sha256=record.cert_sha256,
            ca_cert_sha256=pki.cert_sha256(ca_cert),
            owner_key_fingerprint=crypto.public_key_fingerprint(owner_key),
            receipt_key_fingerprint=record.receipt_key_fingerprint,
        )
        write_bytes_atomic(stage / enrolment.INFO, info)
        state.storage.add_client(record, ledger=state.ledger.maker(ledger_records.enrol_record(record)))
    return record


def revoke(state: OwnerState, client_id: str, reason: str = "revoked by the owner") -> ClientRecord:
    client = state.storage.get_client(client_id)
    entry = ledger_records.revoke_record(client, reason)
    return state.storage.revoke_client(client_id, reason, ledger=state.ledger.maker(entry))


# ------------------------------------------------------------------------------------------ the ledger


def grant(
    state: OwnerState, client_id: str, dataset_id: str, epsilon: float, delta: float
) -> budgets.DatasetLedger:
    """Grant (or change) the budget of ``client_id``'s dataset: a ledger entry; the latest grant is in
    force. Returns what the ledger holds for the pair afterwards."""
    pki.validate_client_id(client_id)
    history.validate_dataset_id(dataset_id)
    history.check_epsilon(epsilon, "--epsilon")
    accounting.validate_delta(delta, "--delta")
    client = state.storage.get_client(client_id)
    if client.revoked_at is not None:
        raise PermissionDeniedError(f"client {client_id} is revoked ({client.revoked_reason}): no grant")
    record = ledger_records.grant_record(client_id, dataset_id, epsilon, delta)
    state.storage.append_ledger(state.ledger.maker(record))
    return budgets.read(state.storage, client_id, dataset_id)


def export_ledger(state: OwnerState, out: str | os.PathLike) -> Path:
    """Write the signed, self-contained export of the ledger to ``out`` (a new file)."""
    state.ledger.open()
    return write_new_file(out, state.ledger.export())


# ------------------------------------------------------------------------------------------ bundles and jobs


def record_bundle(state: OwnerState, bundle_dir: str | os.PathLike) -> str:
    """Keep an issued bundle's manifest in the owner's records (``owner prepare`` calls this)."""
    data = (Path(bundle_dir) / MANIFEST).read_bytes()
    bundle_id = sha256_bytes(data)
    state.storage.record_bundle(bundle_id, data)
    return bundle_id


def manifest_source(state: OwnerState):
    """For ``offsite.plug.plug``: a bundle's manifest bytes from the record of issued bundles."""

    def lookup(bundle_id: str) -> bytes:
        try:
            return state.storage.get_bundle(bundle_id).manifest
        except NotFoundError:
            raise FormatError(
                f"bundle {bundle_id[:12]}… was not issued by this owner (no record in {state.paths.root}); "
                "pass --bundle DIR"
            ) from None

    return lookup


def adapter_size_limit(tensors: dict) -> int:
    """The largest adapter.safetensors a job accepts: its tensors' bytes plus room for the header.

    ``tensors`` is a bundle's tensor table, already checked against its schema by ``Bundle.open``."""
    total = sum(math.prod(e["shape"]) * _ITEM_BYTES[e["dtype"]] for e in tensors.values())
    return total + ADAPTER_HEADER_ALLOWANCE


#: Bytes per element of each torch dtype name a tensor table may hold.
_ITEM_BYTES = {name: ITEM_SIZE[code] for code, name in SAFETENSORS_DTYPES.items()}


def publish(
    state: OwnerState,
    bundle_dir: str | os.PathLike,
    *,
    job_id: str,
    clients: Sequence[str],
    max_epsilon: float,
    max_delta: float,
    allow_no_dp: bool = False,
) -> JobRecord:
    """Sign the bundle's manifest, store every file by hash, and open job ``job_id`` to ``clients``."""
    pki.validate_name(job_id, "job id")
    if not clients:
        raise OffsiteError("--clients: name at least one enrolled client")
    for c in clients:
        pki.validate_client_id(c)
    if not (isinstance(max_epsilon, float | int) and math.isfinite(max_epsilon) and max_epsilon > 0):
        raise OffsiteError(f"--max-epsilon must be a finite number > 0, got {max_epsilon!r}")
    accounting.validate_delta(max_delta, "--max-delta")
    with warnings.catch_warnings():  # the owner's own bundle is not signed yet: that is what we do here
        warnings.simplefilter("ignore", signing.UnverifiedBundleWarning)
        bundle = Bundle.open(bundle_dir)
    storage = state.storage
    with contextlib.suppress(NotFoundError):
        storage.get_job(job_id)
        raise OffsiteError(f"job {job_id!r} exists already; choose another --job")
    for c in clients:
        storage.get_client(c)
    manifest = (bundle.path / MANIFEST).read_bytes()
    if sha256_bytes(manifest) != bundle.id:
        raise OffsiteError(f"{bundle.path / MANIFEST} changed while it was being published")
    signature = signing.sign_manifest(manifest, crypto.load_private_key(state.paths.signing_key))
    for rel, digest in sorted(bundle.manifest["files"].items()):
        state.blobs.put_file(bundle.path / rel, digest)  # checked against the manifest's hash again
    storage.record_bundle(bundle.id, manifest)
    storage.sign_bundle(bundle.id, signature)
    job = JobRecord(
        job_id=job_id,
        bundle_id=bundle.id,
        max_epsilon=float(max_epsilon),
        max_delta=float(max_delta),
        allow_no_dp=bool(allow_no_dp),
        max_adapter_bytes=adapter_size_limit(bundle.expected_tensors),
        clients=tuple(sorted(set(clients))),
        published_at=utc_now(),
    )
    storage.add_job(job)
    return job


# ------------------------------------------------------------------------------------------ submissions


def submissions(
    state: OwnerState, job_id: str | None = None, states: Sequence[SubmissionState] | None = None
) -> list[SubmissionRecord]:
    return state.storage.list_submissions(job_id=job_id, states=states)


@contextlib.contextmanager
def accepted_adapter(state: OwnerState, submission_id: str, scratch: Path) -> Iterator[Path]:
    """An accepted submission as an adapter directory (copies from the blob store), for plug-in.

    Copies, not hard links: the adapter validator refuses files with several names, whose content
    could change through another one."""
    record = state.storage.get_submission(submission_id)
    if record.state not in (SubmissionState.ACCEPTED, SubmissionState.PLUGGED):
        detail = f": {record.reason}" if record.reason else ""
        raise OffsiteError(
            f"submission {submission_id} is {record.state.value}{detail}; only accepted submissions can be plugged in"
        )
    directory = scratch / f"submission-{submission_id}"
    directory.mkdir(parents=True)
    for f in record.files:
        shutil.copyfile(state.blobs.path(f.sha256), directory / f.name)
    yield directory


def mark_plugged(state: OwnerState, submission_id: str, into: str) -> SubmissionRecord:
    """Record that an accepted submission was plugged in (and its ledger entry, in one transaction)."""
    record = state.storage.get_submission(submission_id)
    return state.storage.mark_plugged(
        submission_id, into, ledger=state.ledger.maker(ledger_records.plug_record(record))
    )
