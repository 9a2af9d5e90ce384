"""Full fine-tuning of the whole model: the 'full fine-tuned' reference row (research and demo only).

Not part of the offsite flow: it needs the full model and the private data in one place.
The output directory records the training settings in ``offsite_finetune.json`` so that
``offsite eval`` can say which settings the row used.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from offsite import device
from offsite.data import make_examples, max_positions, read_records
from offsite.fileio import canonical_json, claim_output, write_bytes_atomic
from offsite.models.loading import load_config, load_model, load_tokenizer, task_from_config
from offsite.models.registry import Task
from offsite.training.finetune import TrainConfig, train
from offsite.tune import data_kind

SETTINGS_FILE = "offsite_finetune.json"


def finetune_full(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike | None,
    cfg: TrainConfig,
    num_labels: int | None = None,
    max_length: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """Fine-tune every parameter of ``model_dir`` on ``data``; write ``out`` unless it is None.

    ``out`` is claimed before the work, so a second run on the same ``out`` fails at once.
    ``on_epoch(epoch, model)`` runs after each epoch (0-based) with the model in eval mode; the
    training continues afterwards exactly as without it (hyperparameter sweeps read validation
    scores there instead of training each epoch count again).
    """
    with claim_output(out) if out is not None else contextlib.nullcontext() as claim:
        model, tokenizer = _train_full(Path(model_dir), data, cfg, num_labels, max_length, on_step, on_epoch)
        if claim is not None:
            with claim.staged() as stage:
                model.save_pretrained(stage, safe_serialization=True)
                tokenizer.save_pretrained(stage)
                write_bytes_atomic(stage / SETTINGS_FILE, canonical_json({"full_finetune": cfg.to_json()}))
    return model


def _train_full(
    model_dir: Path,
    data: str | os.PathLike,
    cfg: TrainConfig,
    num_labels: int | None,
    max_length: int | None,
    on_step: Callable[[int, float], None] | None,
    on_epoch: Callable[[int, nn.Module], None] | None,
):
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

    def epoch_done(epoch: int) -> None:
        model.eval()
        on_epoch(epoch, model)
        model.train()

    train(
        model,
        model.parameters(),
        examples,
        cfg,
        pad_id=tokenizer.pad_token_id,
        shift=task is Task.CAUSAL_LM,
        on_step=on_step,
        on_epoch=epoch_done if on_epoch else None,
    )
    return model, tokenizer
