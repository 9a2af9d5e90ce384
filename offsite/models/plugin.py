"""Plug-in: put a trained adapter back into the full model, by explicit layer index.

``write_merged`` and ``write_peft`` (what ``offsite owner plug`` runs) stream the merged model from the
checkpoint's files: each tensor is copied, or replaced by the adapter's, or (LoRA) merged with its
update, one tensor at a time, so the full model is never in memory. ``plug_in``, ``merge`` and
``export_peft`` do the same to a model in memory (the reference the streamed output is tested
against).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from offsite.device import to_cpu
from offsite.errors import FormatError
from offsite.formats.checkpoint_files import CheckpointFiles
from offsite.formats.safetensors_writer import (
    DEFAULT_SHARD_BYTES,
    TensorOut,
    lazy_out,
    tensor_out,
    write_weights,
)
from offsite.models.adapters import (
    HEAD_PREFIX,
    LORA,
    AdapterSpec,
    AdapterView,
    head_parameter_names,
    identity_positions,
)
from offsite.models.lora import LoRALinear, linear_names, lora_delta, merge_lora
from offsite.models.registry import Task, base_prefix, blocks_path, check_layout, get_blocks, num_layers

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
                    to_cpu(w.detach()).contiguous().clone()
                )
    modules_to_save = None
    if view.spec.trains_head:
        head_names = [
            n.removeprefix(HEAD_PREFIX) for n in view.named_parameters() if n.startswith(HEAD_PREFIX)
        ]
        modules_to_save = sorted({n.rsplit(".", 1)[0] for n in head_names})
        params = dict(model.named_parameters())
        for n in head_names:
            tensors[f"base_model.model.{n}"] = to_cpu(params[n].detach()).contiguous().clone()
    _save_peft(tensors, out_dir, task, view.spec, targets, fan_in_fan_out, modules_to_save)


def _save_peft(
    tensors: dict[str, torch.Tensor],
    out_dir: Path,
    task: Task,
    spec: AdapterSpec,
    targets: list[str],
    fan_in_fan_out: bool,
    modules_to_save: list[str] | None,
) -> None:
    from peft import LoraConfig

    config = LoraConfig(
        task_type=_PEFT_TASK[task],
        r=spec.lora_rank,
        lora_alpha=spec.lora_alpha,
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


# -- streamed from the checkpoint's files ---------------------------------------------------------
def merged_entries(
    model: nn.Module, source: CheckpointFiles, spec: AdapterSpec, tensors: Mapping[str, torch.Tensor]
) -> list[TensorOut]:
    """Every tensor of the merged model (``model``: the full model's skeleton, in the dtype to write):
    the checkpoint's, except the adapter's parameters: whole blocks and a head replaced, LoRA layers'
    weights merged with ``scaling · B A`` exactly as ``LoRALinear.merged`` does (in the model's dtype)."""
    from offsite.models.streaming import saved_names

    check_layout(model)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    prefix, path, state = base_prefix(model), blocks_path(model), model.state_dict()
    replaced: dict[str, torch.Tensor] = {}
    merged: dict[str, tuple[str, str, bool]] = {}  # weight name -> (lora_A name, lora_B name, Conv1D)
    blocks = get_blocks(model)
    for layer in spec.layers:
        block = blocks[layer]
        if spec.kind == LORA:
            for name in linear_names(block):
                adapter = f"layers.{layer}.{name}"
                conv1d = isinstance(block.get_submodule(name), Conv1D)
                merged[f"{path}.{layer}.{name}.weight"] = (
                    f"{adapter}.lora_A.weight",
                    f"{adapter}.lora_B.weight",
                    conv1d,
                )
        else:
            for name, _ in block.named_parameters():
                replaced[f"{path}.{layer}.{name}"] = tensors[f"layers.{layer}.{name}"]
    if spec.trains_head:
        for name in head_parameter_names(model):
            replaced[name] = tensors[HEAD_PREFIX + name]
    scaling = spec.lora_alpha / spec.lora_rank if spec.kind == LORA else 0.0
    out = []
    for name in saved_names(model):
        shape = tuple(state[name].shape)
        if name in replaced:
            t = replaced[name]
            out.append(tensor_out(name, t if t.dtype == state[name].dtype else t.to(state[name].dtype)))
            continue
        stored = source.find(name, prefix)
        if tuple(source.tensors[stored].shape) != shape:
            raise FormatError(
                f"{source.directory}: tensor {stored} has shape {list(source.tensors[stored].shape)}, "
                f"the model's config says {list(shape)}"
            )
        if name in merged:
            a, b, conv1d = merged[name]

            def make(stored=stored, a=tensors[a], b=tensors[b], conv1d=conv1d) -> torch.Tensor:
                weight = source.read(stored, dtype)
                # As LoRALinear: A and B in the base's dtype, the product scaled, added in place.
                weight += lora_delta(a.to(dtype), b.to(dtype), scaling, conv1d).to(dtype)
                return weight

            out.append(lazy_out(name, dtype, shape, make))
        else:
            out.append(source.out(stored, name, dtype))
    return out


def write_merged(
    model: nn.Module,
    source: CheckpointFiles,
    spec: AdapterSpec,
    tensors: Mapping[str, torch.Tensor],
    directory: Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """The merged model in ``directory`` (config, weights sharded as ``save_pretrained`` shards)."""
    from offsite.models.streaming import parameter_count, write_config

    entries = merged_entries(model, source, spec, tensors)
    directory.mkdir(parents=True, exist_ok=True)
    write_config(model, directory)
    write_weights(
        directory, entries, max_shard_bytes=max_shard_bytes, total_parameters=parameter_count(model)
    )


def write_peft(
    model: nn.Module, spec: AdapterSpec, tensors: Mapping[str, torch.Tensor], out_dir: Path, task: Task
) -> None:
    """``export_peft`` from the adapter's tensors and the full model's skeleton: the same files."""
    if spec.kind != LORA:
        raise ValueError("only LoRA adapters have a PEFT form")
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    path, blocks = blocks_path(model), get_blocks(model)
    targets: list[str] = []
    peft: dict[str, torch.Tensor] = {}
    fan_in_fan_out = False
    for layer in spec.layers:
        block = blocks[layer]
        for name in linear_names(block):
            module_path = f"{path}.{layer}.{name}"
            targets.append(module_path)
            fan_in_fan_out = fan_in_fan_out or not isinstance(block.get_submodule(name), nn.Linear)
            for part in ("lora_A", "lora_B"):
                peft[f"base_model.model.{module_path}.{part}.weight"] = tensors[
                    f"layers.{layer}.{name}.{part}.weight"
                ].to(dtype)
    head_names = head_parameter_names(model) if spec.trains_head else []
    for n in head_names:
        peft[f"base_model.model.{n}"] = tensors[HEAD_PREFIX + n].to(dtype)
    modules_to_save = sorted({n.rsplit(".", 1)[0] for n in head_names}) or None
    _save_peft(peft, out_dir, task, spec, targets, fan_in_fan_out, modules_to_save)
