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


class DeviceMemory:
    """Training-time memory growth on a device: host RSS (``VmHWM`` minus the RSS at ``start``) on
    the CPU, the caching allocator's peak minus what was allocated at ``start`` on CUDA/MPS."""

    def __init__(self, device: str):
        self.device = device
        self.hwm_reset = False
        self._before = 0

    def start(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated()
        elif self.device == "mps":
            self._before = torch.mps.current_allocated_memory()
        else:
            trim()
            self._before = rss_kib() * 1024
            self.hwm_reset = reset_peak()

    def growth_mib(self) -> float:
        import torch

        if self.device.startswith("cuda"):
            return (torch.cuda.max_memory_allocated() - self._before) / 2**20
        if self.device == "mps":  # MPS keeps no peak: the allocation after the steps
            return (torch.mps.driver_allocated_memory() - self._before) / 2**20
        peak = peak_kib() if self.hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak * 1024 - self._before) / 2**20
