"""Hashing, canonical JSON, bounded reads, and all-or-nothing writes of files and directories.

Outputs are claimed before any work starts (``claim_output``): a lock file beside the output,
held by the process for the whole run, makes a second run on the same ``--out`` fail at once
instead of overwriting the first one's result. The output is built in a hidden staging
directory beside it and appears under its real name in one rename, which never replaces
anything but an empty directory. A run that crashed leaves its lock file and staging directory
behind unlocked (the kernel drops a dead process's locks); the next claim in the same directory
removes them, and never one whose lock is still held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20

# Hidden names beside an output OUT: `.OUT.offsite-lock` (the claim) and `.OUT.offsite-partial`.
_LOCK_SUFFIX = ".offsite-lock"
_PARTIAL_SUFFIX = ".offsite-partial"
_TRASH_INFIX = ".offsite-trash-"


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


# -- reading untrusted files: regular files only, read once, bounded ----------------------------------
#: Opening flags for untrusted files: never follow a symlink, never block on a FIFO or device.
OPEN_UNTRUSTED = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def kind_of(mode: int) -> str:
    """'a symlink', 'a FIFO', ...: what a non-regular file is, for error messages."""
    for test, name in (
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(name: str | os.PathLike, what: str, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """Open ``name`` for reading if it is a regular file with one link; return the fd and its stat.

    Refused with a FormatError: a missing file, a symlink (``O_NOFOLLOW``), a FIFO, device or
    socket (checked on the open descriptor, so a file swapped after a check is caught too), and
    a file with more than one hard link (its content could change through another name).
    """
    from offsite.errors import FormatError

    try:
        fd = os.open(name, OPEN_UNTRUSTED, dir_fd=dir_fd)
    except FileNotFoundError:
        raise FormatError(f"{what} is missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FormatError(f"{what} is a symlink; only regular files are accepted") from None
        raise FormatError(f"{what} cannot be opened ({e.strerror})") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = f"{what} is {kind_of(st.st_mode)}; only regular files are accepted"
    elif st.st_nlink != 1:
        problem = (
            f"{what} has {st.st_nlink} hard links; only files with a single name are accepted "
            "(copy it without hard links)"
        )
    if problem:
        os.close(fd)
        raise FormatError(problem)
    # Reads must block normally from here on.
    os.set_blocking(fd, True)
    return fd, st


def read_bounded(name: str | os.PathLike, what: str, max_bytes: int, dir_fd: int | None = None) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, read once (refused before reading if larger)."""
    from offsite.errors import FormatError

    fd, st = open_regular(name, what, dir_fd)
    try:
        if st.st_size > max_bytes:
            raise FormatError(f"{what}: {st.st_size} bytes, more than the {max_bytes}-byte limit")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # it grew after fstat
        raise FormatError(f"{what}: more than the {max_bytes}-byte limit")
    return data


# -- writing ---------------------------------------------------------------------------------------
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


