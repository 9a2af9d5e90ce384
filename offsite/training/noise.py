"""Cryptographically secure randomness for DP-SGD: the Gaussian noise and the Poisson sampling.

Both come from ChaCha20 keystreams (``cryptography``, i.e. OpenSSL) under a 256-bit key drawn from
``os.urandom`` for each run and never stored. Every (purpose, step) pair has its own stream: the
ChaCha20 nonce is (purpose, step) and the block counter starts at 0, so the streams never overlap, a
step's noise does not depend on how much was drawn before it, and one step's noise can be generated
while another step computes. A resumed run draws a new key: the remaining steps get fresh noise.

From a stream of 64-bit little-endian words:

* **uniforms** in the open interval (0, 1): the top 52 bits of a word, ``j``, give
  ``u = (2j + 1) / 2**53``: an odd multiple of 2**-53, exactly representable in float64, never 0 or
  1, symmetric about 1/2. (With 53 random bits the lattice (k + 1/2) / 2**53 cannot be represented in
  float64 near 1; one bit is the price of an exact open interval.)
* **Poisson sampling**: record i joins the batch of step t when its uniform is below q, one uniform
  per record per step. For q = B / 2**b (the grid of ``offsite.training.dp``, b ≤ 52) the probability
  is exactly q: q·2**52 of the 2**52 equally likely values lie below q.
* **normals** by Box–Muller in float64 on consecutive pairs (u1, u2):
  ``sqrt(-2 ln u1) · (cos 2πu2, sin 2πu2)``, cast to float32. Since u1 ≥ 2**-53 the magnitude never
  exceeds sqrt(106 ln 2) ≈ 8.57: the tails beyond 8.57σ (probability ~1e-17 per draw) are cut.

``--insecure-noise-seed`` (tests only) derives the key from the seed instead: runs are reproducible,
and not private; receipts say so and the audit fails them.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

GENERATOR = "chacha20-box-muller"
NOISE, SAMPLING = 1, 2  # stream purposes (part of the nonce)

#: Pairs of normals per chunk: 2 × 65536 words = 1 MiB of keystream, so the work stays in cache, and few
#: enough chunks (about 25 for 3.2 M normals) that a background thread rarely waits for the GIL.
_CHUNK_PAIRS = 1 << 16
#: One stream is at most 2**32 ChaCha20 blocks of 64 bytes (its 32-bit block counter).
_MAX_STREAM_WORDS = (1 << 32) * 8


class ChaChaStream:
    """Keystreams of one run, one per (purpose, index), and the uniforms and normals made from them."""

    def __init__(self, key: bytes, seeded: bool):
        if len(key) != 32:
            raise ValueError("a ChaCha20 key has 32 bytes")
        self._key = key
        self.seeded = seeded

    @classmethod
    def from_os(cls) -> ChaChaStream:
        """A fresh key from the operating system's CSPRNG (the only source for private runs)."""
        return cls(os.urandom(32), seeded=False)

    @classmethod
    def insecure_from_seed(cls, seed: int) -> ChaChaStream:
        """A key derived from ``seed``: reproducible, and NOT private (tests only)."""
        return cls(hashlib.sha256(b"offsite insecure noise seed:" + str(int(seed)).encode()).digest(), True)

    def __repr__(self) -> str:  # never show the key
        return f"ChaChaStream(seeded={self.seeded})"

    def _encryptor(self, purpose: int, index: int, words: int):
        if words > _MAX_STREAM_WORDS:
            raise ValueError(f"{words} words exceed one ChaCha20 stream")
        if not 0 <= index < 1 << 64:
            raise ValueError(f"stream index {index} out of range")
        # cryptography's 16-byte ChaCha20 nonce: 32-bit block counter (0), then the 96-bit nonce.
        nonce = struct.pack("<IIQ", 0, purpose, index)
        return Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()

    def words(self, purpose: int, index: int, n: int) -> np.ndarray:
        """The first ``n`` 64-bit words of stream (purpose, index)."""
        out = np.empty(n, dtype="<u8")
        self._encryptor(purpose, index, n).update_into(bytes(out.nbytes), memoryview(out).cast("B"))
        return out

    def uniforms(self, purpose: int, index: int, n: int) -> np.ndarray:
        """``n`` float64 uniforms in (0, 1) from stream (purpose, index)."""
        return to_uniform(self.words(purpose, index, n))

    def fill_normals(self, purpose: int, index: int, out: np.ndarray) -> None:
        """Fill the float32 array ``out`` with N(0, 1) draws from stream (purpose, index)."""
        n = out.size
        pairs = (n + 1) // 2
        enc = self._encryptor(purpose, index, 2 * pairs)
        chunk = min(pairs, _CHUNK_PAIRS)
        words = np.empty(2 * chunk, dtype="<u8")
        zeros = memoryview(bytes(words.nbytes))
        u1, u2, tmp = np.empty(chunk), np.empty(chunk), np.empty(chunk)
        for start in range(0, pairs, chunk):
            m = min(chunk, pairs - start)
            w = words[: 2 * m]
            enc.update_into(zeros[: w.nbytes], memoryview(w).cast("B"))
            a, b, t = u1[:m], u2[:m], tmp[:m]
            to_uniform(w[0::2], out=a)
            to_uniform(w[1::2], out=b)
            np.log(a, out=a)
            a *= -2.0
            np.sqrt(a, out=a)  # a = r
            b *= 2 * math.pi  # b = θ
            lo, hi = 2 * start, min(n, 2 * (start + m))
            np.cos(b, out=t)
            t *= a
            out[lo:hi:2] = t[: (hi - lo + 1) // 2]
            np.sin(b, out=t)
            t *= a
            out[lo + 1 : hi : 2] = t[: (hi - lo) // 2]

    def normals(self, purpose: int, index: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.float32)
        self.fill_normals(purpose, index, out)
        return out


def to_uniform(words: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(2j + 1) / 2**53 with j the top 52 bits of each word: exact in float64, in (0, 1)."""
    if out is None:
        out = np.empty(words.shape, dtype=np.float64)
    # The shifted words are below 2**52, so their int64 view is the same number; numpy converts int64
    # to float64 with SIMD but uint64 an element at a time (ten times slower).
    np.multiply((words >> np.uint64(12)).view(np.int64), 2.0**-52, out=out)
    out += 2.0**-53
    return out


class PoissonSampler:
    """Which records join the batch of each step: record i iff its uniform is below q."""

    def __init__(self, stream: ChaChaStream, n_records: int, sample_rate: float):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        self.stream, self.n, self.q = stream, n_records, sample_rate

    def indices(self, step: int) -> list[int]:
        u = self.stream.uniforms(SAMPLING, step, self.n)
        return np.flatnonzero(u < self.q).tolist()


class StepNoise:
    """Standard normal vectors of a fixed length, one per step, drawn one step ahead.

    ``get(t)`` returns step t's vector and at once starts drawing step t + 1's in a background
    thread, into the other of two buffers, so the ~0.1 s a few million normals take runs while the
    model computes (ChaCha20 in OpenSSL and numpy's ufuncs release the GIL). ``prefetch(t)`` starts
    step t early (the first step). A returned buffer stays valid until the next ``get``. With
    ``background=False`` every step is drawn inline when asked for.

    ``generate_seconds`` (time spent drawing, over ``fills`` vectors) and ``wait_seconds`` (time
    ``get`` blocked) are kept for the benchmark.

    ``allocate(size)`` makes the two float32 buffers (``offsite.device.HostBuffers``: page-locked
    memory when the noise is copied to a CUDA device, so the copy need not block).
    """

    def __init__(
        self,
        stream: ChaChaStream,
        size: int,
        last_step: int,
        background: bool = True,
        allocate: Callable[[int], np.ndarray] | None = None,
    ):
        self.stream, self.size, self.last_step = stream, size, last_step
        allocate = allocate or (lambda n: np.empty(n, dtype=np.float32))
        self._buffers = (allocate(size), allocate(size))
        self._pending: dict[int, Future] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="offsite-noise") if background else None
        self.generate_seconds = 0.0
        self.wait_seconds = 0.0
        self.fills = 0

    def _fill(self, step: int) -> None:
        t0 = time.perf_counter()
        self.stream.fill_normals(NOISE, step, self._buffers[step % 2])
        self.generate_seconds += time.perf_counter() - t0
        self.fills += 1

    def prefetch(self, step: int) -> None:
        if self._executor is not None and step <= self.last_step and step not in self._pending:
            self._pending[step] = self._executor.submit(self._fill, step)

    def get(self, step: int) -> np.ndarray:
        for stale in [s for s in self._pending if s < step]:
            self._pending.pop(stale).result()  # never leave a writer on a buffer about to be reused
        pending = self._pending.pop(step, None)
        t0 = time.perf_counter()
        if pending is None:
            self._fill(step)
        else:
            pending.result()
        self.wait_seconds += time.perf_counter() - t0
        self.prefetch(step + 1)
        return self._buffers[step % 2]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> StepNoise:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
