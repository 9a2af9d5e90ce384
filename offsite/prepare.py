"""The model owner's first step: model -> bundle (emulator + initial adapter + tokenizer)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from offsite.data import LM, MLM, Example, make_examples, max_positions, read_records
from offsite.errors import OffsiteError
from offsite.evaluation.metrics import token_perplexity
from offsite.fileio import SAFETENSORS_DTYPES, claim_output
from offsite.formats.bundle import write_bundle
from offsite.models.adapters import (
    BLOCKS,
    LORA,
    AdapterSpec,
    AdapterView,
    adapter_layers,
    positions_from_layer_map,
)
from offsite.models.emulator import build_emulator, emulator_layer_map
from offsite.models.loading import (
    dtype_name,
    load_config,
    load_model,
    load_tokenizer,
    model_fingerprint,
    parse_dtype,
    task_from_config,
)
from offsite.models.registry import Task, architecture_for, num_layers
from offsite.training.distill import DistillConfig, Distiller


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
    model,
    emulator,
    layer_map: list[int],
    tokenizer,
    config,
    task: Task,
    opts: PrepareOptions,
    on_step: Callable[[int, float], None] | None,
    fingerprint: str,
) -> dict:
    """Distil the emulator's kept middle blocks in place; return what the manifest records."""
    cfg = opts.distill or DistillConfig()
    train_ex, held_ex = _distill_examples(opts.distill_data, tokenizer, config, task)
    shift, pad = task is Task.CAUSAL_LM, tokenizer.pad_token_id
    distiller = Distiller(
        model,
        emulator,
        layer_map,
        opts.adapter_bottom,
        opts.adapter_top,
        cfg,
        pad_id=pad,
        shift=shift,
        use_lm=task is Task.CAUSAL_LM,
    )
    eval_set = held_ex or train_ex[:64]
    kd_before, ppl_before = distiller.mean_kd(eval_set), token_perplexity(emulator, eval_set, pad, shift)
    final_kd = distiller.train(
        train_ex, on_step=on_step, checkpoint=opts.distill_checkpoint, teacher_fingerprint=fingerprint
    )
    return {
        "steps": cfg.steps,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "lm_weight": cfg.lm_weight,
        "kd_weight": cfg.kd_weight,
        "final_kd_loss": final_kd,
        "held_out_records": len(eval_set),
        "held_out_kd": {"before": kd_before, "after": distiller.mean_kd(eval_set)},
        "held_out_perplexity": {
            "full": token_perplexity(model, eval_set, pad, shift),
            "emulator_before": ppl_before,
            "emulator_after": token_perplexity(emulator, eval_set, pad, shift),
        },
    }


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
        torch.manual_seed(opts.seed)  # a new classification head and LoRA matrices are drawn here
        # Files keep the checkpoint's dtype; distillation runs in fp32.
        distilling = opts.distill_data is not None
        model = load_model(
            model_dir, task=task, dtype=torch.float32 if distilling else "auto", num_labels=opts.num_labels
        )
        stored_dtype = stored_dtype_of(model_dir)
        tokenizer = load_tokenizer(model_dir)
        emulator = build_emulator(model, layer_map)
        fingerprint = model_fingerprint(model_dir)

        distillation = None
        if distilling:
            distillation = _distill(
                model, emulator, layer_map, tokenizer, config, task, opts, on_distill_step, fingerprint
            )
            emulator.to(stored_dtype)

        view = AdapterView(emulator, spec, positions_from_layer_map(layer_map))
        view.attach()
        emulator.requires_grad_(False)
        source = {
            "fingerprint": fingerprint,
            "family": arch.family,
            "model_type": config.model_type,
            "model_class": type(model).__name__,
            "task": task.value,
            "num_labels": opts.num_labels,
            "total_layers": total,
            "dtype": dtype_name(stored_dtype),
            # The owner's local path is nobody's business.
            "config": {k: v for k, v in config.to_dict().items() if k != "_name_or_path"},
        }
        bundle_id = write_bundle(
            claim.stage,
            emulator=emulator,
            tokenizer=tokenizer,
            view=view,
            layer_map=layer_map,
            source=source,
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


def stored_dtype_of(model_dir: Path) -> torch.dtype:
    """The dtype the checkpoint stores (what ``dtype="auto"`` loads), from a safetensors header."""
    from safetensors import safe_open

    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                dtype = parse_dtype(SAFETENSORS_DTYPES[st.get_slice(name).get_dtype()])
                if dtype.is_floating_point:  # integer buffers say nothing about the weights
                    return dtype
    return torch.float32
