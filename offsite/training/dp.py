"""DP-SGD on the emulator: Poisson sampling, per-sample clipping, Gaussian noise.

The pieces and who owns them:

* The plan (``make_plan``): q, steps and the default δ come from the flags and the dataset's *size
  bucket* (the power of two at or above N), never from N itself, so nothing published follows N
  except through the bucket. q = nominal batch / bucket, steps = ⌈epochs / q⌉.
* Poisson sampling (``noise.PoissonSampler``): each record joins each logical batch
  independently with probability exactly q, from a ChaCha20 stream.
* Per-sample clipping: the project's ``PerSampleClipper`` (exact on every family; see
  ``per_sample.py``). A logical batch is split into physical batches of bounded size.
* Noise and the batch reduction (``add_noise_and_scale``): N(0, (σC)²) from a ChaCha20 stream
  (``noise.StepNoise``, drawn a step ahead in a background thread) added to the clipped sum, then
  division by the constant nominal batch, never by anything computed from N.

Where it runs: the model, the per-sample engine, the clipped sums and AdamW's state live on the
model's device (``offsite.device``: the caller placed the model); sampling and the noise are drawn on
the CPU. Each step's noise is drawn during the step before it into one of two host buffers (pinned
on CUDA), copied to the device without blocking (``device.upload``) and added there; the buffer is
refilled only after that copy has finished (``Upload.wait``, one step later).

Randomness for sampling and noise comes from ChaCha20 keyed from ``os.urandom`` (a new key per run,
never stored), never from ``--seed``; a test-only ``noise_seed`` exists and is recorded in the
receipt. Budget is recorded before it is spent: ``offsite.tune`` reserves the whole run in the
dataset's history; other callers can pass ``record_steps``, called before each step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from offsite import device
from offsite.data import Example, collate
from offsite.errors import BudgetError, DataError, OffsiteError
from offsite.privacy import accounting
from offsite.training import checkpoint
from offsite.training.losses import per_sample_loss
from offsite.training.noise import ChaChaStream, PoissonSampler, StepNoise
from offsite.training.per_sample import PerSampleClipper


@dataclass(frozen=True)
class DPPlan:
    """What the accountant needs, fixed before training starts. Every field is a function of the
    flags, the size bucket and the dataset's recorded history, never of the exact N."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    max_grad_norm: float
    nominal_batch: int
    size_bucket: int

    def entry(self, steps_done: int) -> dict:
        return accounting.make_entry(self.noise_multiplier, self.sample_rate, steps_done)


def size_bucket(n_records: int) -> int:
    """The power of two at or above N: what a receipt publishes in place of N."""
    if n_records < 1:
        raise DataError("the dataset has no records")
    return 1 << (n_records - 1).bit_length()


def default_delta(bucket: int) -> float:
    """A power of ten at most 1/(10·bucket): below 1/(10·N) for every N in the bucket, as DP practice
    asks, and a function of the bucket only."""
    return 10.0 ** math.floor(math.log10(0.1 / bucket))


def make_plan(
    n_records: int,
    batch_size: int,
    epochs: int,
    *,
    prior_history: Sequence[dict],
    epsilon: float | None,
    delta: float | None,
    noise_multiplier: float | None,
    max_grad_norm: float,
) -> DPPlan:
    """Choose q, steps and σ from the flags and the size bucket of ``n_records``.

    The grid: bucket = 2**⌈log2 N⌉, q = batch_size / bucket (a dyadic number, so Poisson sampling
    hits it exactly), steps = ⌈epochs / q⌉, and the noisy sum is divided by batch_size (the nominal
    batch; the expected batch q·N lies in (batch_size/2, batch_size]). σ is the smallest noise keeping
    the dataset's *total* ε (recorded history composed with this run) within ``epsilon``, unless
    given explicitly. The exact N is used only to refuse: a dataset smaller than one batch, or δ ≥ 1/N.
    """
    if n_records < batch_size:
        raise DataError(
            f"the dataset has fewer records than one batch (--batch-size {batch_size}); "
            "lower --batch-size or add data"
        )
    if epochs < 1:
        raise OffsiteError("--epochs must be at least 1")
    if max_grad_norm <= 0:
        raise OffsiteError("--max-grad-norm must be positive")
    bucket = size_bucket(n_records)
    delta = default_delta(bucket) if delta is None else delta
    if not 0 < delta < 1 / n_records:
        raise BudgetError(
            f"δ={delta:g} is not below 1/N for this dataset; δ ≥ 1/N permits releasing a record "
            "outright. Use a smaller --delta (the default is at most 1/(10·N): a power of ten at most "
            "1/(10·size bucket))."
        )
    q = batch_size / bucket
    steps = -(-epochs * bucket // batch_size)  # ⌈epochs / q⌉ in exact integer arithmetic
    if noise_multiplier is None:
        if epsilon is None:
            raise OffsiteError("give --epsilon (the dataset's total budget) or --noise-multiplier")
        sigma = accounting.calibrate_noise(prior_history, q, steps, epsilon, delta)
    else:
        if noise_multiplier <= 0:
            raise OffsiteError("--noise-multiplier must be positive")
        sigma = float(noise_multiplier)
        if epsilon is not None:
            total = accounting.epsilon_prv([*prior_history, accounting.make_entry(sigma, q, steps)], delta)
            if total > epsilon:
                raise BudgetError(
                    f"σ={sigma:g} for {steps} steps at q={q:.4g} brings this dataset's total to "
                    f"ε={total:.3f} at δ={delta:g}, above --epsilon {epsilon:g}"
                )
    return DPPlan(sigma, q, steps, delta, max_grad_norm, batch_size, bucket)


def noise_stream(noise_seed: int | None) -> ChaChaStream:
    """The run's source of noise and sampling: a ChaCha20 stream keyed afresh from os.urandom, or (tests
    only) from a seed."""
    return ChaChaStream.from_os() if noise_seed is None else ChaChaStream.insecure_from_seed(noise_seed)


def add_noise_and_scale(
    params: Sequence[nn.Parameter], noise: np.ndarray | torch.Tensor, std: float, nominal_batch: int
) -> None:
    """The privatised gradient, in place: p.grad (the clipped sum) + std · noise, divided by the
    constant nominal batch. ``noise`` is one N(0, 1) float32 vector covering ``params`` in order (a host
    array, or a tensor already on the parameters' device)."""
    flat = torch.from_numpy(noise) if isinstance(noise, np.ndarray) else noise
    offset = 0
    for p in params:
        n = p.numel()
        chunk = device.to_device_of(flat[offset : offset + n].view(p.shape), p.grad)
        p.grad.add_(chunk, alpha=std).div_(nominal_batch)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"noise has {flat.numel()} values for {offset} parameters")


