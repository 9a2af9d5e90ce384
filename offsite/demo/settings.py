"""What the demo runs with: the owner's preparation, the private run, and the reference rows' settings.

The non-private reference rows (full fine-tuning, the emulator and the plug-in trained without DP)
use the learning rate and epochs that ``benchmarks/sweep_reference.py`` chose for them on a
validation split of the fine-tuning records (never on the evaluation set), each row from the same
budget: learning rates {1e-4, 3e-4, 1e-3, 3e-3} x epochs {1, 2, 4}, batch 32. The sweep's table and
choices are in ``docs/benchmarks.md``; the sweep prints whether its choices match these.

The private run takes no hand-tuned settings: it uses the DP defaults that ``offsite client train``
uses (``offsite.training.dp_defaults``), as a data owner who cannot tune on its data would.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from offsite.prepare import PrepareOptions
from offsite.training.distill import DistillConfig


@dataclass(frozen=True)
class Reference:
    """Settings of one non-private reference row (plain AdamW, constant learning rate)."""

    lr: float
    epochs: int
    batch_size: int = 32

    def to_json(self) -> dict:
        return asdict(self)


FULL_FT = "full fine-tuned"
EMULATOR_NODP = "emulator fine-tuned without DP"
PLUGIN_NODP = "plug-in without DP"

#: Chosen by ``benchmarks/sweep_reference.py`` (seeds 0-2, lowest mean validation log-loss; the table
#: is in docs/benchmarks.md). The emulator and plug-in rows chose the same setting, so the demo trains
#: one non-private adapter for both.
REFERENCE: dict[str, Reference] = {
    FULL_FT: Reference(lr=1e-4, epochs=4),
    EMULATOR_NODP: Reference(lr=1e-4, epochs=1),
    PLUGIN_NODP: Reference(lr=1e-4, epochs=1),
}


@dataclass(frozen=True)
class DemoSettings:
    emulator_layers: int = 2
    distill_steps: int = 100
    distill_lr: float = 1e-3
    distill_batch: int = 16
    epsilon: float = 8.0  # the job's maximum and the owner's grant for the data owner's dataset
    # The grant's δ: the default δ a data owner gets for the demo's 2,880 records (size bucket 4,096:
    # the largest power of ten at most 1/(10·4096)), so the grant changes nothing in the private run.
    delta: float = 1e-5
    physical_batch: int = 64


#: The demo's job, its one data owner and the dataset id its receipts name.
JOB_ID = "demo-job"
CLIENT_ID = "client-1"
DATASET_ID = "demo-private-task"

FULL = DemoSettings()
# Quick: a shorter distillation only. Everything else (the private run with the DP defaults, all 1,152
# evaluation questions: scoring them all costs a few seconds) is the full demo's.
QUICK = replace(FULL, distill_steps=20)


def prepare_options(settings: DemoSettings, data_dir: Path, seed: int) -> PrepareOptions:
    """The owner's preparation: layer-drop to ``emulator_layers`` middle blocks, then distillation on
    the fact-free public text."""
    distill = DistillConfig(
        steps=settings.distill_steps,
        lr=settings.distill_lr,
        batch_size=settings.distill_batch,
        warmup_steps=max(1, settings.distill_steps // 10),
        seed=seed,
    )
    return PrepareOptions(
        emulator_layers=settings.emulator_layers,
        distill_data=data_dir / "public.txt",
        distill=distill,
        seed=seed,
    )