def write_new_file(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Create the file ``path`` with ``data``, complete or not at all; never replace anything there.

    The bytes go to a fsynced temporary file first, which is then hard-linked to ``path`` (an atomic
    create that fails if the name exists, even when two writers race) and removed.
    """
    from offsite.errors import OffsiteError

    path = Path(path)
    if path.exists() or path.is_symlink():
        raise OffsiteError(f"{path} exists already: choose another name (nothing was overwritten)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise OffsiteError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, mode & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise OffsiteError(
                f"{path} exists already: choose another name (nothing was overwritten)"
            ) from None
        fsync_directory(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


# -- locks that die with their process ---------------------------------------------------------------
def _try_lock(path: Path, create: bool) -> int | None:
    """An exclusive ``flock`` on ``path`` (a file, created if ``create``), or None if another process holds it.

    After locking, the path must still name the locked inode: a holder that finished unlinks its
    lock file, and a lock taken on the unlinked inode would guard nothing.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        now = os.stat(path, follow_symlinks=False)
        held = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            raise FileNotFoundError(path)
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_tree(path: Path) -> None:
    """Remove a directory tree we own: renamed aside first, so a crash mid-way leaves no half tree
    under a name anything still uses."""
    if not path.exists() and not path.is_symlink():
        return
    hidden = path.name if path.name.startswith(".") else f".{path.name}"  # swept if a crash leaves it
    trash = path.with_name(f"{hidden}{_TRASH_INFIX}{secrets.token_hex(4)}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def sweep_stale_outputs(parent: Path) -> list[str]:
    """Remove staging left in ``parent`` by runs that died; return the outputs they were for.

    A claim's lock file is locked by its run until the run ends; a lock file that can be locked
    belongs to a dead run, so its staging directory is garbage. Leftover trash is removed too.
    """
    cleaned = []
    try:
        names = os.listdir(parent)
    except OSError:
        return cleaned
    for name in names:
        if name.startswith(".") and _TRASH_INFIX in name:
            shutil.rmtree(parent / name, ignore_errors=True)
            continue
        if not (name.startswith(".") and name.endswith(_LOCK_SUFFIX)):
            continue
        out_name = name[1 : -len(_LOCK_SUFFIX)]
        try:
            fd = _try_lock(parent / name, create=False)
        except OSError:  # not a lock file of ours (a symlink, say): not ours to judge
            continue
        if fd is None:
            continue  # a live run
        try:
            _remove_tree(parent / f".{out_name}{_PARTIAL_SUFFIX}")
            os.unlink(parent / name)
            cleaned.append(out_name)
        except OSError:
            pass  # left for a later sweep; it must not stop this claim
        finally:
            os.close(fd)
    return cleaned


# -- outputs ---------------------------------------------------------------------------------------
def _refuse_existing(out: Path) -> None:
    from offsite.errors import OffsiteError

    try:
        st = os.stat(out, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise OffsiteError(f"{out} is a symlink; give the output's real path")
    if not stat.S_ISDIR(st.st_mode) or any(os.scandir(out)):
        raise OffsiteError(f"{out} already exists; choose another --out or remove it")


def check_new_output(out: str | os.PathLike) -> Path:
    """Refuse an existing, non-empty output directory up front, before any expensive work."""
    out = Path(out)
    _refuse_existing(out)
    return out


class OutputClaim:
    """The right to create ``path``: held from ``claim_output`` until ``commit`` or ``release``.

    Write into ``stage``; ``commit`` moves it to ``path`` in one rename. The rename replaces at
    most an empty directory (one the user made for the output), never a file or a non-empty one.
    """

    def __init__(self, path: Path, lock_fd: int, overwrite: bool):
        self.path = path
        self.stage = path.with_name(f".{path.name}{_PARTIAL_SUFFIX}")
        self._lock = path.with_name(f".{path.name}{_LOCK_SUFFIX}")
        self._fd: int | None = lock_fd
        self._overwrite = overwrite

    def commit(self) -> Path:
        from offsite.errors import OffsiteError

        if self._fd is None:
            raise RuntimeError(f"the claim on {self.path} was already given up")
        if not any(os.scandir(self.stage)):
            raise RuntimeError("refusing to commit an empty output")  # it could be mistaken for a free one
        os.chmod(self.stage, 0o777 & ~_umask())
        for root, _, files in os.walk(self.stage):  # durable before it appears under its name
            for f in files:
                fd = os.open(os.path.join(root, f), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_directory(root)
        if self._overwrite and self.path.exists():
            _remove_tree(self.path)
        try:
            os.rename(self.stage, self.path)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                self.release()
                raise OffsiteError(
                    f"{self.path} was created by something else while this run was writing it; "
                    "it was left alone and this run's output was discarded"
                ) from None
            raise
        fsync_directory(self.path.parent)
        self._unlock()
        return self.path

    @contextlib.contextmanager
    def staged(self) -> Iterator[Path]:
        """Yield ``stage`` and commit when the block succeeds (a failure is left to the claim's owner)."""
        yield self.stage
        self.commit()

    def release(self) -> None:
        """Give up the claim and remove the staging directory (after a failure or Ctrl-C)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            _remove_tree(self.stage)
        self._unlock()

    def _unlock(self) -> None:
        # Unlinked while still locked, so nobody can lock the old inode and believe it a claim.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._lock)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._fd is not None:
            self.commit()
        else:
            self.release()


def claim_output(out: str | os.PathLike, overwrite: bool = False) -> OutputClaim:
    """Claim ``out`` before any work: refuse it if it exists (an empty directory is fine), if another
    run holds it, or if its directory cannot be written; clean up what dead runs left there."""
    from offsite.errors import OffsiteError

    try:
        return _claim(Path(out), overwrite)
    except OSError as e:  # an unwritable or missing parent, a name too long for its hidden siblings
        raise OffsiteError(f"cannot write {out}: {e.strerror or e}") from None


def _claim(out: Path, overwrite: bool) -> OutputClaim:
    from offsite.errors import OffsiteError

    if not out.name or out.name in (".", ".."):
        raise OffsiteError(f"{out} is not a usable output path")
    if not overwrite:
        _refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_name(f".{out.name}{_LOCK_SUFFIX}")
    for _ in range(3):  # a finishing run may unlink its lock file under us: try again
        fd = _try_lock(lock, create=True)
        if fd is not None:
            break
        if lock.exists():
            raise OffsiteError(
                f"another offsite run is writing {out} right now; wait for it or choose another --out"
            )
    else:
        raise OffsiteError(f"could not claim {out}; try again")
    try:
        if not overwrite:
            _refuse_existing(out)  # it may have been finished by the run that held the claim before us
        claim = OutputClaim(out, fd, overwrite)
        _remove_tree(claim.stage)  # left by a run that died: we hold its claim now
        sweep_stale_outputs(out.parent)
        os.mkdir(claim.stage, 0o700)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)
        raise
    return claim


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Claim ``out``, yield a staging directory beside it, and make it ``out`` if the block succeeds.

    A failure (bad input, Ctrl-C) leaves nothing at ``out``; a concurrent run on the same ``out``
    fails on entry. Long runs should enter this (or ``claim_output``) before the work, not after.
    """
    with claim_output(out, overwrite) as claim:
        yield claim.stage


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


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` sets it, which races with threads)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022
