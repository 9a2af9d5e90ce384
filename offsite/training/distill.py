"""Emulator distillation on the model owner's public text.

Only the kept middle blocks train. The teacher is the full middle stack on the same input
(the bottom adapter's output, identical in both models since they share the bottom blocks);
the loss is ``lm_weight · LM + kd_weight · mean(((h_t − h_s) / rms(h_t))²)`` on the last
middle hidden state (encoders: the KD term only), as in the reference.

The run is resumable through ``offsite.training.checkpoint`` (safetensors and JSON; never
pickle). A checkpoint resumes only the same run: its metadata records the run's identity
(``DistillIdentity``: the teacher, the layer map and adapter layout, the training data and every
setting that shapes the result) and a checkpoint of any other run is refused, so no other model's
blocks can end up in a new bundle.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
from pydantic import ConfigDict, Field
from torch import nn

from offsite.data import Example, collate
from offsite.device import inputs_for, to_cpu, to_device_of
from offsite.errors import FormatError, OffsiteError
from offsite.formats.schema import Schema, Sha256Hex, validate
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


class DistillSettings(Schema):
    """The settings that shape a distillation run's result (``DistillConfig`` without how often it
    checkpoints)."""

    steps: int = Field(description="optimizer steps")
    lr: float = Field(description="peak learning rate")
    batch_size: int = Field(description="records per step")
    warmup_steps: int = Field(description="linear warm-up steps before the cosine decay")
    lm_weight: float = Field(description="weight of the language-modelling loss")
    kd_weight: float = Field(description="weight of the hidden-state loss")
    seed: int = Field(description="seed of the data order")

    @classmethod
    def of(cls, cfg: DistillConfig) -> DistillSettings:
        return cls(**{k: v for k, v in asdict(cfg).items() if k != "checkpoint_every"})


class DistillIdentity(Schema):
    """What makes two distillation runs the same run."""

    teacher: Sha256Hex = Field(
        description="the source model: its file fingerprint (`source.fingerprint`), or else a sha256 of its weights"
    )
    layer_map: list[int] = Field(description="emulator position → original layer index")
    adapter_bottom: int = Field(description="bottom adapter blocks (not distilled)")
    adapter_top: int = Field(description="top adapter blocks (not distilled)")
    use_lm: bool = Field(description="whether the language-modelling loss is used (decoders)")
    data_sha256: Sha256Hex = Field(description="sha256 over the tokenised training records, in order")
    settings: DistillSettings = Field(description="the run's settings (fields below)")


class DistillCheckpointMeta(Schema):
    """What distillation puts in a checkpoint's JSON (``offsite.training.checkpoint`` owns the rest
    of that file, so other keys are left to it)."""

    model_config = ConfigDict(extra="ignore")

    step: Annotated[int, Field(ge=0)] = Field(description="steps done")
    kd_loss: float | None = Field(
        description="the distillation loss of the last step done (null before the first)"
    )
    identity: DistillIdentity = Field(description="the run (fields below)")


def examples_sha256(examples: Sequence[Example]) -> str:
    """sha256 over the tokenised records in order (ids and labels, length-prefixed)."""
    h = hashlib.sha256()
    for e in examples:
        labels = e.labels if isinstance(e.labels, list) else [e.labels]
        for seq in (e.input_ids, labels):
            h.update(len(seq).to_bytes(8, "little"))
            h.update(torch.tensor(seq, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """sha256 over a model's parameters and buffers by name (when no file fingerprint is given)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + b"\0" + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(
            to_cpu(t.detach()).reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            if t.numel()
            else b""
        )
    return h.hexdigest()


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
        self.layer_map, self.bottom, self.top = list(layer_map), bottom, top
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
        self.last_kd: float | None = None  # the KD loss of the last step (kept across a resume)

    def losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # The teacher may sit elsewhere (another device, or spread over devices by accelerate):
        # its hidden state comes to the student's device.
        t_in, batch = inputs_for(self.teacher, batch), inputs_for(self.student, batch)
        with torch.no_grad():
            h_t = self.teacher(
                input_ids=t_in["input_ids"],
                attention_mask=t_in["attention_mask"],
                output_hidden_states=True,
            ).hidden_states[self.teacher_index]
        out = self.student(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        h_s = out.hidden_states[self.student_index]
        kd = kd_loss(to_device_of(h_t, h_s).float(), h_s.float(), to_device_of(batch["attention_mask"], h_s))
        lm = torch.zeros((), device=h_s.device)
        if self.use_lm:
            lm = loss_from_logits(out.logits, to_device_of(batch["labels"], out.logits), self.shift).mean()
        return lm, kd

    def train(
        self,
        examples: Sequence[Example],
        on_step: Callable[[int, float], None] | None = None,
        checkpoint: Path | None = None,
        teacher_fingerprint: str | None = None,
    ) -> float:
        """Train to ``cfg.steps``; with ``checkpoint``, resume from it if it holds this same run.

        ``teacher_fingerprint`` (the source checkpoint's file fingerprint) identifies the teacher
        in the checkpoint; without it a sha256 of the teacher's weights is computed.
        """
        cfg = self.cfg
        identity = None
        if checkpoint is not None:
            identity = self.identity(examples, teacher_fingerprint)
            self._maybe_resume(checkpoint, identity)
        self.student.train()
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
                self.last_kd = kd.item()
                if on_step:
                    on_step(self.step, self.last_kd)
                if checkpoint is not None and (
                    self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
                ):
                    self._save(checkpoint, identity)
        self.student.eval()
        self.student.requires_grad_(False)
        return float("nan") if self.last_kd is None else self.last_kd

    @torch.no_grad()
    def mean_kd(self, examples: Sequence[Example]) -> float:
        self.student.eval()
        vals = [self.losses(collate(c, self.pad_id))[1].item() for c in batches(examples, 16, None)]
        return sum(vals) / max(len(vals), 1)

    # -- resumable state -------------------------------------------------------
    def _params_by_name(self) -> dict[str, nn.Parameter]:
        return dict(zip(self.names, self.params, strict=True))

    def identity(
        self, examples: Sequence[Example], teacher_fingerprint: str | None = None
    ) -> DistillIdentity:
        return DistillIdentity(
            teacher=teacher_fingerprint or weights_sha256(self.teacher),
            layer_map=self.layer_map,
            adapter_bottom=self.bottom,
            adapter_top=self.top,
            use_lm=self.use_lm,
            data_sha256=examples_sha256(examples),
            settings=DistillSettings.of(self.cfg),
        )

    def _save(self, directory: Path, identity: DistillIdentity) -> None:
        meta = {"step": self.step, "kd_loss": self.last_kd, "identity": identity.model_dump(mode="json")}
        checkpoint.save(directory, self._params_by_name(), self.optimizer, meta)

    def _maybe_resume(self, directory: Path, identity: DistillIdentity) -> None:
        if not checkpoint.exists(directory):
            return
        found = check_resumable(checkpoint.read_meta(directory), identity, directory)
        checkpoint.load(directory, self._params_by_name(), self.optimizer)
        self.step, self.last_kd = found.step, found.kd_loss


_WHAT_DIFFERS = {
    "teacher": "a different source model",
    "layer_map": "a different emulator layer map",
    "adapter_bottom": "a different adapter layout",
    "adapter_top": "a different adapter layout",
    "use_lm": "a different loss",
    "data_sha256": "different distillation data",
    "settings": "different distillation settings",
}


def check_resumable(meta: object, identity: DistillIdentity, directory: Path) -> DistillCheckpointMeta:
    """The checkpoint metadata ``meta`` (parsed JSON), if it is of this very run; else an OffsiteError
    that says what differs."""
    try:
        found = validate(DistillCheckpointMeta, meta, f"{directory}: distillation checkpoint")
    except FormatError as e:
        raise OffsiteError(
            f"{e}; it is not a checkpoint of this version's distillation: remove it to start over"
        ) from None
    if found.identity != identity:
        differs = next(k for k in _WHAT_DIFFERS if getattr(found.identity, k) != getattr(identity, k))
        raise OffsiteError(
            f"{directory} holds a distillation run with {_WHAT_DIFFERS[differs]} ({differs}); "
            "it cannot be resumed here: remove it or choose another --distill-checkpoint"
        )
    if found.step > identity.settings.steps:
        raise OffsiteError(
            f"{directory}: checkpoint at step {found.step}, beyond the run's {identity.settings.steps} steps"
        )
    return found
