"""Per-sample losses: each sample's loss depends on that sample alone.

Hugging Face's built-in LM loss averages over every token of the batch, which ties each
sample's gradient to the others' lengths (and breaks DP's sensitivity bound). Here each
sample's loss is the mean over its own loss tokens; the caller reduces over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from offsite.data import IGNORE
from offsite.device import inputs_for, to_device_of


def per_sample_loss(model: nn.Module, batch: dict[str, torch.Tensor], shift: bool) -> torch.Tensor:
    """Loss of each sample, shape (B,), on the model's device. ``shift`` for causal LMs (predict the
    next token)."""
    batch = inputs_for(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return loss_from_logits(logits, to_device_of(batch["labels"], logits), shift)


def loss_from_logits(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Per-sample loss (B,) from logits: (B, C) with labels (B,), or (B, T, V) with labels (B, T)."""
    logits = logits.float()
    if labels.dim() == 1:  # sequence classification
        return F.cross_entropy(logits, labels, reduction="none")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(labels.shape)
    counts = (labels != IGNORE).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1)
