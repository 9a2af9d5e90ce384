"""DP defaults: the batch size, epochs and learning rate a data owner gets without tuning.

Tuning DP hyperparameters on the private data costs privacy (Papernot & Steinke, ICLR 2022): every
trial run spends budget, and picking the best of several runs leaks more than one run. So
``offsite client train`` under DP takes the settings the user does not give (--batch-size, --epochs,
--lr) from this rule: a pure function of the dataset's **size bucket** (the power of two at or
above the number of training records; never the exact count, which the published plan must not
reveal), the budget (ε, δ) and the adapter kind. The rule, in words (docs/privacy.md has it with
its table; docs/benchmarks.md the measurements behind its constants):

1. **Batch: large relative to the data, growing like the square root of the bucket**:
   ``B = 4·√bucket`` rounded up to a power of two, at most ``bucket/2`` (so every dataset in the
   bucket holds more records than one batch) and at most 1024. Large batches are the main lever of
   DP training: the noise on the averaged gradient is σ·C/B, and at a fixed budget σ grows far
   more slowly than B (Li et al. 2022, "Large Language Models Can Be Strong Differentially Private
   Learners"; De et al. 2022, "Unlocking High-Accuracy Differentially Private Image Classification
   through Scale"; Mehta et al. 2022, "Large Scale Transfer Learning for Differentially Private
   Image Classification", who go up to the full dataset; Sander et al. 2023, "TAN without a
   burn", on σ/B as the quantity that matters). The square root keeps the sampling rate
   q = B/bucket high for small data (1/4 at 512 records: at ε = 8 and 64 steps, σ/B is 0.010 with
   B = 128 against 0.020 with B = 32) and low for large data (1/16 at 4,096; 1/64 at 65,536, where
   B = 1024, about the batch Li et al. use on datasets of that size).
2. **Epochs: enough for a fixed number of noisy steps**: ``E = ⌈TARGET_STEPS·q⌉``, at least
   ``MIN_EPOCHS``, so a run takes about ``TARGET_STEPS`` steps whatever the size and small data gets
   more passes (16 at 512 records, 4 at 4,096). On the demo task at 480 records and ε = 8, 64 steps
   at B = 128 beat 128 steps at the same batch (docs/benchmarks.md): past a point, more steps buy
   more noise per step than they average away.
3. **Learning rate: fixed per adapter kind** (AdamW on the privatised gradient): ``LR[kind]``.
   Adam's step does not grow with the batch, so the rate is not scaled with B. For whole blocks
   1e-3 (3e-3 was clearly worse under DP at both sizes measured; 3e-4 tied at 480 records); for
   LoRA 3e-3 (the best of 1e-3, 3e-3 and 1e-2 under DP at 480 records).
4. **Warning** when the data is too small for the budget to buy much: the noise on each averaged
   step, σ/B (σ from the accountant for this plan on a dataset with no earlier runs), above
   ``NOISY_STEP`` = 0.1, where the demo task started to lose much of its gain (see the constant).

LoRA is *not* recommended over whole blocks: on the demo task (480 records, ε = 8) a rank-8 LoRA
adapter reached a validation log-loss of 0.85 against 0.03 for whole blocks under the same DP
settings. Fewer trained parameters carry less total noise, but on this task that did not make up
for what LoRA could not learn; measure on your model before asking for a LoRA bundle.

The σ the rule reports is for a plan with q = B/bucket, the sampling rate a plan built from the
size bucket uses (the plan, not this rule, decides what is published).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache

from offsite.models.adapters import BLOCKS, LORA

#: The hyperparameters the rule chooses (TuneOptions field names).
DEFAULTED = ("batch_size", "epochs", "lr")

BATCH_PER_SQRT_BUCKET = 4
MAX_BATCH = 1024
TARGET_STEPS = 64
MIN_EPOCHS = 3
LR = {BLOCKS: 1e-3, LORA: 3e-3}
#: σ/B above this: each averaged step carries noise of more than a tenth of the clipping norm. On the
#: demo task (480 records) DP kept 99% of the non-private gain at σ/B = 0.055 (ε = 1), 73% at 0.19
#: (ε = 0.25) and 37% at 0.45 (ε = 0.1); that task is easy, so harder ones lose gain earlier.
NOISY_STEP = 0.1


@dataclass(frozen=True)
class DPDefaults:
    bucket: int
    epsilon: float | None
    delta: float
    adapter_kind: str
    batch_size: int  # the expected (nominal) batch of Poisson sampling
    epochs: int
    lr: float
    steps: int  # ⌈epochs · bucket / batch⌉: the steps of a plan with q = batch / bucket
    noise_multiplier: float | None  # σ the accountant needs for that plan (no earlier runs); None without ε
    warning: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for the terminal: the bucket, the budget and what was chosen."""
        budget = f"ε={self.epsilon:g}" if self.epsilon is not None else "a given σ"
        return (
            f"DP defaults for a dataset of at most {self.bucket} records at {budget}, δ={self.delta:g} "
            f"({self.adapter_kind} adapter): {describe(self.to_json())}"
        )


