"""The canary audit run: does the DP-SGD of this code, at given settings, leak more than its ε allows?

One training run in the game of ``offsite.privacy.canaries`` (Steinke, Nasr and Jagielski 2023):

1. **The audit set**, never the private data: m random *canary* records, each included independently
   with probability ½, plus *filler* records that are always included: the auditor's own public data
   (``data``) or random records made here. A canary is a string of words drawn uniformly from the bundle's
   tokenizer (for a classifier, with a uniformly random label): nothing but memorising it makes its loss
   fall more than that of the canaries left out, so its loss is a clean membership signal.
2. **Training through the same code path as a data owner's run**: ``offsite.training.dp.train_dp`` on the
   bundle's emulator and initial adapter (Poisson sampling and noise from ChaCha20 keyed from `os.urandom`,
   per-sample clipping, division by the nominal batch, AdamW), with the plan (σ, q, steps, C, δ, nominal
   batch, size bucket) of a receipt or of explicit settings. The size of the audit set must lie in the
   plan's size bucket, as in a real run, so that q·N (the expected batch) means what it meant there.
   Without DP (``AuditSettings.dp`` False) the same run has σ = 0 and nothing else changed: the teeth
   check.
3. **Scores**: each canary's loss under the untuned adapter minus its loss under the tuned one (how much
   training lowered it; higher = more likely included), then the one-run ε lower bound at 95%, AUROC and
   TPR at FPR 1% (``offsite.privacy.canaries``), and the accountant's ε for the same settings (PRV upper
   bound). The audit fails when the lower bound exceeds it.

Nothing here reads budgets, keys or private data, and no output is written (the bundle is read through
its usual private copy, removed afterwards).
"""

from __future__ import annotations

import math
import os
import secrets
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from offsite import device
from offsite.data import CLS, Example, Record, collate, make_examples, max_positions, read_records
from offsite.device import to_cpu
from offsite.errors import DataError, FormatError, OffsiteError
from offsite.formats.bundle import Bundle
from offsite.models.registry import Task
from offsite.privacy import accounting
from offsite.privacy import canaries as stats
from offsite.privacy.receipt_audit import read_bounded
from offsite.privacy.receipt_schema import MAX_RECEIPT_BYTES, parse_receipt
from offsite.training.dp import DPPlan, size_bucket, train_dp
from offsite.training.losses import per_sample_loss
from offsite.tune import data_kind

#: A canary needs this many distinct plain words to choose from, or canaries would repeat.
MIN_WORDS = 8
#: The audit set's expected size must sit this many standard deviations (of the number of included
#: canaries, √m / 2) inside its size bucket, so that a draw outside it practically never happens.
SIZE_MARGIN_SD = 6.0
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class AuditSettings:
    """The DP settings of the run being audited, and where they came from."""

    noise_multiplier: float  # σ; 0 when dp is False
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    nominal_batch: int | None  # None (explicit settings): q × the audit set's own size bucket
    size_bucket: int | None
    dp: bool = True
    source: str = "flags"
    stated_epsilon: float | None = None  # the receipt's ε for this run (PRV upper), if from a receipt

    def in_bucket(self, bucket: int) -> AuditSettings:
        """These settings in size bucket ``bucket``: the nominal batch is q · bucket, which must be a whole
        number, as in a real run (q = nominal batch / size bucket, see ``offsite.training.dp.make_plan``)."""
        if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1 or bucket & (bucket - 1):
            raise OffsiteError(f"--size-bucket must be a power of two, got {bucket!r}")
        nominal = self.sample_rate * bucket
        if nominal < 1 or nominal != math.floor(nominal):
            raise OffsiteError(
                f"--sample-rate {self.sample_rate:g} × size bucket {bucket} = {nominal:g} is not a whole number "
                "≥ 1, but a real run has q = nominal batch / size bucket: give such a q (or --size-bucket)"
            )
        fields = asdict(self)
        fields.update(nominal_batch=int(nominal), size_bucket=bucket)
        return AuditSettings(**fields)

    def plan(self) -> DPPlan:
        if self.size_bucket is None or self.nominal_batch is None:
            raise ValueError("settings without a size bucket: call in_bucket first")
        return DPPlan(
            self.noise_multiplier,
            self.sample_rate,
            self.steps,
            self.delta,
            self.max_grad_norm,
            self.nominal_batch,
            self.size_bucket,
        )

    def without_dp(self) -> AuditSettings:
        """The same run with σ = 0: clipping, sampling and normalisation unchanged, no noise."""
        fields = asdict(self)
        fields.update(noise_multiplier=0.0, dp=False)
        return AuditSettings(**fields)

    def accountant_epsilon(self) -> float | None:
        """ε of one run at these settings (PRV upper bound); None without DP (ε is unbounded)."""
        if not self.dp:
            return None
        return accounting.epsilon_prv(
            [accounting.make_entry(self.noise_multiplier, self.sample_rate, self.steps)], self.delta
        )


