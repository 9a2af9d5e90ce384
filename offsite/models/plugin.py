"""Plug-in: put a trained adapter back into the full model, by explicit layer index."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from offsite.models.adapters import HEAD_PREFIX, LORA, AdapterSpec, AdapterView, identity_positions
from offsite.models.lora import LoRALinear, merge_lora
from offsite.models.registry import Task, blocks_path, num_layers

_PEFT_TASK = {Task.CAUSAL_LM: "CAUSAL_LM", Task.SEQ_CLS: "SEQ_CLS", Task.MASKED_LM: None}


def plug_in(model: nn.Module, spec: AdapterSpec, tensors: dict[str, torch.Tensor]) -> AdapterView:
    """Load adapter ``tensors`` into ``model`` (the full model) at their original layer indices.

    For LoRA the layers are wrapped, not yet merged: call ``merge_lora(model)`` after an
    optional PEFT export.
    """
    view = AdapterView(model, spec, identity_positions(num_layers(model.config)))
    view.attach()
    view.load_state_dict(tensors)
    model.requires_grad_(False)
    return view


def merge(model: nn.Module) -> None:
    merge_lora(model)


def export_peft(view: AdapterView, out_dir: Path, task: Task) -> None:
    """Write a PEFT LoRA adapter (renumbered to full-model layers) that ``PeftModel.from_pretrained``
    loads onto the original checkpoint to give the merged model's outputs."""
    model = view.model
    if view.spec.kind != LORA:
        raise ValueError("only LoRA adapters have a PEFT form")
    prefix = blocks_path(model)
    targets: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    fan_in_fan_out = False
    for layer in view.spec.layers:
        block = model.get_submodule(f"{prefix}.{view.positions[layer]}")
        for name, mod in block.named_modules():
            if not isinstance(mod, LoRALinear):
                continue
            module_path = f"{prefix}.{layer}.{name}"
            targets.append(module_path)
            fan_in_fan_out = fan_in_fan_out or not isinstance(mod.base, nn.Linear)
            for part in ("lora_A", "lora_B"):
                w = getattr(mod, part).weight
                tensors[f"base_model.model.{module_path}.{part}.weight"] = (
                    w.detach().cpu().contiguous().clone()
                )
    modules_to_save = None
    if view.spec.trains_head:
        head_names = [
            n.removeprefix(HEAD_PREFIX) for n in view.named_parameters() if n.startswith(HEAD_PREFIX)
        ]
        modules_to_save = sorted({n.rsplit(".", 1)[0] for n in head_names})
        params = dict(model.named_parameters())
        for n in head_names:
            tensors[f"base_model.model.{n}"] = params[n].detach().cpu().contiguous().clone()
    from peft import LoraConfig

    config = LoraConfig(
        task_type=_PEFT_TASK[task],
        r=view.spec.lora_rank,
        lora_alpha=view.spec.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        target_modules=targets,
        modules_to_save=modules_to_save,
        init_lora_weights=True,
        inference_mode=True,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config.save_pretrained(str(out_dir))  # adapter_config.json, written by PEFT itself
