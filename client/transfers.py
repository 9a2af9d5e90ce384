"""The data owner's calls: list jobs, fetch a job's bundle, submit an adapter, ask a submission's state.

**Fetch** checks the owner's signature over the job's manifest with the owner key of the enrolment
package first, then downloads every file the manifest lists into ``.OUT.fetch/`` beside the output,
chunk by chunk (each chunk's sha256 checked), resuming a partial file from its size after a break or
a rerun; each whole file must match the signed manifest. Only a bundle that passes
``Bundle.open(…, owner_key)`` is moved to ``OUT``.

**Submit** signs an envelope over the adapter's files (``offsite.formats.submission``), opens an
upload session, and streams the files from the committed offset the server reports, resuming after
a break; ``KEYS/submissions/`` remembers the open session, so a rerun of the same command continues
it. The server's decision (accepted, or rejected with the reason) ends it; an acceptance carries the
owner's signed checkpoint of the ledger entry that records it, kept in ``KEYS/checkpoints/``.

**Budget** asks what the owner's ledger holds for this data owner's datasets (grants, recorded runs,
ε spent); its answer carries a checkpoint of the ledger's head, kept too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import grpc

from offsite import pki
from offsite.client import checkpoints
from offsite.client.connection import Backoff, ServerError, open_channel, retryable, server_error, stub, unary
from offsite.client.identity import Credentials
from offsite.errors import FormatError, IntegrityError, OffsiteError
from offsite.fileio import canonical_json, claim_output, sha256_bytes, sha256_file, write_bytes_atomic
from offsite.formats import signing
from offsite.formats import submission as envelope_format
from offsite.formats.bundle import MANIFEST, Bundle
from offsite.formats.issued import manifest_from_bytes
from offsite.formats.manifest import Manifest
from offsite.wire import transport
from offsite.wire.v1 import offsite_pb2 as pb

#: progress(description, total_bytes) -> update(bytes_done); one bar per transfer.
Progress = Callable[[str, int], Callable[[int], None]]
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")

#: The wire's submission states by the names the server's storage uses ("unknown" for a state this
#: client's protocol version does not know).
STATE_NAMES = {
    value: "unknown"
    if value == pb.SUBMISSION_STATE_UNSPECIFIED
    else name.removeprefix("SUBMISSION_STATE_").lower()
    for name, value in pb.SubmissionState.items()
}


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


@dataclass(frozen=True)
class FetchedBundle:
    """A bundle fetched and verified: where it is, its id and its manifest (as JSON data)."""

    path: Path
    id: str
    manifest: dict


class Watchdog:
    """Cancels a call that makes no progress for ``timeout`` seconds (transfers never time out otherwise)."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._last = time.monotonic()
        self._call = None
        self._stop = threading.Event()
        self.fired = False

    def watch(self, call) -> Watchdog:
        self._call = call
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def touch(self, timeout: float | None = None) -> None:
        self._last = time.monotonic()
        if timeout is not None:
            self.timeout = timeout

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            if time.monotonic() - self._last > self.timeout:
                self.fired = True
                self._call.cancel()
                return

    def stop(self) -> None:
        self._stop.set()


