"""DP-SGD on the emulator: Poisson sampling, per-sample clipping, Gaussian noise.

The pieces and who owns them:

* Poisson sampling: Opacus' ``UniformWithReplacementSampler`` (each record joins each
  logical batch independently with probability q).
* Per-sample clipping: the project's ``PerSampleClipper`` (exact on every family; see
  ``per_sample.py``). A logical batch is split into physical batches of bounded size.
* Noise and the batch reduction: Opacus' ``DPOptimizerFastGradientClipping`` adds
  N(0, (σC)²) to the clipped sum and divides by the expected batch size q·N.

Randomness for sampling and noise comes from the operating system (``os.urandom``
seeds), never from ``--seed``; a test-only ``noise_seed`` exists and is recorded in the
receipt. Budget is recorded before it is spent: ``offsite.tune`` reserves the whole run in the
dataset's history; other callers can pass ``record_steps``, called before each step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from offsite.data import Example, collate
from offsite.errors import BudgetError, DataError, OffsiteError
from offsite.privacy import accounting
from offsite.training import checkpoint
from offsite.training.losses import per_sample_loss
from offsite.training.per_sample import PerSampleClipper


@dataclass(frozen=True)
class DPPlan:
    """What the accountant needs, fixed before training starts."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    max_grad_norm: float
    expected_batch_size: int

    def entry(self, steps_done: int) -> dict:
        return accounting.make_entry(self.noise_multiplier, self.sample_rate, steps_done)


def default_delta(n_records: int) -> float:
    """A power of ten at most 1/(10·N): well below 1/N, as DP practice asks."""
    return 10.0 ** math.floor(math.log10(0.1 / n_records))


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
    """Choose q, steps and σ: σ is the smallest noise keeping the dataset's *total* ε
    (recorded history composed with this run) within ``epsilon``, unless given explicitly."""
    if n_records < batch_size:
        raise DataError(
            f"the dataset has fewer records than one batch (--batch-size {batch_size}); "
            "lower --batch-size or add data"
        )
    if epochs < 1:
        raise OffsiteError("--epochs must be at least 1")
    if max_grad_norm <= 0:
        raise OffsiteError("--max-grad-norm must be positive")
    delta = default_delta(n_records) if delta is None else delta
    if not 0 < delta < 1 / n_records:
        raise BudgetError(
            f"δ={delta:g} is not below 1/N for this dataset; δ ≥ 1/N permits releasing a record "
            "outright. Use a smaller --delta (the default is at most 1/(10·N))."
        )
    q = batch_size / n_records
    steps = epochs * math.ceil(n_records / batch_size)
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
    return DPPlan(sigma, q, steps, delta, max_grad_norm, batch_size)


def os_generator() -> torch.Generator:
    """A generator seeded from the operating system's randomness."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def make_dp_optimizer(
    optimizer: torch.optim.Optimizer, plan: DPPlan, generator: torch.Generator
) -> DPOptimizerFastGradientClipping:
    """Opacus' noise step: p.grad (the clipped sum) + N(0, (σC)²), divided by the expected batch size."""
    return DPOptimizerFastGradientClipping(
        optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=plan.expected_batch_size,
        loss_reduction="mean",
        generator=generator,
    )


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
    if noise_seed is None:
        noise_gen, sample_gen = os_generator(), os_generator()
    else:  # test only: recorded in the receipt
        noise_gen = torch.Generator().manual_seed(noise_seed)
        sample_gen = torch.Generator().manual_seed(noise_seed + 1)
    dp_optimizer = make_dp_optimizer(optimizer, plan, noise_gen)
    sampler = UniformWithReplacementSampler(
        num_samples=len(examples),
        sample_rate=plan.sample_rate,
        generator=sample_gen,
        steps=plan.steps - start,
    )
    clipper = PerSampleClipper(model, plan.max_grad_norm)
    steps_per_epoch = math.ceil(1 / plan.sample_rate)
    model.train()
    with clipper:
        for step, indices in enumerate(sampler, start=start + 1):
            if record_steps:
                record_steps(step)
            dp_optimizer.zero_grad(set_to_none=True)
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
            dp_optimizer.step()
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