def dp_defaults(bucket: int, epsilon: float | None, delta: float, adapter_kind: str) -> DPDefaults:
    """The rule of the module docstring. ``epsilon`` None (σ given directly): no σ, no warning."""
    if bucket < 1 or bucket & (bucket - 1):
        raise ValueError(f"size bucket must be a power of two, got {bucket}")
    if adapter_kind not in (BLOCKS, LORA):
        raise ValueError(f"unknown adapter kind {adapter_kind!r}")
    batch = min(_pow2_at_least(BATCH_PER_SQRT_BUCKET * math.sqrt(bucket)), MAX_BATCH, max(1, bucket // 2))
    q = batch / bucket
    epochs = max(MIN_EPOCHS, math.ceil(TARGET_STEPS * q))
    steps = math.ceil(epochs / q)
    sigma = _sigma(q, steps, float(epsilon), float(delta)) if epsilon is not None else None
    warning = None
    if sigma is not None and sigma / batch > NOISY_STEP:
        warning = (
            f"a dataset of at most {bucket} records buys little at ε={epsilon:g}: each averaged DP step "
            f"carries noise of s.d. {sigma / batch:.3f}·C (σ={sigma:.2f} over an expected batch of {batch}); "
            "expect much less than a non-private run gains. More records or a larger ε help."
        )
    return DPDefaults(
        bucket, epsilon, delta, adapter_kind, batch, epochs, LR[adapter_kind], steps, sigma, warning
    )


def _pow2_at_least(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1.0)) - 1e-9))


@lru_cache(maxsize=256)
def _sigma(q: float, steps: int, epsilon: float, delta: float) -> float | None:
    """σ for (q, steps) within ε at δ, or None when no σ in the accountant's range reaches it."""
    from offsite.errors import BudgetError
    from offsite.privacy.accounting import calibrate_noise

    try:
        return calibrate_noise([], q, steps, epsilon, delta)
    except BudgetError:
        return None


def describe(d: Mapping) -> str:
    """``"batch 256, 4 epochs, lr 0.001"`` for a DPDefaults (or its JSON)."""
    return f"batch {d['batch_size']}, {d['epochs']} epochs, lr {d['lr']:g}"


def defaults_table(
    buckets: tuple[int, ...] = (64, 256, 512, 1024, 4096, 16384, 65536),
    epsilons: tuple[float, ...] = (1.0, 8.0),
) -> str:
    """The rule's output as a markdown table (docs/privacy.md holds it; a test keeps them in step).
    δ is the plan's default for the bucket (a power of ten at most 1/(10·bucket))."""
    from offsite.training.dp import default_delta

    lines = [
        "| records (bucket) | ε | batch | q = batch/bucket | epochs | steps | lr (blocks / LoRA) | σ | σ/batch | warning |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for bucket in buckets:
        delta = default_delta(bucket)
        for eps in epsilons:
            d = dp_defaults(bucket, eps, delta, BLOCKS)
            lora = dp_defaults(bucket, eps, delta, LORA)
            sigma = "n/a" if d.noise_multiplier is None else f"{d.noise_multiplier:.2f}"
            ratio = "n/a" if d.noise_multiplier is None else f"{d.noise_multiplier / d.batch_size:.4f}"
            lines.append(
                f"| ≤ {bucket} | {eps:g} | {d.batch_size} | {d.batch_size / bucket:.4g} | {d.epochs} | {d.steps} | "
                f"{d.lr:g} / {lora.lr:g} | {sigma} | {ratio} | {'yes' if d.warning else 'no'} |"
            )
    return "\n".join(lines) + "\n"
