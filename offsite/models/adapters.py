"""Adapters: which parameters the data owner trains, and how they are named.

Adapter tensors are named by **full-model** layer index, whatever model they sit in:
``layers.22.mlp.up_proj.weight`` (whole blocks), ``layers.22.mlp.up_proj.lora_A.weight``
(LoRA), and for encoders' new classification head and pooler ``head.<parameter name>``.
The same adapter therefore fits the emulator (where layer 22 may sit at position 5) and
the full model, and plug-in is by explicit index, never by position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from offsite.device import to_cpu
from offsite.formats.safetensors_writer import TensorOut, tensor_out
from offsite.formats.spec import BLOCKS, HEAD_PREFIX, LORA, AdapterSpec
from offsite.models.lora import LoRALinear, initial_lora, inject_lora
from offsite.models.registry import Task, architecture_for, base_prefix, blocks_path, get_blocks

__all__ = [
    "BLOCKS",
    "HEAD_PREFIX",
    "LORA",
    "AdapterSpec",
    "AdapterView",
    "adapter_layers",
    "head_parameter_names",
    "identity_positions",
    "initial_adapter",
    "positions_from_layer_map",
    "task_of",
]


def adapter_layers(total: int, bottom: int, top: int) -> tuple[int, ...]:
    return tuple(range(bottom)) + tuple(range(total - top, total))


def head_parameter_names(model: nn.Module) -> list[str]:
    """Encoders' trainable head: everything outside the base model, plus the pooler."""
    arch = architecture_for(model.config.model_type)
    prefix = base_prefix(model)
    names = [n for n, _ in model.named_parameters() if not n.startswith(prefix)]
    if arch.pooler:
        names += [n for n, _ in model.named_parameters() if n.startswith(f"{prefix}{arch.pooler}.")]
    return names


class AdapterView:
    """Binds an adapter spec to one concrete model (full model or emulator).

    ``positions`` maps full-model layer index -> block position in this model
    (identity for the full model; the manifest's map for an emulator).
    """

    def __init__(self, model: nn.Module, spec: AdapterSpec, positions: Mapping[int, int]):
        self.model = model
        self.spec = spec
        self.positions = dict(positions)
        missing = [i for i in spec.layers if i not in self.positions]
        if missing:
            raise ValueError(f"adapter layers {missing} are not in this model")
        self._blocks = get_blocks(model)

    # -- set-up ---------------------------------------------------------------
    def attach(self) -> None:
        """Freeze everything, then make (only) the adapter trainable; LoRA is injected here."""
        self.model.requires_grad_(False)
        for layer in self.spec.layers:
            block = self._blocks[self.positions[layer]]
            if self.spec.kind == LORA:
                if not any(isinstance(m, LoRALinear) for m in block.modules()):
                    inject_lora(block, self.spec.lora_rank, self.spec.lora_alpha)
                for m in block.modules():
                    if isinstance(m, LoRALinear):
                        m.lora_A.weight.requires_grad_(True)
                        m.lora_B.weight.requires_grad_(True)
            else:
                block.requires_grad_(True)
        if self.spec.trains_head:
            params = dict(self.model.named_parameters())
            for name in head_parameter_names(self.model):
                params[name].requires_grad_(True)

    # -- naming ---------------------------------------------------------------
    def named_parameters(self) -> dict[str, nn.Parameter]:
        """Adapter name -> live parameter of this model."""
        out: dict[str, nn.Parameter] = {}
        for layer in self.spec.layers:
            block = self._blocks[self.positions[layer]]
            for name, p in block.named_parameters():
                if self.spec.kind == LORA and ".lora_" not in name:
                    continue
                out[f"layers.{layer}.{name}"] = p
        if self.spec.trains_head:
            params = dict(self.model.named_parameters())
            for name in head_parameter_names(self.model):
                out[HEAD_PREFIX + name] = params[name]
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: to_cpu(v.detach()).contiguous().clone() for k, v in self.named_parameters().items()}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` in by name; the set of names must match exactly."""
        live = self.named_parameters()
        if set(live) != set(tensors):
            extra = sorted(set(tensors) - set(live))[:5]
            missing = sorted(set(live) - set(tensors))[:5]
            raise ValueError(f"adapter tensors do not match the model: unexpected {extra}, missing {missing}")
        with torch.no_grad():
            for name, p in live.items():
                p.copy_(tensors[name].to(p.dtype))


def task_of(model: nn.Module) -> Task:
    arch = architecture_for(model.config.model_type)
    if not arch.is_encoder:
        return Task.CAUSAL_LM
    return Task.SEQ_CLS if hasattr(model, "classifier") else Task.MASKED_LM


def identity_positions(total: int) -> dict[int, int]:
    return {i: i for i in range(total)}


def positions_from_layer_map(layer_map: Sequence[int]) -> dict[int, int]:
    return {orig: pos for pos, orig in enumerate(layer_map)}


def initial_adapter(plan, spec: AdapterSpec, seed: int) -> list[TensorOut]:
    """The adapter a bundle ships (``initial_adapter.safetensors``), from an ``EmulatorPlan``, without
    the model in memory: whole adapter blocks are the checkpoint's tensors (the emulator's own);
    LoRA matrices start as PEFT's (A Kaiming-uniform from ``seed``, B zero, so each layer starts as
    its base); a trained head starts as the emulator's."""
    model = plan.model
    blocks = get_blocks(model)
    positions = positions_from_layer_map(plan.layer_map)
    path = blocks_path(model)
    out: list[TensorOut] = []
    generator = torch.Generator().manual_seed(seed)
    for layer in spec.layers:
        block = blocks[positions[layer]]
        if spec.kind == LORA:
            lora = initial_lora(block, spec.lora_rank, generator)
            out += [tensor_out(f"layers.{layer}.{n}", t.to(plan.dtype)) for n, t in lora.items()]
        else:
            for name, _ in block.named_parameters():
                out.append(plan.out(f"{path}.{positions[layer]}.{name}", f"layers.{layer}.{name}"))
    if spec.trains_head:
        out += [plan.out(name, HEAD_PREFIX + name) for name in head_parameter_names(model)]
    return out
