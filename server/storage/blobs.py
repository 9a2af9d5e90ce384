"""Files by content: ``BLOBS/sha256/ab/abcdef…`` holds the file whose sha256 is ``abcdef…``.

A file appears under its name only complete and durable: it is written (or moved) to a temporary name
in the same directory, its hash checked, the file fsynced, renamed into place and the directory
fsynced. So a crash at any point leaves either no file or the whole file, and what is served under a
name always hashes to that name. Temporary leftovers of a crash are removed when the store opens.

Partial uploads live apart, in ``UploadArea`` (one directory per submission), and reach the store
only once a submission is accepted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO

from offsite.errors import IntegrityError
from offsite.fileio import fsync_directory, sha256_file
from offsite.server.errors import NotFoundError

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TMP = ".tmp-"


def _check_digest(sha256: str) -> str:
    if not isinstance(sha256, str) or not _HEX64.fullmatch(sha256):
        raise NotFoundError(f"{sha256!r} is not a sha256 (64 lowercase hex digits)")
    return sha256


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        for tmp in (self.root / "sha256").glob(f"*/{_TMP}*"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def path(self, sha256: str) -> Path:
        _check_digest(sha256)
        return self.root / "sha256" / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"no stored file with sha256 {sha256[:12]}…") from None

    def open(self, sha256: str) -> BinaryIO:
        try:
            return open(self.path(sha256), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise NotFoundError(f"no stored file with sha256 {sha256[:12]}…") from None

    def _place(self, tmp: Path, sha256: str) -> Path:
        dest = self.path(sha256)
        fsync_file(tmp)
        os.replace(tmp, dest)
        fsync_directory(dest.parent)
        return dest

    def put_file(self, src: str | os.PathLike, sha256: str, move: bool = False) -> Path:
        """Store the file ``src`` under ``sha256`` (checked); ``move`` renames instead of copying.

        Idempotent: a file already stored is kept (and ``src`` removed when moving).
        """
        src, dest = Path(src), self.path(sha256)
        if dest.is_file():
            if move:
                src.unlink()
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{_TMP}{secrets.token_hex(8)}")
        try:
            if move:
                os.replace(src, tmp)
            else:
                shutil.copyfile(src, tmp)
            actual = sha256_file(tmp)
            if actual != sha256:
                raise IntegrityError(f"{src}: sha256 {actual[:12]}… is not the expected {sha256[:12]}…")
            return self._place(tmp, sha256)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def put_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        dest = self.path(sha256)
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f"{_TMP}{secrets.token_hex(8)}")
            try:
                tmp.write_bytes(data)
                self._place(tmp, sha256)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        return sha256


class UploadArea:
    """Partial uploads: ``UPLOADS/<submission id>/<name>``, one file per file the envelope declares."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def directory(self, submission_id: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{32}", submission_id):
            raise NotFoundError(f"malformed submission id {submission_id!r}")
        return self.root / submission_id

    def remove(self, submission_id: str) -> None:
        shutil.rmtree(self.directory(submission_id), ignore_errors=True)

    def present(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())
