"""Read once: untrusted files are copied into a private directory while they are hashed, and
only the copy is ever loaded.

Hashing a file and then opening it again by name would load whatever is there at the second
open: a file swapped in between would be loaded unchecked. Here the bytes that are hashed are
the bytes that are written to the private copy (``PrivateStaging``: 0700, under the temporary
directory, removed when closed, or by a later process if this one died), so what is loaded is what was checked.

Only regular files with a single link are accepted; a symlink, FIFO, device, socket or hard
link anywhere in the tree is refused with a clear error. Directories are walked through
descriptors opened with ``O_NOFOLLOW``, so a directory swapped for a symlink mid-walk is refused
too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import stat
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

from offsite.errors import FormatError, OffsiteError
from offsite.fileio import kind_of, open_regular

_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: A bundle or adapter holds a few dozen files; a tree far beyond that is refused, not walked.
MAX_FILES = 10_000
MAX_DEPTH = 16


_STAGING_PREFIX = "offsite-staging-"
#: A staging directory younger than this is never swept, whoever holds it: it may be between its
#: creation and its lock.
_STAGING_GRACE_SECONDS = 60.0
_last_sweep: float | None = None


class PrivateStaging:
    """A private (0700) directory for copies of untrusted files, under ``root`` (default: the
    temporary directory, ``$TMPDIR``).

    Locked for as long as it is open; ``close`` (or the end of the process) removes it. One a dead
    process left behind is removed by the next ``PrivateStaging`` that finds it.
    """

    def __init__(self, purpose: str, root: str | os.PathLike | None = None):
        global _last_sweep
        if (
            _last_sweep is None or time.monotonic() - _last_sweep > _STAGING_GRACE_SECONDS
        ):  # once a minute is plenty
            _last_sweep = time.monotonic()
            sweep_stale_staging(root)
        self.path = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{purpose}-", dir=root))
        self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._finalizer = weakref.finalize(self, _close_staging, self.path, self._fd)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> PrivateStaging:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_staging(path: Path, fd: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.close(fd)


def sweep_stale_staging(root: Path | None = None) -> int:
    """Remove this user's staging directories whose process is gone; return how many."""
    root = Path(root or tempfile.gettempdir())
    removed = 0
    try:
        entries = list(os.scandir(root))
    except OSError:
        return 0
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(_STAGING_PREFIX):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if (
            not stat.S_ISDIR(st.st_mode)
            or st.st_uid != os.geteuid()
            or now - st.st_mtime < _STAGING_GRACE_SECONDS
        ):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
        finally:
            os.close(fd)
    return removed


def open_dir(path: str | os.PathLike, what: str, dir_fd: int | None = None, follow: bool = False) -> int:
    """A descriptor for directory ``path`` (not a symlink to one, unless ``follow``)."""
    flags = _DIR_FLAGS & ~os.O_NOFOLLOW if follow else _DIR_FLAGS
    try:
        return os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise FormatError(f"{what} does not exist") from None
    except NotADirectoryError:
        raise FormatError(f"{what} is not a directory") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FormatError(
                f"{what} is a symlink; only regular files and directories are accepted"
            ) from None
        raise FormatError(f"{what} cannot be opened as a directory ({e.strerror})") from None


def walk_files(dir_fd: int, what: str, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, int, str]]:
    """Yield ``(relative path, parent directory fd, name)`` for every file under ``dir_fd``, sorted.

    Anything that is neither a directory nor a regular file is refused as soon as it is seen.
    The parent fd is valid only until the next item.
    """
    if depth > MAX_DEPTH:
        raise FormatError(f"{what}: directories nested more than {MAX_DEPTH} deep")
    try:
        names = sorted(os.listdir(dir_fd))
    except OSError as e:
        raise FormatError(f"{what}: {prefix or '.'} cannot be listed ({e.strerror})") from None
    for name in names:
        rel = f"{prefix}{name}"
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as e:
            raise FormatError(f"{what}: {rel} cannot be read ({e.strerror})") from None
        if stat.S_ISDIR(st.st_mode):
            sub = open_dir(name, f"{what}: {rel}", dir_fd)
            try:
                yield from walk_files(sub, what, f"{rel}/", depth + 1)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            yield rel, dir_fd, name
        else:
            raise FormatError(f"{what}: {rel} is {kind_of(st.st_mode)}; only regular files are accepted")


def copy_hashing(src_fd: int, name: str, dest: Path, what: str, max_bytes: int | None = None) -> str:
    """Copy regular file ``name`` (in directory ``src_fd``) to ``dest`` (new, 0600); return the
    sha256 of exactly the bytes written."""
    fd, st = open_regular(name, what, src_fd)
    h = hashlib.sha256()
    try:
        if max_bytes is not None and st.st_size > max_bytes:
            raise FormatError(f"{what}: {st.st_size} bytes, more than the {max_bytes}-byte limit")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise OffsiteError(
                f"{what}: cannot copy it into the staging directory {dest.parent} ({e.strerror})"
            ) from None
        written = 0
        try:
            while chunk := _read(fd, what):
                written += len(chunk)
                if max_bytes is not None and written > max_bytes:
                    raise FormatError(f"{what}: more than the {max_bytes}-byte limit")
                h.update(chunk)
                view = memoryview(chunk)
                while view:
                    try:
                        view = view[os.write(out, view) :]
                    except OSError as e:  # a full disk, say: the user's to fix, not a traceback
                        raise OffsiteError(
                            f"{what}: cannot copy it into the staging directory {dest.parent} ({e.strerror})"
                        ) from None
        finally:
            os.close(out)
    finally:
        os.close(fd)
    return h.hexdigest()


def _read(fd: int, what: str) -> bytes:
    try:
        return os.read(fd, _CHUNK)
    except OSError as e:
        raise FormatError(f"{what} cannot be read ({e.strerror})") from None
