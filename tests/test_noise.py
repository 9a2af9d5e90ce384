"""The cryptographic noise source: ChaCha20 streams, uniforms in (0, 1), Box–Muller normals that are
N(0, 1), exact Poisson sampling, the background prefetch, reproducible only when seeded."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from offsite.training import noise as noise_mod
from offsite.training.noise import NOISE, SAMPLING, ChaChaStream, PoissonSampler, StepNoise, to_uniform


@pytest.fixture(scope="module")
def draws() -> np.ndarray:
    # A fixed (seeded) stream keeps the statistical tests deterministic; the transform under test
    # is the same for every key.
    return ChaChaStream.insecure_from_seed(2024).normals(NOISE, 1, 1_000_001)


def test_normals_are_standard_normal(draws):
    n = draws.size
    assert draws.dtype == np.float32 and np.isfinite(draws).all()
    x = draws.astype(np.float64)
    assert abs(x.mean()) < 5 / math.sqrt(n)  # five standard errors
    # var of the sample variance of N(0,1) is 2/n: five standard errors again.
    assert abs(x.var() - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(x[:200_000], "norm").pvalue > 1e-3
    # Both halves of each Box–Muller pair are normal and uncorrelated.
    assert stats.kstest(x[1:200_001:2], "norm").pvalue > 1e-3
    assert abs(np.corrcoef(x[0:-1:2], x[1::2])[0, 1]) < 5 / math.sqrt(n / 2)
    # Box–Muller from u1 ≥ 2^-53 cannot exceed sqrt(-2 ln 2^-53).
    assert np.abs(x).max() <= math.sqrt(-2 * math.log(2.0**-53))


def test_uniforms_are_in_the_open_interval_and_uniform():
    u = ChaChaStream.from_os().uniforms(SAMPLING, 1, 1_000_000)
    assert u.dtype == np.float64 and u.min() > 0 and u.max() < 1
    seeded = ChaChaStream.insecure_from_seed(2024).uniforms(SAMPLING, 1, 200_000)  # deterministic KS
    assert stats.kstest(seeded, "uniform").pvalue > 1e-3
    # The extreme words map strictly inside (0, 1), exactly representable: (2j + 1) / 2^53.
    edges = to_uniform(np.array([0, 2**64 - 1, 1 << 12, (1 << 63) - 1], dtype="<u8"))
    assert edges.tolist() == [2.0**-53, 1 - 2.0**-53, 3 * 2.0**-53, 0.5 - 2.0**-53]


@pytest.mark.parametrize("q", [1 / 8, 3 / 64, 1.0])
def test_poisson_sampling_includes_a_record_with_probability_exactly_q(q):
    # Exactly q·2^52 of the 2^52 equally likely uniforms lie below q = B / 2^b: the boundary words.
    j = int(q * 2**52)
    below, at = to_uniform(np.array([(j - 1) << 12, j << 12 if j < 2**52 else 2**64 - 1], dtype="<u8"))
    assert below < q and (at >= q or q == 1.0)
    # Empirically: 4,096 records over 50 steps.
    sampler = PoissonSampler(ChaChaStream.insecure_from_seed(5), 4096, q)
    counts = [len(sampler.indices(step)) for step in range(1, 51)]
    mean, sd = np.mean(counts), math.sqrt(4096 * q * (1 - q) / 50)
    assert abs(mean - 4096 * q) <= 5 * sd + 1e-9
    assert sampler.indices(1) == PoissonSampler(ChaChaStream.insecure_from_seed(5), 4096, q).indices(1)


def test_seeded_streams_reproduce_and_unseeded_do_not():
    a, b = ChaChaStream.insecure_from_seed(7), ChaChaStream.insecure_from_seed(7)
    assert a.seeded and not ChaChaStream.from_os().seeded
    assert np.array_equal(a.normals(NOISE, 3, 1000), b.normals(NOISE, 3, 1000))
    assert not np.array_equal(
        a.normals(NOISE, 3, 1000), ChaChaStream.insecure_from_seed(8).normals(NOISE, 3, 1000)
    )
    assert not np.array_equal(a.normals(NOISE, 3, 1000), a.normals(NOISE, 4, 1000))  # steps differ
    assert not np.array_equal(a.words(NOISE, 3, 100), a.words(SAMPLING, 3, 100))  # purposes differ
    x, y = ChaChaStream.from_os(), ChaChaStream.from_os()
    assert not np.array_equal(x.normals(NOISE, 1, 1000), y.normals(NOISE, 1, 1000))
    assert "key" not in repr(x) and repr(x) == "ChaChaStream(seeded=False)"


def test_a_step_noise_does_not_depend_on_how_much_was_drawn(monkeypatch):
    s = ChaChaStream.insecure_from_seed(1)
    whole = s.normals(NOISE, 9, 100_001)
    assert np.array_equal(s.normals(NOISE, 9, 37), whole[:37])  # a prefix of the same stream
    monkeypatch.setattr(noise_mod, "_CHUNK_PAIRS", 1000)  # chunk boundaries, odd sizes
    for n in (1, 2, 1999, 2000, 2001, 100_001):
        assert np.array_equal(s.normals(NOISE, 9, n), whole[:n]), n


def test_the_stream_is_chacha20_from_cryptography():
    # Independent of our code path: the keystream of (key, nonce) straight from cryptography.
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    key = bytes(range(32))
    stream = ChaChaStream(key, seeded=True)
    nonce = (0).to_bytes(4, "little") + NOISE.to_bytes(4, "little") + (5).to_bytes(8, "little")
    expected = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(80))
    assert stream.words(NOISE, 5, 10).tobytes() == expected


def test_step_noise_prefetches_the_same_values_as_inline(monkeypatch):
    size = 5000
    inline = StepNoise(ChaChaStream.insecure_from_seed(3), size, last_step=4, background=False)
    with StepNoise(ChaChaStream.insecure_from_seed(3), size, last_step=4) as ahead:
        ahead.prefetch(1)
        for step in range(1, 5):
            got = ahead.get(step).copy()
            assert np.array_equal(got, inline.get(step)), step
            assert np.array_equal(got, ChaChaStream.insecure_from_seed(3).normals(NOISE, step, size))
        assert ahead.generate_seconds > 0 and not ahead._pending  # nothing drawn past the last step
    inline.close()
