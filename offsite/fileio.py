"""Hashing, canonical JSON and all-or-nothing writes of files and directories."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# safetensors header dtype codes -> torch dtype names
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, fixed separators, trailing newline)."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def read_json(path: str | os.PathLike, what: str) -> dict:
    """Parse a JSON object from ``path``; malformed or non-object content is a FormatError."""
    from offsite.errors import FormatError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FormatError(f"{what}: {path} does not exist") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{what}: {path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise FormatError(f"{what}: {path} must hold a JSON object")
    return data


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename or a new file in ``directory`` durable (the entry lives in the directory)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    The data is fsynced before the rename and the directory after it, so once this returns the new
    content survives a power loss, not only a killed process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_new_output(out: str | os.PathLike) -> Path:
    """Refuse an existing, non-empty output directory up front, before any expensive work."""
    from offsite.errors import OffsiteError

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OffsiteError(f"{out} already exists; choose another --out or remove it")
    return out


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch directory beside ``out`` that becomes ``out`` only if the block succeeds.

    A failure (bad input, Ctrl-C) leaves nothing half-written at ``out``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        check_new_output(out)
        out.rmdir()  # empty: replaced by the staged directory below
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600) for the block.

    Without ``wait``, raise ``BlockingIOError`` at once if another process holds it. If the lock file
    was removed or replaced while this process waited (its directory was cleaned up or moved aside),
    the lock would guard nothing: take it again on the file now at ``path``.
    """
    import fcntl

    path = Path(path)
    while True:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)
