"""The model owner's first step: model -> bundle (emulator + initial adapter + tokenizer).

The full model is never loaded to make a bundle: the emulator and the initial adapter are written
from the checkpoint's files one tensor at a time (``offsite.models.emulator.write_emulator``), so a
checkpoint larger than memory can be prepared. Only distillation loads models: the emulator (the
student) and the full model (the teacher, forward passes only), on the current placement's device
(``offsite.device``), the teacher optionally spread over device, CPU and disk by accelerate.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offsite import device
from offsite.data import LM, MLM, Example, make_examples, max_positions, read_records
from offsite.errors import OffsiteError
from offsite.evaluation.metrics import token_perplexity
from offsite.fileio import claim_output
from offsite.formats.bundle import write_bundle
from offsite.formats.checkpoint_files import CheckpointFiles
from offsite.formats.manifest import EMULATOR_DIR
from offsite.formats.safetensors_writer import DEFAULT_SHARD_BYTES
from offsite.models.adapters import BLOCKS, LORA, AdapterSpec, adapter_layers, initial_adapter
from offsite.models.emulator import EmulatorPlan, emulator_layer_map, plan_emulator, write_emulator
from offsite.models.loading import (
    dtype_name,
    load_config,
    load_dtype,
    load_model,
    load_tokenizer,
    model_fingerprint,
    task_from_config,
)
from offsite.models.registry import Task, architecture_for, blocks_path, get_blocks, num_layers
from offsite.models.streaming import add_legacy_names
from offsite.training.distill import DistillConfig, Distiller

TEACHER_DEVICE_MAPS = ("device", "auto")


@dataclass
class PrepareOptions:
    adapter_bottom: int = 2
    adapter_top: int = 2
    emulator_layers: int | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    num_labels: int | None = None
    seed: int = 0
    distill_data: Path | None = None
    distill: DistillConfig | None = None
    distill_checkpoint: Path | None = None
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    """The emulator is written in shards of at most this many bytes (``model.safetensors.index.json``)."""
    teacher_device_map: str = "device"
    """``device``: the teacher on the placement's device; ``auto``: accelerate spreads it over the
    device, CPU memory and disk (``teacher_max_memory`` bounds each)."""
    teacher_max_memory: dict[str, str] = field(default_factory=dict)


@dataclass
class PrepareResult:
    bundle_id: str
    layer_map: list[int]
    distillation: dict | None


def _distill_examples(path: Path, tokenizer, config, task: Task) -> tuple[list[Example], list[Example]]:
    kind = MLM if task is Task.MASKED_LM else LM
    records = read_records(path, kind)
    max_len = min(max_positions(config), 512)
    with warnings.catch_warnings():
        # Public text is cut to the model's length: harmless for distillation, not worth a warning a line.
        warnings.simplefilter("ignore", UserWarning)
        examples = make_examples(kind, records, tokenizer, max_len)
    # A fixed tail of the public text measures perplexity before and after distillation.
    held = max(1, len(examples) // 10) if len(examples) >= 10 else 0
    return examples[: len(examples) - held] or examples, examples[len(examples) - held :]


def _distill(
    model_dir: Path,
    emulator_dir: Path,
    plan: EmulatorPlan,
    tokenizer,
    config,
    task: Task,
    opts: PrepareOptions,
    on_step: Callable[[int, float], None] | None,
    fingerprint: str,
    scratch: Path,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Distil the emulator's kept middle blocks; return what the manifest records and the trained
    tensors (CPU, in the emulator's dtype) by emulator name."""
    cfg = opts.distill or DistillConfig()
    train_ex, held_ex = _distill_examples(opts.distill_data, tokenizer, config, task)
    shift, pad = task is Task.CAUSAL_LM, tokenizer.pad_token_id
    placement = device.current()
    # Distillation trains in float32; the student comes from the emulator just written.
    student = load_model(emulator_dir, task=task, **placement.load_kwargs(stored=torch.float32))
    teacher = _load_teacher(model_dir, task, opts, placement, scratch)
    torch.manual_seed(opts.seed)  # dropout, if the family has any
    distiller = Distiller(
        teacher,
        student,
        plan.layer_map,
        opts.adapter_bottom,
        opts.adapter_top,
        cfg,
        pad_id=pad,
        shift=shift,
        use_lm=task is Task.CAUSAL_LM,
    )
    placement.place(student)  # after the distiller chose what trains: frozen parts take the frozen dtype
    eval_set = held_ex or train_ex[:64]
    kd_before, ppl_before = distiller.mean_kd(eval_set), token_perplexity(student, eval_set, pad, shift)
    final_kd = distiller.train(
        train_ex, on_step=on_step, checkpoint=opts.distill_checkpoint, teacher_fingerprint=fingerprint
    )
    record = {
        "steps": cfg.steps,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "lm_weight": cfg.lm_weight,
        "kd_weight": cfg.kd_weight,
        "final_kd_loss": final_kd,
        "held_out_records": len(eval_set),
        "held_out_kd": {"before": kd_before, "after": distiller.mean_kd(eval_set)},
        "held_out_perplexity": {
            "full": token_perplexity(teacher, eval_set, pad, shift),
            "emulator_before": ppl_before,
            "emulator_after": token_perplexity(student, eval_set, pad, shift),
        },
    }
    # Only the kept middle blocks changed; everything else is written from the checkpoint again.
    blocks, path = get_blocks(student), blocks_path(student)
    trained = {
        f"{path}.{pos}.{name}": device.to_cpu(p.detach(), plan.dtype)
        for pos in range(opts.adapter_bottom, len(plan.layer_map) - opts.adapter_top)
        for name, p in blocks[pos].named_parameters()
    }
    return record, trained


