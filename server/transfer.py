"""Moving bytes: bundle files out as chunks from disk, submission files in as checked, durable chunks.

Downloads read a stored file ``CHUNK_BYTES`` at a time from the requested offset: a file is never held
in memory whole, and only complete files (``blobs``) are ever served.

Uploads follow Google's ByteStream: a submission's declared files form one byte sequence; each chunk
must start exactly at the next expected offset and match its sha256; a whole file must match its
declared sha256 when its last byte arrives. Received bytes are made durable (fsync of the file, and
of its directory when the file is new, then the committed offset recorded) every
``COMMIT_INTERVAL_S`` or ``COMMIT_BYTES`` and at the end of every stream, so the committed offset
reported to the client is only ever bytes that survive a crash, and it never goes backwards. A stream
that breaks resumes at the committed offset: bytes past it are cut off and re-sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from offsite.fileio import fsync_directory
from offsite.server.errors import ChunkIntegrityError, FileIntegrityError, LimitError, OffsetError
from offsite.server.storage.base import DeclaredFile, Storage, SubmissionRecord
from offsite.server.storage.blobs import UploadArea
from offsite.wire import transport


@dataclass(frozen=True)
class Chunk:
    offset: int
    data: bytes
    sha256: str
    file_size: int


class ChunkHashes:
    """The sha256 of each ``chunk_bytes``-aligned chunk of stored files, remembered once computed.

    Stored files never change (each is named by its content's hash), and every data owner on a job
    downloads the same bundle: a chunk is hashed once per server run instead of once per download
    (hashing is the largest share of the server's work in serving a file). A chunk whose bytes changed
    on disk since (bit rot, tampering) then goes out with the hash of the bytes it had, and the client
    refuses it, where a hash computed at send time would vouch for the changed bytes. At most
    ``max_chunks`` hashes are kept (64 bytes each, plus the dict's): the least recently served files
    are forgotten first.
    """

    def __init__(self, max_chunks: int = 1 << 18):
        self._files: OrderedDict[tuple[str, int], dict[int, str]] = OrderedDict()
        self._count = 0
        self._max = max_chunks
        self._lock = threading.Lock()

    def of(self, sha256: str, chunk_bytes: int) -> dict[int, str]:
        """The (shared, growing) table index -> sha256 of one stored file's chunks."""
        key = (sha256, chunk_bytes)
        with self._lock:
            self._count = sum(len(t) for t in self._files.values())
            while self._count > self._max and self._files:
                _, dropped = self._files.popitem(last=False)
                self._count -= len(dropped)
            table = self._files.setdefault(key, {})
            self._files.move_to_end(key)
            return table


def read_chunks(
    f: BinaryIO,
    offset: int,
    chunk_bytes: int = transport.CHUNK_BYTES,
    known: dict[int, str] | None = None,
) -> Iterator[Chunk]:
    """Chunks of the open file ``f`` from ``offset`` to its end (one empty chunk if there is nothing left).

    Chunks are aligned to multiples of ``chunk_bytes`` (a resumed download's first chunk runs to the next
    boundary). ``known`` (from ``ChunkHashes``, for stored files only) holds the aligned chunks' hashes
    already computed, and gets the new ones."""
    size = os.fstat(f.fileno()).st_size
    if offset > size:
        raise OffsetError(f"offset {offset} is past the end of the file ({size} bytes)")
    f.seek(offset)
    if offset == size:
        yield Chunk(offset, b"", hashlib.sha256(b"").hexdigest(), size)
        return
    while offset < size:
        aligned = offset % chunk_bytes == 0
        data = f.read(min(chunk_bytes - offset % chunk_bytes, size - offset))
        if not data:  # the file shrank under us: stored files never do, so this is a broken disk
            raise OffsetError(f"file ended at {offset} of {size} bytes")
        digest = known.get(offset // chunk_bytes) if known is not None and aligned else None
        if digest is None:
            digest = hashlib.sha256(data).hexdigest()
            if known is not None and aligned:
                known[offset // chunk_bytes] = digest
        yield Chunk(offset, data, digest, size)
        offset += len(data)


class UploadWriter:
    """Writes one stream of a submission's bytes into its partial files, starting at the committed size."""

    def __init__(self, record: SubmissionRecord, area: UploadArea, storage: Storage):
        self.record = record
        self.storage = storage
        self.directory = area.directory(record.submission_id)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.files: tuple[DeclaredFile, ...] = record.files
        self.starts = [sum(f.size for f in self.files[:i]) for i in range(len(self.files))]
        self.total = record.total
        self.committed = record.committed
        self.position = record.committed
        self._index = 0
        self._handle: BinaryIO | None = None
        self._hasher = hashlib.sha256()
        self._dirty: set[int] = set()
        self._new_files = False
        self._last_commit = time.monotonic()
        self._since_commit = 0
        self._restore()

    def path(self, index: int) -> Path:
        return self.directory / self.files[index].name

    def _file_at(self, position: int) -> int:
        """The file that byte ``position`` belongs to (declared files are never empty)."""
        for i, f in enumerate(self.files):
            if position < self.starts[i] + f.size:
                return i
        return len(self.files) - 1

    def _restore(self) -> None:
        """Cut every partial file back to the committed size; re-hash the committed part of the current file."""
        for i, f in enumerate(self.files):
            path = self.path(i)
            keep = min(max(self.committed - self.starts[i], 0), f.size)
            if path.exists():
                if path.stat().st_size != keep:
                    with open(path, "r+b") as fh:
                        fh.truncate(keep)
                        fh.flush()
                        os.fsync(fh.fileno())
            elif keep:
                raise OffsetError(f"partial upload {path} is missing although {keep} bytes were committed")
        self._index = self._file_at(self.position)
        self._hasher = hashlib.sha256()
        path = self.path(self._index)
        if path.exists():
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    self._hasher.update(block)

    def _open(self) -> BinaryIO:
        if self._handle is None:
            path = self.path(self._index)
            if not path.exists():
                self._new_files = True
            self._handle = open(path, "ab")  # noqa: SIM115 - closed in _close / close
        return self._handle

    def _close_current(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None
            self._dirty.discard(self._index)

    def write(self, offset: int, data: bytes, sha256: str) -> None:
        if offset != self.position:
            raise OffsetError(
                f"chunk at offset {offset}, but the next byte expected is {self.position} "
                f"({'overlapping' if offset < self.position else 'out of order: a gap'}); ask QueryWriteStatus "
                "for the committed size and resume there"
            )
        if len(data) > transport.MAX_CHUNK_BYTES:
            raise LimitError(f"chunk of {len(data)} bytes; at most {transport.MAX_CHUNK_BYTES} per chunk")
        if self.position + len(data) > self.total:
            raise LimitError(
                f"chunk ends at byte {self.position + len(data)}, past the {self.total} bytes the submission declared"
            )
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ChunkIntegrityError(f"chunk at offset {offset} does not match its sha256")
        view = memoryview(data)
        while view:
            f = self.files[self._index]
            room = self.starts[self._index] + f.size - self.position
            piece, view = view[:room], view[room:]
            if piece:
                self._open().write(piece)
                self._hasher.update(piece)
                self._dirty.add(self._index)
                self.position += len(piece)
            if self.position == self.starts[self._index] + f.size:
                self._finish_file()
            elif not piece:
                break
        self._since_commit += len(data)

    def _finish_file(self) -> None:
        """The current file has all its bytes: check its whole hash, make it durable, move on."""
        f = self.files[self._index]
        self._open()  # a zero-length file exists too
        self._close_current()
        if self._hasher.hexdigest() != f.sha256:
            raise FileIntegrityError(f"{f.name} does not match the sha256 declared in the signed envelope")
        if self._index + 1 < len(self.files):
            self._index += 1
            self._hasher = hashlib.sha256()

    def maybe_commit(self) -> None:
        if (
            self._since_commit >= transport.COMMIT_BYTES
            or time.monotonic() - self._last_commit >= transport.COMMIT_INTERVAL_S
        ):
            self.commit()

    def commit(self) -> int:
        """fsync what was written, then record it as committed (never the other way round)."""
        if self.position > self.committed:
            if self._handle is not None:
                self._handle.flush()
                os.fsync(self._handle.fileno())
            if self._new_files:
                fsync_directory(self.directory)
                self._new_files = False
            self.committed = self.storage.set_committed(self.record.submission_id, self.position)
        self._last_commit = time.monotonic()
        self._since_commit = 0
        return self.committed

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self._handle is not None:
                self._handle.close()
        self._handle = None
