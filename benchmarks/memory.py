"""Process memory readings shared by the benchmarks (Linux; KiB).

Peak memory is the kernel's high-water mark of resident memory (``VmHWM``), which
``reset_peak`` resets via ``/proc/self/clear_refs``; each configuration runs in its own
process so peaks never mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_kib() -> int:
    v = _status("VmRSS:")
    return v if v is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_kib() -> int:
    v = _status("VmHWM:")
    return v if v is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak() -> bool:
    """Reset the high-water mark to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim() -> None:
    """Return freed memory to the OS so the next measurement starts from a settled baseline."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