def _load_teacher(model_dir: Path, task: Task, opts: PrepareOptions, placement, scratch: Path):
    """The full model for its forward passes: on the device, or spread by accelerate over the
    device, CPU memory and disk (``teacher_device_map="auto"``)."""
    if opts.teacher_device_map == "auto":
        kwargs = placement.dispatch_kwargs(opts.teacher_max_memory, scratch / "teacher-offload")
        return load_model(model_dir, task=task, num_labels=opts.num_labels, **kwargs)
    teacher = load_model(model_dir, task=task, num_labels=opts.num_labels, **placement.load_kwargs())
    return placement.place(teacher)


def prepare(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    opts: PrepareOptions,
    on_distill_step: Callable[[int, float], None] | None = None,
) -> PrepareResult:
    """Build the bundle of ``model_dir`` at ``out``. ``out`` is claimed first, so a second run on the
    same ``out`` fails at once, and the bundle appears there only once it is complete."""
    model_dir = Path(model_dir)
    _check_options(opts)
    with claim_output(out) as claim:
        config = load_config(model_dir)
        arch = architecture_for(config.model_type)
        task = task_from_config(config, opts.num_labels)
        if task is Task.SEQ_CLS and opts.num_labels is None:
            raise OffsiteError("this checkpoint is a classifier: pass --num-labels")
        if opts.num_labels is not None and not arch.is_encoder:
            raise OffsiteError("--num-labels is for encoders (BERT family) only")
        total = num_layers(config)
        layer_map = emulator_layer_map(total, opts.adapter_bottom, opts.adapter_top, opts.emulator_layers)
        spec = AdapterSpec(
            kind=LORA if opts.lora_rank else BLOCKS,
            layers=adapter_layers(total, opts.adapter_bottom, opts.adapter_top),
            lora_rank=opts.lora_rank,
            lora_alpha=(opts.lora_alpha or 2 * opts.lora_rank) if opts.lora_rank else None,
            trains_head=task is Task.SEQ_CLS,
        )
        source = CheckpointFiles(model_dir)
        add_legacy_names(source)
        stored_dtype = source.floating_dtype()
        # The model's config as from_pretrained(num_labels=...) would make it: the emulator's is a subset.
        model_config = load_config(model_dir, opts.num_labels) if opts.num_labels is not None else config
        dtype = load_dtype(model_config, stored_dtype)  # what dtype="auto" loads: files keep it
        tokenizer = load_tokenizer(model_dir)
        fingerprint = model_fingerprint(model_dir)
        # A new classification head is drawn from the seed here.
        plan = plan_emulator(source, model_config, task, layer_map, dtype, opts.seed)
        emulator_dir = claim.stage / EMULATOR_DIR
        write_emulator(plan, emulator_dir, opts.max_shard_bytes)

        distillation = None
        if opts.distill_data is not None:
            scratch = claim.stage / ".distill-scratch"
            try:
                distillation, trained = _distill(
                    model_dir,
                    emulator_dir,
                    plan,
                    tokenizer,
                    config,
                    task,
                    opts,
                    on_distill_step,
                    fingerprint,
                    scratch,
                )
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(emulator_dir)
            write_emulator(plan, emulator_dir, opts.max_shard_bytes, replace=trained)

        source_record = {
            "fingerprint": fingerprint,
            "family": arch.family,
            "model_type": config.model_type,
            "model_class": type(plan.model).__name__,
            "task": task.value,
            "num_labels": opts.num_labels,
            "total_layers": total,
            "dtype": dtype_name(stored_dtype),
            # The owner's local path is nobody's business.
            "config": {k: v for k, v in config.to_dict().items() if k != "_name_or_path"},
        }
        bundle_id = write_bundle(
            claim.stage,
            tokenizer=tokenizer,
            spec=spec,
            initial=initial_adapter(plan, spec, opts.seed),  # LoRA matrices are drawn from the seed here
            layer_map=layer_map,
            source=source_record,
            distillation=distillation,
        )
    return PrepareResult(bundle_id, layer_map, distillation)


def _check_options(opts: PrepareOptions) -> None:
    """Refuse what would fail later (or write a bundle its readers refuse) before any work."""
    if opts.lora_rank is not None and opts.lora_rank < 1:
        raise OffsiteError("--lora-rank must be at least 1")
    if opts.lora_alpha is not None and not opts.lora_alpha > 0:
        raise OffsiteError("--lora-alpha must be positive")
    if opts.num_labels is not None and opts.num_labels < 2:
        raise OffsiteError("--num-labels must be at least 2")
    if opts.distill is not None:
        cfg = opts.distill
        if cfg.steps < 1 or cfg.batch_size < 1 or cfg.checkpoint_every < 1 or cfg.warmup_steps < 0:
            raise OffsiteError("--distill-steps and --distill-batch-size must be at least 1")
        if not (0 < cfg.lr < float("inf")):
            raise OffsiteError("--distill-lr must be a positive number")
    if not isinstance(opts.max_shard_bytes, int) or opts.max_shard_bytes < 1:
        raise OffsiteError("--max-shard-size must be positive")
    if opts.teacher_device_map not in TEACHER_DEVICE_MAPS:
        raise OffsiteError(f"--teacher-device-map must be one of {', '.join(TEACHER_DEVICE_MAPS)}")
    if opts.teacher_max_memory and opts.teacher_device_map != "auto":
        raise OffsiteError("--teacher-max-memory needs --teacher-device-map auto")


def stored_dtype_of(model_dir: Path) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in, from its safetensors headers."""
    return CheckpointFiles(model_dir).floating_dtype()
