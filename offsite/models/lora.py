"""A minimal LoRA layer that we own end to end.

We do not train through PEFT's LoRA: DP needs to see every trainable matmul as a plain
``nn.Linear`` (PEFT + Opacus has silently corrupted LoRA updates, Opacus issue 820).
PEFT remains the export format (see ``offsite.models.plugin``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or GPT-2's transposed ``Conv1D``."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        in_f, out_f = layer.weight.shape
        return in_f, out_f
    raise TypeError(f"not a linear layer: {type(layer).__name__}")


def is_linear(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.Linear, Conv1D))


class LoRALinear(nn.Module):
    """``base(x) + scaling · B(A(x))`` with ``base`` frozen, ``A``/``B`` trainable ``nn.Linear``s."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        in_f, out_f = linear_dims(base)
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        dtype = base.weight.dtype
        self.lora_A = nn.Linear(in_f, rank, bias=False, dtype=dtype, device=base.weight.device)
        self.lora_B = nn.Linear(rank, out_f, bias=False, dtype=dtype, device=base.weight.device)
        # PEFT's default initialisation: A Kaiming-uniform, B zero, so the layer starts as `base`.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaling the rank-r activation rather than the output saves a full-width elementwise pass,
        # and adding in place into the base output (which no backward needs) saves an allocation.
        return self.base(x).add_(self.lora_B(self.lora_A(x) * self.scaling))

    def delta_weight(self) -> torch.Tensor:
        """The update in the base layer's own weight layout (Conv1D stores (in, out))."""
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling, isinstance(self.base, Conv1D))

    def merged(self) -> nn.Module:
        with torch.no_grad():
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base


def linear_names(block: nn.Module) -> list[str]:
    """Names, inside ``block``, of every linear/Conv1D layer: the LoRA targets."""
    return [name for name, mod in block.named_modules() if is_linear(mod)]


def inject_lora(block: nn.Module, rank: int, alpha: float) -> list[str]:
    """Wrap every linear layer of ``block`` in a ``LoRALinear``; return the wrapped names."""
    names = linear_names(block)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return names


def initial_lora(block: nn.Module, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Starting LoRA matrices for every linear layer of ``block`` (which may be a meta-device
    skeleton), named as inside the block after ``inject_lora`` (``<linear>.lora_A.weight``): float32,
    A Kaiming-uniform as ``LoRALinear`` draws it, from ``generator`` (linears in module order), B zero."""
    out = {}
    for name in linear_names(block):
        in_f, out_f = linear_dims(block.get_submodule(name))
        a = torch.empty(rank, in_f)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        out[f"{name}.lora_A.weight"] = a
        out[f"{name}.lora_B.weight"] = torch.zeros(out_f, rank)
    return out


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, conv1d: bool) -> torch.Tensor:
    """``scaling · B A`` in the base layer's weight layout (Conv1D stores (in, out)): the one formula
    behind ``LoRALinear.delta_weight`` and the streamed merge of ``offsite.models.plugin``."""
    delta = (b @ a) * scaling
    return delta.T if conv1d else delta


def merge_lora(module: nn.Module) -> None:
    """Replace every ``LoRALinear`` under ``module`` by its base layer with the update merged in."""
    for name, mod in list(module.named_modules()):
        if isinstance(mod, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, mod.merged())
