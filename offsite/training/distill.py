"""Emulator distillation on the model owner's public text.

Only the kept middle blocks train. The teacher is the full middle stack on the same input
(the bottom adapter's output, identical in both models since they share the bottom blocks);
the loss is ``lm_weight · LM + kd_weight · mean(((h_t − h_s) / rms(h_t))²)`` on the last
middle hidden state (encoders: the KD term only), as in the reference.

The run is resumable: a checkpoint directory holds ``state.safetensors`` (student blocks and
AdamW moments) and ``state.json`` (step and settings); never pickle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from offsite.data import Example, collate
from offsite.errors import OffsiteError
from offsite.models.registry import get_blocks
from offsite.training import checkpoint
from offsite.training.finetune import batches
from offsite.training.losses import loss_from_logits


@dataclass
class DistillConfig:
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 8
    warmup_steps: int = 20
    lm_weight: float = 1.0
    kd_weight: float = 30.0
    seed: int = 0
    checkpoint_every: int = 50


def kd_loss(h_teacher: torch.Tensor, h_student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over real tokens of ((h_t − h_s) / rms(h_t))², rms taken per token."""
    rms = h_teacher.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp(min=1e-6)
    per_token = ((h_teacher - h_student) / rms).pow(2).mean(dim=-1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1)


def _lr_at(step: int, cfg: DistillConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Distiller:
    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        layer_map: list[int],
        bottom: int,
        top: int,
        cfg: DistillConfig,
        *,
        pad_id: int,
        shift: bool,
        use_lm: bool,
    ):
        self.teacher, self.student, self.cfg = teacher, student, cfg
        self.pad_id, self.shift, self.use_lm = pad_id, shift, use_lm
        total = len(get_blocks(teacher))
        # hidden_states[i] is the input of block i: the last middle block's output is the
        # input of the first top block.
        self.teacher_index = total - top
        self.student_index = len(layer_map) - top
        student.requires_grad_(False)
        blocks = get_blocks(student)
        self.student_blocks = [blocks[p] for p in range(bottom, len(layer_map) - top)]
        for b in self.student_blocks:
            b.requires_grad_(True)
        self.params = [p for b in self.student_blocks for p in b.parameters()]
        self.names = [f"{i}.{n}" for i, b in enumerate(self.student_blocks) for n, _ in b.named_parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        self.step = 0

    def losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            h_t = self.teacher(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=True,
            ).hidden_states[self.teacher_index]
        out = self.student(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        kd = kd_loss(h_t.float(), out.hidden_states[self.student_index].float(), batch["attention_mask"])
        lm = torch.zeros(())
        if self.use_lm:
            lm = loss_from_logits(out.logits, batch["labels"], self.shift).mean()
        return lm, kd

    def train(
        self,
        examples: Sequence[Example],
        on_step: Callable[[int, float], None] | None = None,
        checkpoint: Path | None = None,
    ) -> float:
        cfg = self.cfg
        if checkpoint is not None:
            self._maybe_resume(checkpoint)
        self.student.train()
        kd_value = float("nan")
        while self.step < cfg.steps:
            epoch, offset = divmod(self.step * cfg.batch_size, max(len(examples), 1))
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            chunks = list(batches(examples, cfg.batch_size, gen))
            for chunk in chunks[offset // cfg.batch_size :]:
                if self.step >= cfg.steps:
                    break
                for g in self.optimizer.param_groups:
                    g["lr"] = _lr_at(self.step, cfg)
                lm, kd = self.losses(collate(chunk, self.pad_id))
                loss = cfg.lm_weight * lm + cfg.kd_weight * kd
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.step += 1
                kd_value = kd.item()
                if on_step:
                    on_step(self.step, kd_value)
                if checkpoint is not None and (
                    self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
                ):
                    self._save(checkpoint)
        self.student.eval()
        self.student.requires_grad_(False)
        return kd_value

    @torch.no_grad()
    def mean_kd(self, examples: Sequence[Example]) -> float:
        self.student.eval()
        vals = [self.losses(collate(c, self.pad_id))[1].item() for c in batches(examples, 16, None)]
        return sum(vals) / max(len(vals), 1)

    # -- resumable state -------------------------------------------------------
    def _params_by_name(self) -> dict[str, nn.Parameter]:
        return dict(zip(self.names, self.params, strict=True))

    def _save(self, directory: Path) -> None:
        checkpoint.save(
            directory, self._params_by_name(), self.optimizer, {"step": self.step, "config": asdict(self.cfg)}
        )

    def _maybe_resume(self, directory: Path) -> None:
        if not checkpoint.exists(directory):
            return
        if checkpoint.read_meta(directory).get("config") != asdict(self.cfg):
            raise OffsiteError(
                f"{directory} holds a distillation run with other settings; remove it to start over"
            )
        self.step = int(checkpoint.load(directory, self._params_by_name(), self.optimizer)["step"])