@dataclass
class DPTrainState:
    """Resumable state of one DP run: parameters, AdamW moments, the step and the run's identity,
    committed as one atomic unit (see ``offsite.training.checkpoint``)."""

    directory: Path

    def exists(self) -> bool:
        return checkpoint.exists(self.directory)

    def read_meta(self) -> dict:
        return checkpoint.read_meta(self.directory)

    def save(
        self,
        identity: dict,
        step: int,
        params: dict[str, nn.Parameter],
        optimizer: torch.optim.Optimizer | None,
    ) -> None:
        """Commit the state after ``step`` optimizer steps (0: right after the budget is reserved)."""
        checkpoint.save(self.directory, params, optimizer, {"identity": identity, "step": step})

    def load(self, identity: dict, params: dict[str, nn.Parameter], optimizer) -> int:
        """Restore the committed state of this run (refusing another run's) and return its step."""

        def same_run(meta: dict) -> None:
            if meta.get("identity") != identity:
                raise OffsiteError(
                    f"{self.directory} holds an interrupted run with other inputs or settings; "
                    "remove it to start over (its spent budget stays recorded)"
                )

        return int(checkpoint.load(self.directory, params, optimizer, check=same_run)["step"])


def train_dp(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    examples: Sequence[Example],
    plan: DPPlan,
    *,
    lr: float,
    pad_id: int,
    shift: bool,
    physical_batch_size: int,
    record_steps: Callable[[int], None] | None = None,
    state: DPTrainState | None = None,
    identity: dict | None = None,
    noise_seed: int | None = None,
    checkpoint_every: int = 20,
    on_step: Callable[[int, float], None] | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> None:
    """Run ``plan.steps`` DP-SGD steps on ``params`` (AdamW on the privatised gradient).

    ``record_steps(n)``, if given, is called before step n runs, to durably record spent steps;
    callers that reserved the whole run beforehand (``offsite.tune``) pass nothing.
    """
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    start = state.load(identity, params, optimizer) if state is not None and state.exists() else 0
    stream = noise_stream(noise_seed)
    trainable = list(params.values())
    where = trainable[0].device
    sampler = PoissonSampler(stream, len(examples), plan.sample_rate)
    noise = StepNoise(
        stream, sum(p.numel() for p in trainable), last_step=plan.steps, allocate=device.HostBuffers(where)
    )
    upload = device.Upload(torch.zeros(0))
    clipper = PerSampleClipper(model, plan.max_grad_norm)
    steps_per_epoch = math.ceil(1 / plan.sample_rate)
    model.train()
    with clipper, noise:
        noise.prefetch(start + 1)  # drawn while the first batch computes
        for step in range(start + 1, plan.steps + 1):
            indices = sampler.indices(step)
            if record_steps:
                record_steps(step)
            optimizer.zero_grad(set_to_none=True)
            losses = []
            for i in range(0, max(len(indices), 1), physical_batch_size):
                chunk = [examples[j] for j in indices[i : i + physical_batch_size]]
                if not chunk:
                    clipper.step(lambda: torch.zeros(0), batch_size=0)
                    continue
                batch = collate(chunk, pad_id)

                def loss_fn(batch=batch, losses=losses):
                    per_sample = per_sample_loss(model, batch, shift)
                    losses.append(per_sample.detach())
                    return per_sample

                clipper.step(loss_fn, batch_size=len(chunk))
            # The previous step's copy must be done with its buffer before get() refills that buffer.
            upload.wait()
            upload = device.upload(noise.get(step), where)
            add_noise_and_scale(
                trainable, upload.tensor, plan.noise_multiplier * plan.max_grad_norm, plan.nominal_batch
            )
            optimizer.step()
            if on_step:
                seen = torch.cat(losses) if losses else torch.zeros(0)
                on_step(step, seen.mean().item() if seen.numel() else float("nan"))
            if state is not None and (step % checkpoint_every == 0 or step == plan.steps):
                state.save(identity, step, params, optimizer)
            if on_epoch and (step % steps_per_epoch == 0 or step == plan.steps):
                model.eval()
                on_epoch(math.ceil(step / steps_per_epoch) - 1)
                model.train()
    model.eval()
