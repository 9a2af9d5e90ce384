"""Fine-tuning loops without DP: the data owner's adapter (``--no-dp``) and, for research
and the demo, full fine-tuning of the whole model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from offsite.data import Example, collate
from offsite.training.losses import per_sample_loss


@dataclass
class TrainConfig:
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    weight_decay: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def batches(examples: Sequence[Example], batch_size: int, generator: torch.Generator | None):
    """Shuffled (with ``generator``) or in-order mini-batches of whole records."""
    order = torch.randperm(len(examples), generator=generator).tolist() if generator else range(len(examples))
    order = list(order)
    for i in range(0, len(order), batch_size):
        yield [examples[j] for j in order[i : i + batch_size]]


@torch.no_grad()
def mean_loss(
    model: nn.Module, examples: Sequence[Example], pad_id: int, shift: bool, batch_size: int = 32
) -> float:
    """Mean over records of each record's own loss."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for chunk in batches(examples, batch_size, None):
        total += per_sample_loss(model, collate(chunk, pad_id), shift).sum().item()
        n += len(chunk)
    model.train(was_training)
    return total / max(n, 1)


def train(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    train_examples: Sequence[Example],
    cfg: TrainConfig,
    *,
    pad_id: int,
    shift: bool,
    on_step: Callable[[int, float], None] | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> None:
    """Plain AdamW on ``params`` with the mean of per-sample losses."""
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout
    model.train()
    step = 0
    for epoch in range(cfg.epochs):
        for chunk in batches(train_examples, cfg.batch_size, generator):
            loss = per_sample_loss(model, collate(chunk, pad_id), shift).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if on_step:
                on_step(step, loss.item())
        if on_epoch:
            on_epoch(epoch)
    model.eval()