def _positive(value, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise OffsiteError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def settings_from_flags(
    *,
    noise_multiplier: float | None,
    sample_rate: float,
    steps: int,
    max_grad_norm: float,
    delta: float,
    bucket: int | None = None,
) -> AuditSettings:
    """Explicit settings. σ None: no DP (σ = 0). ``bucket`` None: the audit set's own size bucket, fixed
    when the audit set's filler is known (``run_canary_audit``)."""
    q = _positive(sample_rate, "--sample-rate")
    if q > 1:
        raise OffsiteError(f"--sample-rate must be at most 1, got {q:g}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise OffsiteError(f"--steps must be a whole number ≥ 1, got {steps!r}")
    clip = _positive(max_grad_norm, "--max-grad-norm")
    d = _positive(delta, "--delta")
    if d >= 1:
        raise OffsiteError(f"--delta must be below 1, got {d:g}")
    dp = noise_multiplier is not None
    sigma = _positive(noise_multiplier, "--noise-multiplier") if dp else 0.0
    settings = AuditSettings(sigma, q, steps, clip, d, None, None, dp=dp)
    return settings if bucket is None else settings.in_bucket(bucket)


def settings_from_receipt(path: str | os.PathLike) -> AuditSettings:
    """σ, q, steps, C, δ, nominal batch and size bucket of the run a version-2 receipt describes.

    Only the settings are used (the audit replays them on other data); ``offsite audit receipt`` is what
    checks a receipt's signature and claims. Phases with the same σ and q are one phase (their steps add
    up); a run of several different phases is refused.
    """
    path = Path(path)
    try:
        data = read_bounded(path, MAX_RECEIPT_BYTES, "receipt")
    except FileNotFoundError:
        raise FormatError(f"receipt {path} does not exist") from None
    version, doc = parse_receipt(data, str(path))
    if version < 2:
        raise FormatError(
            f"{path}: receipt format version {version} publishes no size bucket or nominal batch; give the "
            "settings explicitly (--noise-multiplier, --sample-rate, --steps, --max-grad-norm, --delta)"
        )
    phases: dict[tuple[float, float], int] = {}
    for entry in doc["run_history"]:
        if entry["steps"] > 0:
            key = (entry["noise_multiplier"], entry["sample_rate"])
            phases[key] = phases.get(key, 0) + entry["steps"]
    if len(phases) != 1:
        raise FormatError(
            f"{path}: the run has {len(phases)} phases with steps (σ, q pairs); the audit replays one: give "
            "its settings explicitly"
        )
    ((sigma, q), steps) = next(iter(phases.items()))
    bucket, nominal = doc["size_bucket"], doc["nominal_batch"]
    if q != nominal / bucket:
        raise FormatError(
            f"{path}: sample rate {q:g} is not nominal_batch / size_bucket = {nominal}/{bucket}; no real run "
            "has such a q"
        )
    return AuditSettings(
        float(sigma),
        float(q),
        int(steps),
        float(doc["max_grad_norm"]),
        float(doc["delta"]),
        int(nominal),
        int(bucket),
        source=f"receipt {path}",
        stated_epsilon=float(doc["epsilon"]["this_run"]["prv_upper"]),
    )


@dataclass
class AuditOptions:
    canaries: int = stats.DEFAULT_CANARIES
    canary_words: int = stats.DEFAULT_CANARY_WORDS
    lr: float = stats.DEFAULT_LR
    physical_batch_size: int = stats.DEFAULT_PHYSICAL_BATCH
    seed: int | None = None  # canaries' content and inclusion; None: drawn with `secrets` (and reported)
    confidence: float = stats.CONFIDENCE
    data: Path | None = None  # the auditor's public filler records; None: random ones

    def validate(self) -> None:
        for name, low in (("canaries", 2), ("canary_words", 1), ("physical_batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise OffsiteError(
                    f"--{name.replace('_', '-')} must be a whole number ≥ {low}, got {value!r}"
                )
        _positive(self.lr, "--lr")
        if self.lr > 10:
            raise OffsiteError(f"--lr must be at most 10, got {self.lr:g}")
        if self.seed is not None and (isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED):
            raise OffsiteError(f"--seed must be a whole number from 0 to {MAX_SEED}, got {self.seed!r}")
        if not 0 < self.confidence < 1:
            raise OffsiteError(f"confidence must be in (0, 1), got {self.confidence!r}")


def default_bucket(m: int) -> int:
    """The size bucket of a random audit set when no receipt names one: the smallest power of two that
    holds all m canaries with the audit set's size ``SIZE_MARGIN_SD`` standard deviations inside it."""
    bucket = size_bucket(m)
    while not _fits(bucket, _synthetic_filler(bucket, m), m):
        bucket *= 2
    return bucket


def _synthetic_filler(bucket: int, m: int) -> int:
    """Random filler records that put the expected audit set at ¾ of the bucket."""
    return max(0, round(0.75 * bucket - m / 2))


def _fits(bucket: int, filler: int, m: int) -> bool:
    expected, margin = filler + m / 2, SIZE_MARGIN_SD * math.sqrt(m) / 2
    return bucket / 2 < expected - margin and expected + margin <= bucket


@dataclass
class CanaryAuditResult:
    settings: AuditSettings
    bound: stats.OneRunBound
    auroc: float | None
    tpr_at_fpr: float | None
    accountant_epsilon: float | None
    canaries: int
    included: int
    records: int  # N: filler plus included canaries
    filler: int
    filler_source: str
    seed: int
    train_seconds: float
    seconds: float

    @property
    def failed(self) -> bool:
        """The lower bound exceeds the accountant's ε: the implementation leaks more than it claims."""
        return self.accountant_epsilon is not None and self.bound.epsilon > self.accountant_epsilon

    @property
    def could_fail(self) -> bool:
        """Whether any outcome of this audit could have exceeded the accountant's ε."""
        return self.accountant_epsilon is not None and self.bound.max_epsilon > self.accountant_epsilon

    def to_dict(self) -> dict:
        s = self.settings
        return {
            "ok": not self.failed,
            "verdict": "no-dp" if not s.dp else ("fail" if self.failed else "pass"),
            "epsilon_lower_bound": self.bound.epsilon,
            "accountant_epsilon": self.accountant_epsilon,
            "accountant": "prv_upper" if s.dp else None,
            "could_fail": self.could_fail,
            "confidence": self.bound.confidence,
            "auroc": self.auroc,
            "tpr_at_fpr": {"fpr": stats.REPORTED_FPR, "tpr": self.tpr_at_fpr},
            "lower_bound": self.bound.to_dict(),
            "settings": {
                "dp": s.dp,
                "source": s.source,
                "noise_multiplier": s.noise_multiplier,
                "sample_rate": s.sample_rate,
                "steps": s.steps,
                "max_grad_norm": s.max_grad_norm,
                "delta": s.delta,
                "nominal_batch": s.nominal_batch,
                "size_bucket": s.size_bucket,
                "stated_epsilon": s.stated_epsilon,
            },
            "audit_set": {
                "canaries": self.canaries,
                "included": self.included,
                "records": self.records,
                "filler": self.filler,
                "filler_source": self.filler_source,
                "seed": self.seed,
            },
            "seconds": {"training": self.train_seconds, "total": self.seconds},
        }


def vocabulary(tokenizer) -> list[str]:
    """The distinct plain words (letters only) among the tokenizer's single tokens: what canaries use."""
    special = set(tokenizer.all_special_ids)
    ids = [[i] for i in range(len(tokenizer)) if i not in special]
    return sorted({text.strip() for text in tokenizer.batch_decode(ids) if text.strip().isalpha()})


def random_records(
    rng: np.random.Generator, words: Sequence[str], n: int, length: int, num_labels: int | None, what: str
) -> list[Record]:
    """``n`` records of ``length`` words drawn uniformly (a uniform label too when ``num_labels``)."""
    chosen = rng.integers(0, len(words), size=(n, length))
    labels = rng.integers(0, num_labels, size=n) if num_labels else None
    out = []
    for i in range(n):
        fields: dict = {"text": " ".join(words[j] for j in chosen[i])}
        if labels is not None:
            fields["label"] = int(labels[i])
        out.append(Record(f"{what} {i}", fields))
    return out


@torch.no_grad()
def losses(
    model: torch.nn.Module, examples: Sequence[Example], pad_id: int, shift: bool, batch: int
) -> np.ndarray:
    """Each example's own loss (the training loss), in order."""
    model.eval()
    out = [
        to_cpu(per_sample_loss(model, collate(examples[i : i + batch], pad_id), shift), torch.float64).numpy()
        for i in range(0, len(examples), batch)
    ]
    return np.concatenate(out)


@dataclass
class AuditSet:
    """What one audit trains on and scores: the canaries (all m, in a fixed order), which of them are
    included, and the filler; with the settings in the bucket the set fills."""

    settings: AuditSettings
    canaries: list[Example]
    included: np.ndarray
    filler: list[Example]
    filler_source: str

    @property
    def train_set(self) -> list[Example]:
        return self.filler + [e for e, keep in zip(self.canaries, self.included, strict=True) if keep]


def _fit_hint(bucket: int, m: int) -> str:
    margin = SIZE_MARGIN_SD * math.sqrt(m) / 2
    low, high = max(math.floor(bucket / 2 + margin - m / 2) + 1, 0), math.floor(bucket - margin - m / 2)
    if high < low:
        return f"{m} canaries are too many for this bucket: use fewer (--canaries)"
    return f"with {m} canaries, give between {low} and {high} filler records"


def build_audit_set(
    settings: AuditSettings,
    opts: AuditOptions,
    kind: str,
    tokenizer,
    limit: int,
    num_labels: int | None,
    seed: int,
) -> AuditSet:
    """The filler (the auditor's data, or random records filling ¾ of the bucket), m random canaries and
    their inclusion, each independently with probability ½ (from ``seed``)."""
    m = opts.canaries
    rng = np.random.default_rng(seed)
    words = vocabulary(tokenizer)
    if len(words) < MIN_WORDS:
        raise DataError(
            f"the bundle's tokenizer has {len(words)} plain words; random canaries need at least {MIN_WORDS}"
        )
    # The filler first: its size decides whether the audit set can fill the bucket (and, with explicit
    # settings and the auditor's data, which bucket that is, as for a real run on that much data).
    filler_records = read_records(opts.data, kind) if opts.data is not None else None
    if settings.size_bucket is None:
        expected = None if filler_records is None else len(filler_records) + m // 2
        settings = settings.in_bucket(default_bucket(m) if expected is None else size_bucket(expected))
    bucket = settings.size_bucket
    source = str(opts.data)
    if filler_records is None:
        filler_records = random_records(
            rng, words, _synthetic_filler(bucket, m), opts.canary_words, num_labels, "filler record"
        )
        source = "random"
    if not _fits(bucket, len(filler_records), m):
        raise DataError(
            f"the audit set ({len(filler_records)} filler records + about {m // 2} included canaries) does not "
            f"fill the size bucket {bucket} safely (a real run's data holds (bucket/2, bucket] records; the "
            f"number of included canaries varies by chance): {_fit_hint(bucket, m)}"
        )
    canary_records = random_records(rng, words, m, opts.canary_words, num_labels, "canary")
    included = rng.random(m) < 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a truncated canary would be another canary
        try:
            canaries = make_examples(kind, canary_records, tokenizer, limit, num_labels, mask_seed=seed)
        except UserWarning as e:
            raise DataError(f"canaries of {opts.canary_words} words do not fit the model ({e})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # public filler may be cut to the model's length
        filler = make_examples(kind, filler_records, tokenizer, limit, num_labels, mask_seed=seed + 1)
    audit_set = AuditSet(settings, canaries, included, filler, source)
    if not bucket / 2 < len(audit_set.train_set) <= bucket:  # beyond SIZE_MARGIN_SD: practically never
        raise DataError(
            f"the audit set drew {len(audit_set.train_set)} records, outside the size bucket {bucket}; run again"
        )
    return audit_set


def run_canary_audit(
    bundle_dir: str | os.PathLike,
    settings: AuditSettings,
    opts: AuditOptions,
    *,
    on_total: Callable[[int], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> CanaryAuditResult:
    """Build the audit set, train with ``settings`` through ``train_dp``, score and bound (module doc).

    ``on_warning`` hears, before training, that the accountant's ε is beyond what m canaries can show."""
    started = time.perf_counter()
    opts.validate()
    accountant_eps = settings.accountant_epsilon()  # before training: a setting it refuses fails now
    reachable = stats.max_epsilon(opts.canaries, settings.delta, opts.confidence)
    if on_warning and accountant_eps is not None and accountant_eps >= reachable:
        on_warning(
            f"with {opts.canaries} canaries at δ={settings.delta:g} this audit cannot show more than "
            f"ε ≥ {reachable:.2f} (every guess right), so it cannot fail a claim of ε = {accountant_eps:.2f}: "
            "a pass says nothing here (docs/privacy.md: the ceiling rises with m only when δ is well below 1/m)"
        )
    seed = secrets.randbits(63) if opts.seed is None else opts.seed
    torch.manual_seed(seed % 2**32)  # dropout, if the model has any
    with Bundle.open(bundle_dir) as bundle:
        # On the current placement's device (--device), as client train runs: adapter float32, frozen
        # parts in the frozen dtype.
        model, view = bundle.load_emulator(placement=device.current())
        tokenizer = bundle.load_tokenizer()
    kind = data_kind(bundle.task)
    num_labels = bundle.num_labels if kind == CLS else None
    shift = bundle.task is Task.CAUSAL_LM
    audit_set = build_audit_set(
        settings, opts, kind, tokenizer, max_positions(model.config), num_labels, seed
    )
    settings, train_set = audit_set.settings, audit_set.train_set

    pad, batch = tokenizer.pad_token_id, opts.physical_batch_size
    before = losses(model, audit_set.canaries, pad, shift, batch)
    if on_total:
        on_total(settings.steps)
    t0 = time.perf_counter()
    train_dp(
        model,
        view.named_parameters(),
        train_set,
        settings.plan(),
        lr=opts.lr,
        pad_id=pad,
        shift=shift,
        physical_batch_size=batch,
        on_step=on_step,
    )
    train_seconds = time.perf_counter() - t0
    scores = before - losses(model, audit_set.canaries, pad, shift, batch)  # how much training lowered each
    if not np.all(np.isfinite(scores)):
        raise OffsiteError("training diverged (a canary's loss is not finite); try a smaller --lr")

    included = audit_set.included
    return CanaryAuditResult(
        settings=settings,
        bound=stats.one_run_lower_bound(scores, included, settings.delta, opts.confidence),
        auroc=stats.auroc(scores, included),
        tpr_at_fpr=stats.tpr_at_fpr(scores, included),
        accountant_epsilon=accountant_eps,
        canaries=opts.canaries,
        included=int(included.sum()),
        records=len(train_set),
        filler=len(audit_set.filler),
        filler_source=audit_set.filler_source,
        seed=seed,
        train_seconds=train_seconds,
        seconds=time.perf_counter() - started,
    )