class ChunkWriter:
    """Checks each downloaded chunk's sha256, appends it to the file and feeds the whole file's hash, in
    a thread of its own: receiving the next chunk overlaps checking and writing this one (hashlib and
    file writes release the GIL), and the file's hash needs no second reading of the file.

    At most ``depth`` chunks wait (memory stays a few MiB). The first error (a chunk that does not match
    its sha256, a full disk) is raised by the next ``put`` or ``drain``; chunks after it are dropped.
    """

    def __init__(self, f: BinaryIO, hasher, what: str, depth: int = 4):
        self._f, self._hasher, self._what = f, hasher, what
        self._queue: queue.Queue = queue.Queue(depth)
        self._error: BaseException | None = None
        self._written = f.tell()
        self._thread = threading.Thread(target=self._run, name="offsite-chunk-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None:
                    self._write(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _write(self, offset: int, data: bytes, sha256: str) -> None:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"{self._what}: chunk at offset {offset} does not match its sha256")
        self._f.write(data)
        self._hasher.update(data)
        self._written += len(data)

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def put(self, offset: int, data: bytes, sha256: str) -> None:
        self._raise()
        self._queue.put((offset, data, sha256))

    def drain(self) -> int:
        """Wait until every queued chunk is written; return the bytes in the file."""
        self._queue.join()
        self._raise()
        return self._written

    def close(self) -> None:
        """Write what is queued (a partial file keeps every checked byte), then end the thread."""
        self._queue.put(None)
        self._thread.join()


@dataclass
class SubmitResult:
    submission: pb.Submission
    resumed: bool
    checkpoint: Path | None = None  # where the ledger checkpoint of an acceptance was kept
    checkpoint_problem: str = ""  # why a checkpoint the server sent was not kept (not the owner's)
    replaced_expired: str = ""  # the id of an expired session this upload started afresh from


class OffsiteClient:
    def __init__(
        self,
        credentials: Credentials,
        keys_dir: Path,
        server: str | None = None,
        *,
        chunk_bytes: int = transport.CHUNK_BYTES,
        retry_budget: float = transport.RETRY_BUDGET_S,
        on_retry: Callable[[str, float], None] | None = None,
    ):
        if not 0 < chunk_bytes <= transport.MAX_CHUNK_BYTES:
            raise OffsiteError(f"chunk size must be in (0, {transport.MAX_CHUNK_BYTES}]")
        self.credentials = credentials
        self.keys_dir = Path(keys_dir)
        self.channel = open_channel(credentials, server)
        self.stub = stub(self.channel)
        self.chunk_bytes = chunk_bytes
        self.retry_budget = retry_budget
        self.on_retry = on_retry

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> OffsiteClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _backoff(self) -> Backoff:
        return Backoff(self.retry_budget, self.on_retry)

    # -- jobs -------------------------------------------------------------------------------------
    def list_jobs(self) -> list[pb.Job]:
        jobs, token, backoff = [], "", self._backoff()
        while True:
            response = unary(self.stub.ListJobs, pb.ListJobsRequest(page_token=token), backoff)
            jobs.extend(response.jobs)
            token = response.next_page_token
            if not token:
                return jobs

    def job(self, job_id: str) -> pb.Job:
        for job in self.list_jobs():
            if job.job_id == job_id:
                return job
        raise OffsiteError(
            f"no job {job_id!r} is open to client {self.credentials.client_id} (`offsite client jobs`)"
        )

    def verified_manifest(self, job: pb.Job) -> Manifest:
        """The job's manifest, after its signature by the enrolled owner key and its bundle id check."""
        if not job.manifest_signature:
            raise IntegrityError(f"job {job.job_id}: the bundle is not signed by the owner")
        signing.verify_manifest(job.manifest, job.manifest_signature, self.credentials.owner_key)
        manifest = manifest_from_bytes(job.manifest, job.bundle_id, f"job {job.job_id}: the manifest")
        for rel in manifest.files:
            # The schema's RelPath cannot leave the bundle; on this machine a path is also kept to plain
            # segments, and never names the two files fetch writes itself.
            if not all(_SEGMENT.fullmatch(p) for p in rel.split("/")) or rel in (
                MANIFEST,
                signing.MANIFEST_SIGNATURE,
            ):
                raise FormatError(
                    f"job {job.job_id}: the manifest lists a file path {rel!r} that is not allowed"
                )
        return manifest

    # -- fetch ------------------------------------------------------------------------------------
    def fetch(self, job_id: str, out: str | os.PathLike, progress: Progress = _no_progress) -> FetchedBundle:
        """Download job ``job_id``'s bundle to ``out``, verified (signature, every hash) before it appears
        there. Partial files stay in ``.OUT.fetch`` beside it, so a rerun continues."""
        with claim_output(out) as claim:
            job = self.job(job_id)
            manifest = self.verified_manifest(job)
            stage = claim.path.parent / f".{claim.path.name}.fetch"
            bundle_dir = stage / "bundle"
            marker = stage / "fetch.json"
            if stage.exists():
                try:
                    same = json.loads(marker.read_text()).get("bundle_id") == job.bundle_id
                except (OSError, ValueError):
                    same = False
                if not same:  # partial files of another bundle: start over
                    shutil.rmtree(stage)
            bundle_dir.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(marker, canonical_json({"job_id": job_id, "bundle_id": job.bundle_id}))
            for rel, digest in sorted(manifest.files.items()):
                self._download(job_id, rel, digest, bundle_dir / rel, progress)
            write_bytes_atomic(bundle_dir / MANIFEST, job.manifest)
            write_bytes_atomic(bundle_dir / signing.MANIFEST_SIGNATURE, job.manifest_signature)
            with Bundle.open(bundle_dir, owner_key=self.credentials.owner_key) as bundle:
                fetched = FetchedBundle(claim.path, bundle.id, bundle.manifest)
            os.replace(bundle_dir, claim.stage)  # the claim's empty staging directory; committed on exit
            shutil.rmtree(stage, ignore_errors=True)
        return fetched

    def _download(self, job_id: str, rel: str, digest: str, dest: Path, progress: Progress) -> None:
        if dest.is_file():
            if sha256_file(dest) == digest:
                return
            dest.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        for attempt in range(2):
            if self._download_part(job_id, rel, part, progress) == digest:
                os.replace(part, dest)
                return
            part.unlink()  # a corrupt partial (e.g. after a power cut here): fetch the file once more
            if attempt:
                raise IntegrityError(f"{rel}: the downloaded file does not match the signed manifest")

    def _download_part(self, job_id: str, rel: str, part: Path, progress: Progress) -> str:
        """Download ``rel`` into ``part`` from the size it has; return the sha256 of the whole file.

        Chunks are checked and written by a ``ChunkWriter`` thread while the next ones arrive."""
        backoff = self._backoff()
        update = None
        with open(part, "ab") as f:
            hasher = hashlib.sha256()
            with open(part, "rb") as held:  # a partial file from an earlier run: hashed once, here
                while block := held.read(transport.CHUNK_BYTES):
                    hasher.update(block)
            writer = ChunkWriter(f, hasher, rel)
            try:
                while True:
                    offset = writer.drain()  # every byte before it is checked and written
                    call = self.stub.DownloadFile(
                        pb.DownloadFileRequest(job_id=job_id, path=rel, offset=offset)
                    )
                    dog = Watchdog(transport.STALL_TIMEOUT_S).watch(call)
                    try:
                        for chunk in call:
                            dog.touch()
                            if chunk.offset != offset:
                                raise IntegrityError(
                                    f"{rel}: chunk at offset {chunk.offset}, expected {offset}"
                                )
                            data = chunk.data  # each access copies the bytes: once
                            if update is None:
                                update = progress(rel, chunk.file_size)
                            writer.put(offset, data, chunk.sha256)
                            offset += len(data)
                            update(offset)
                            backoff.progress()
                            if offset >= chunk.file_size:
                                writer.drain()
                                f.flush()
                                return hasher.hexdigest()
                        raise OffsiteError(f"{rel}: the server ended the download at byte {offset}")
                    except grpc.RpcError as e:
                        if not (retryable(e) or (e.code() == grpc.StatusCode.CANCELLED and dog.fired)):
                            raise server_error(e) from None
                        backoff.wait(e)
                    finally:
                        dog.stop()
            finally:
                writer.close()
                f.flush()

    # -- submit -----------------------------------------------------------------------------------
    def _pending_path(self, job_id: str, files: list[dict]) -> Path:
        key = sha256_bytes(canonical_json({"job_id": job_id, "files": files}))[:32]
        return self.keys_dir / "submissions" / "pending" / f"{key}.json"

    def submit(
        self, job_id: str, adapter_dir: str | os.PathLike, progress: Progress = _no_progress
    ) -> SubmitResult:
        pki.validate_name(job_id, "job id")
        adapter_dir = Path(adapter_dir)
        files = envelope_format.files_of(adapter_dir)
        pending = self._pending_path(job_id, files)
        submission_id, resumed, expired = None, False, ""
        if pending.is_file():
            submission_id = json.loads(pending.read_text())["submission_id"]
            resumed = True
        backoff = self._backoff()
        if submission_id is not None:
            try:
                status = unary(
                    self.stub.QueryWriteStatus,
                    pb.QueryWriteStatusRequest(submission_id=submission_id),
                    backoff,
                )
                if status.complete:
                    record = self._finish_pending(pending, submission_id)
                    if record.state != pb.SUBMISSION_STATE_EXPIRED:
                        return self._with_checkpoint(SubmitResult(record, resumed))
                    # The server gave up on the session (no byte for its upload TTL) and deleted what it
                    # had: the same files go up again in a fresh session, under a fresh envelope.
                    expired = submission_id
                    submission_id, resumed = None, False
            except ServerError as e:
                if e.code != grpc.StatusCode.NOT_FOUND:
                    raise
                submission_id, resumed = None, False
        if submission_id is None:
            begun = self._begin(job_id, files, backoff)
            submission_id = begun.submission_id
            write_bytes_atomic(
                pending,
                canonical_json(
                    {
                        "submission_id": submission_id,
                        "job_id": job_id,
                        "adapter": str(adapter_dir.resolve()),
                        "files": files,
                    }
                ),
            )
        try:
            record = self._upload(submission_id, adapter_dir, files, progress)
        except ServerError:
            # Refused at the end (a failed check) or in the middle: if the server decided it, the session
            # is over and the decision is remembered; otherwise a rerun resumes it.
            with contextlib.suppress(OffsiteError):
                record = self.status(submission_id)
                if record.state not in (pb.SUBMISSION_STATE_UPLOADING, pb.SUBMISSION_STATE_RECEIVED):
                    self._remember(submission_id, job_id, adapter_dir, record)
                    pending.unlink(missing_ok=True)
            raise
        self._remember(submission_id, job_id, adapter_dir, record)
        pending.unlink(missing_ok=True)
        return self._with_checkpoint(SubmitResult(record, resumed, replaced_expired=expired))

    def keep_checkpoint(self, data: bytes) -> tuple[Path | None, str]:
        if not data:
            return None, ""
        try:
            return checkpoints.store(self.keys_dir, data, self.credentials.owner_key), ""
        except checkpoints.LedgerForkError as e:
            return e.path, f"kept, but {e}"
        except OffsiteError as e:
            return None, f"NOT kept: {e}"

    def _with_checkpoint(self, result: SubmitResult) -> SubmitResult:
        result.checkpoint, result.checkpoint_problem = self.keep_checkpoint(
            result.submission.ledger_checkpoint
        )
        return result

    def _begin(self, job_id: str, files: list[dict], backoff: Backoff) -> pb.BeginSubmissionResponse:
        """Open an upload session. Each attempt signs a fresh envelope: if an earlier attempt reached the
        server (and only its answer was lost), its nonce is spent, and that session is simply abandoned."""
        while True:
            envelope = envelope_format.make_envelope(job_id, self.credentials.client_id, files)
            signature = envelope_format.sign_envelope(envelope, self.credentials.signing_key)
            request = pb.BeginSubmissionRequest(envelope=envelope, signature=signature)
            try:
                return self.stub.BeginSubmission(request, timeout=transport.UNARY_DEADLINE_S)
            except grpc.RpcError as e:
                if not retryable(e):
                    raise server_error(e) from None
                backoff.wait(e)

    def _finish_pending(self, pending: Path, submission_id: str) -> pb.Submission:
        record = self.status(submission_id)
        doc = json.loads(pending.read_text())
        self._remember(submission_id, doc["job_id"], Path(doc["adapter"]), record)
        pending.unlink(missing_ok=True)
        return record

    def _remember(self, submission_id: str, job_id: str, adapter_dir: Path, record: pb.Submission) -> None:
        write_bytes_atomic(
            self.keys_dir / "submissions" / f"{submission_id}.json",
            canonical_json(
                {
                    "submission_id": submission_id,
                    "job_id": job_id,
                    "adapter": str(adapter_dir.resolve()),
                    "state": STATE_NAMES.get(record.state, "unknown"),
                    "reason": record.reason,
                }
            ),
        )

    def _chunks(
        self, submission_id: str, adapter_dir: Path, files: list[dict], start: int, dog: Watchdog, update
    ) -> Iterator[pb.WriteSubmissionRequest]:
        """The concatenated files from byte ``start``, as chunks; the last message finishes the write."""
        position, first = 0, True
        for f in files:
            end = position + f["size"]
            if end > start:
                with open(adapter_dir / f["name"], "rb") as fh:
                    fh.seek(max(start - position, 0))
                    offset = max(start, position)
                    while offset < end:
                        data = fh.read(min(self.chunk_bytes, end - offset))
                        if not data:
                            raise OffsiteError(
                                f"{adapter_dir / f['name']} shrank while it was being uploaded"
                            )
                        dog.touch()
                        yield pb.WriteSubmissionRequest(
                            submission_id=submission_id if first else "",
                            offset=offset,
                            data=data,
                            sha256=hashlib.sha256(data).hexdigest(),
                        )
                        first = False
                        offset += len(data)
                        update(offset)
            position = end
        dog.touch(transport.DECIDE_TIMEOUT_S)  # the server now checks the submission
        yield pb.WriteSubmissionRequest(
            submission_id=submission_id if first else "", offset=position, finish_write=True
        )

    def _upload(
        self, submission_id: str, adapter_dir: Path, files: list[dict], progress: Progress
    ) -> pb.Submission:
        update = progress(adapter_dir.name, sum(f["size"] for f in files))
        backoff = self._backoff()
        while True:
            status = unary(
                self.stub.QueryWriteStatus, pb.QueryWriteStatusRequest(submission_id=submission_id), backoff
            )
            if status.complete:
                return self.status(submission_id)
            update(status.committed_size)  # resume from what the server holds durably
            dog = Watchdog(transport.STALL_TIMEOUT_S)
            future = self.stub.WriteSubmission.future(
                self._chunks(submission_id, adapter_dir, files, status.committed_size, dog, update)
            )
            dog.watch(future)
            try:
                response = future.result()
                if response.HasField("submission"):
                    return response.submission
                backoff.progress()
            except grpc.RpcError as e:
                if not (retryable(e) or (e.code() == grpc.StatusCode.CANCELLED and dog.fired)):
                    raise server_error(e) from None
                backoff.wait(e)
            finally:
                dog.stop()

    # -- status and receipts ------------------------------------------------------------------------
    def status(self, submission_id: str) -> pb.Submission:
        return unary(
            self.stub.GetSubmission, pb.GetSubmissionRequest(submission_id=submission_id), self._backoff()
        )

    def budget(self, dataset_id: str = "") -> tuple[pb.GetBudgetResponse, Path | None, str]:
        """What the owner's ledger holds for this data owner's datasets (or one), and the checkpoint of
        its head (kept, or why not)."""
        response = unary(self.stub.GetBudget, pb.GetBudgetRequest(dataset_id=dataset_id), self._backoff())
        kept, problem = self.keep_checkpoint(response.ledger_checkpoint)
        return response, kept, problem

    def receipts(self, dataset_id: str = "") -> list[pb.Receipt]:
        return list(
            unary(
                self.stub.ListReceipts, pb.ListReceiptsRequest(dataset_id=dataset_id), self._backoff()
            ).receipts
        )


def remembered_submissions(keys_dir: Path) -> list[dict]:
    directory = Path(keys_dir) / "submissions"
    out = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            out.append(json.loads(path.read_text()))
        except ValueError:
            continue
    return out
