"""Full fine-tuning of the whole model: the 'full fine-tuned' reference row (research and demo only).

Not part of the offsite flow: it needs the full model and the private data in one place.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from offsite import device
from offsite.data import make_examples, max_positions, read_records
from offsite.fileio import OutputClaim, claim_output
from offsite.models.loading import load_config, load_model, load_tokenizer, task_from_config
from offsite.models.registry import Task
from offsite.training.finetune import TrainConfig, train
from offsite.tune import data_kind


def finetune_full(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    cfg: TrainConfig,
    num_labels: int | None = None,
    max_length: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> None:
    # Claimed before the work, so a second run on the same --out fails at once.
    with claim_output(out) as claim:
        _finetune_full(claim, model_dir, data, cfg, num_labels, max_length, on_step)


def _finetune_full(
    claim: OutputClaim,
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    cfg: TrainConfig,
    num_labels: int | None,
    max_length: int | None,
    on_step: Callable[[int, float], None] | None,
) -> None:
    model_dir = Path(model_dir)
    task = task_from_config(load_config(model_dir), num_labels)
    torch.manual_seed(cfg.seed)
    # Every parameter trains, so everything stays float32, on the current placement's device.
    placement = device.current()
    model = load_model(
        model_dir, task=task, num_labels=num_labels, **placement.load_kwargs(stored=torch.float32)
    )
    model.requires_grad_(True)
    placement.place(model)
    tokenizer = load_tokenizer(model_dir)
    records = read_records(data, data_kind(task))
    limit = min(max_length or max_positions(model.config), max_positions(model.config))
    examples = make_examples(data_kind(task), records, tokenizer, limit, num_labels)
    model.requires_grad_(True)
    train(
        model,
        model.parameters(),
        examples,
        cfg,
        pad_id=tokenizer.pad_token_id,
        shift=task is Task.CAUSAL_LM,
        on_step=on_step,
    )
    with claim.staged() as stage:
        model.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
