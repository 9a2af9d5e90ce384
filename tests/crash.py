"""Kill a real process at a chosen write: fault injection for the crash-safety tests.

``install(root, kill_at, log_path)`` wraps every Python-level way this code base changes files (creating
or opening a file for writing, safetensors' ``save_file``, rename, link, unlink, rmdir, mkdir, rmtree,
fsync, ftruncate) so that each call on a path under ``root`` is one numbered *write point*. At write
point ``kill_at`` the process sends itself SIGKILL *before* the call runs, so killing at point k leaves
the disk as it is after point k-1 and before point k: enumerating k = 1..n covers "before and after
every write". Each point's label is appended to ``log_path`` through a descriptor opened before the
hooks. SIGKILL runs no handler, flushes no Python buffer: what is left is what a killed process leaves
(durability across a power cut, which fsync is for, is not something a kill can show).
"""

from __future__ import annotations

import builtins
import io
import os
import shutil
import signal
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class _Hooks:
    def __init__(self, root: str, kill_at: int | None, log_path: str):
        self.root = os.path.realpath(root)
        self.kill_at = kill_at
        self.count = 0
        self.log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.orig = {}

    def _resolve(self, path, dir_fd=None) -> str | None:
        if isinstance(path, int):
            try:
                return os.readlink(f"/proc/self/fd/{path}")
            except OSError:
                return None
        try:
            path = os.fsdecode(os.fspath(path))
        except TypeError:
            return None
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        return os.path.realpath(path)

    def point(self, op: str, *paths: str | None) -> None:
        inside = [p for p in paths if p and (p == self.root or p.startswith(self.root + os.sep))]
        if not inside:
            return
        self.count += 1
        label = f"{self.count} {op} " + " -> ".join(os.path.relpath(p, self.root) for p in inside)
        self.orig["write"](self.log_fd, (label + "\n").encode())
        if self.count == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        o = self.orig
        for name in (
            "open",
            "replace",
            "rename",
            "link",
            "unlink",
            "remove",
            "rmdir",
            "mkdir",
            "fsync",
            "write",
        ):
            o[name] = getattr(os, name)
        o["ftruncate"] = os.ftruncate
        o["io_open"] = io.open
        o["rmtree"] = shutil.rmtree
        h = self

        def os_open(path, flags, mode=0o777, *, dir_fd=None):
            if flags & _WRITE_FLAGS:
                h.point("open", h._resolve(path, dir_fd))
            return o["open"](path, flags, mode, dir_fd=dir_fd)

        def two(name):
            def wrapped(src, dst, *a, src_dir_fd=None, dst_dir_fd=None, **kw):
                h.point(name, h._resolve(src, src_dir_fd), h._resolve(dst, dst_dir_fd))
                return o[name](src, dst, *a, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, **kw)

            return wrapped

        def one(name):
            def wrapped(path, *a, dir_fd=None, **kw):
                target = h._resolve(path, dir_fd)
                # A mkdir that will fail (exists, or no parent yet) changes nothing: say so in the label.
                noop = (
                    name == "mkdir"
                    and target
                    and (os.path.lexists(target) or not os.path.isdir(os.path.dirname(target)))
                )
                h.point(name + (" (no-op)" if noop else ""), target)
                return o[name](path, *a, dir_fd=dir_fd, **kw)

            return wrapped

        def fd_op(name):
            def wrapped(fd, *a):
                h.point(name, h._resolve(fd))
                return o[name](fd, *a)

            return wrapped

        def py_open(file, mode="r", *a, **kw):
            if not isinstance(file, int) and any(c in mode for c in "wax+"):
                h.point("open", h._resolve(file))
            return o["io_open"](file, mode, *a, **kw)

        def rmtree(path, *a, **kw):
            h.point("rmtree", h._resolve(path))
            return o["rmtree"](path, *a, **kw)

        os.open = os_open
        os.replace, os.rename = two("replace"), two("rename")
        os.link = two("link")
        os.unlink, os.remove, os.rmdir, os.mkdir = one("unlink"), one("remove"), one("rmdir"), one("mkdir")
        os.fsync, os.ftruncate = fd_op("fsync"), fd_op("ftruncate")
        builtins.open = io.open = py_open
        shutil.rmtree = rmtree
        self._wrap_safetensors()

    def _wrap_safetensors(self) -> None:
        st = sys.modules.get("safetensors.torch")
        if st is None:
            return
        original = st.save_file

        def save_file(tensors, filename, *a, **kw):
            self.point("save_file", self._resolve(filename))
            return original(tensors, filename, *a, **kw)

        for module in list(sys.modules.values()):  # every `from safetensors.torch import save_file`
            if getattr(module, "save_file", None) is original:
                module.save_file = save_file


def install(root: str, kill_at: int | None, log_path: str) -> None:
    _Hooks(root, kill_at, log_path).install()


def read_log(log_path: str) -> list[str]:
    try:
        with open(log_path) as f:
            return [line.rstrip("\n") for line in f]
    except FileNotFoundError:
        return []
