"""Emulator surgery: keep the adapter blocks and a uniform subset of the middle blocks.

The emulator is a real checkpoint of the same model class with fewer layers, so that
``from_pretrained`` loads it and generation with a KV cache works: it is built from a
config with ``num_hidden_layers`` = bottom + K + top (per-layer config entries subset),
which also numbers each attention's ``layer_idx`` by its new position.

Two ways to make it, with the same tensors: ``plan_emulator`` + ``write_emulator`` stream it from
the checkpoint's files tensor by tensor (``offsite owner prepare``: the full model is never in
memory), and ``build_emulator`` copies it out of a model in memory (the reference the streamed
one is tested against, and the benchmarks).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from offsite.errors import FormatError, OffsiteError
from offsite.formats.checkpoint_files import CheckpointFiles
from offsite.formats.safetensors_writer import DEFAULT_SHARD_BYTES, TensorOut, tensor_out, write_weights
from offsite.models.registry import (
    Task,
    architecture_for,
    base_prefix,
    blocks_path,
    check_layout,
    num_layers,
    renumber_blocks,
)


def kept_middle_indices(num_middle: int, keep: int) -> list[int]:
    """Uniform layer-drop as in the reference: middle index round(i·(M−1)/(K−1)), i < K.

    The first and last middle blocks always stay. Uses Python's round (banker's rounding),
    as the reference implementation does.
    """
    if not 1 <= keep <= num_middle:
        raise OffsiteError(
            f"--emulator-layers must be between 1 and {num_middle} (middle blocks), got {keep}"
        )
    if keep == 1:
        return [0]
    return [round(i * (num_middle - 1) / (keep - 1)) for i in range(keep)]


def default_emulator_layers(total: int, bottom: int, top: int) -> int:
    middle = total - bottom - top
    return -(-middle // 2)  # ceil(M / 2)


def emulator_layer_map(total: int, bottom: int, top: int, keep: int | None) -> list[int]:
    """Emulator position -> original layer index."""
    if bottom < 0 or top < 0:
        raise OffsiteError("--adapter-bottom and --adapter-top must be non-negative")
    if bottom + top >= total:
        raise OffsiteError(
            f"--adapter-bottom {bottom} + --adapter-top {top} must be less than the model's {total} blocks"
        )
    middle = total - bottom - top
    keep = default_emulator_layers(total, bottom, top) if keep is None else keep
    kept = [bottom + i for i in kept_middle_indices(middle, keep)]
    return list(range(bottom)) + kept + list(range(total - top, total))


def subset_config(config, layer_map: list[int]):
    """A copy of ``config`` describing only the blocks in ``layer_map``."""
    arch = architecture_for(config.model_type)
    total = num_layers(config)
    new = copy.deepcopy(config)
    new.num_hidden_layers = len(layer_map)
    for key in arch.per_layer_config_keys:
        values = getattr(config, key, None)
        if values is not None:
            if len(values) != total:
                raise OffsiteError(f"config.{key} has {len(values)} entries for {total} layers")
            setattr(new, key, [values[i] for i in layer_map])
    return new


def build_emulator(model: nn.Module, layer_map: list[int]) -> nn.Module:
    """A new model of ``model``'s class holding the blocks of ``layer_map`` and every frozen part."""
    check_layout(model)
    config = subset_config(model.config, layer_map)
    dtype = next(model.parameters()).dtype
    emulator = type(model)(config).to(dtype)
    blocks = blocks_path(model)
    source = model.state_dict()
    mapped = {name: source[renumber_blocks(name, blocks, layer_map)] for name in emulator.state_dict()}
    with torch.no_grad():
        emulator.load_state_dict(mapped, strict=True)
    if getattr(model.config, "tie_word_embeddings", False):
        emulator.tie_weights()
    emulator.eval()
    return emulator


# -- streamed from the checkpoint's files ---------------------------------------------------------
@dataclass
class EmulatorPlan:
    """What the emulator of a checkpoint holds and where each of its tensors comes from."""

    model: nn.Module
    """The emulator's skeleton (meta device): names, shapes, dtype."""
    layer_map: list[int]
    source: CheckpointFiles
    dtype: torch.dtype
    new: dict[str, torch.Tensor]
    """Parameters the checkpoint does not hold (a new classification head), initialised from the seed."""

    def source_name(self, name: str) -> str:
        """The checkpoint's name for emulator tensor ``name`` (block positions renumbered to layers)."""
        return self.source.find(
            renumber_blocks(name, blocks_path(self.model), self.layer_map), base_prefix(self.model)
        )

    def out(self, name: str, as_name: str | None = None) -> TensorOut:
        """Emulator tensor ``name``, written as ``as_name`` (default: its own name)."""
        as_name = as_name or name
        if name in self.new:
            return tensor_out(as_name, self.new[name])
        return self.source.out(self.source_name(name), as_name, self.dtype)

    def entries(self, replace: dict[str, torch.Tensor] | None = None) -> list[TensorOut]:
        """Every tensor of the emulator in state-dict order; ``replace`` (name -> CPU tensor in the
        emulator's dtype) overrides some (distilled blocks)."""
        from offsite.models.streaming import saved_names

        replace = replace or {}
        return [tensor_out(n, replace[n]) if n in replace else self.out(n) for n in saved_names(self.model)]


def plan_emulator(
    source: CheckpointFiles, config, task: Task, layer_map: list[int], dtype: torch.dtype, seed: int
) -> EmulatorPlan:
    """Plan the emulator of ``layer_map``: every tensor found in ``source`` with the shape the model
    expects; only an encoder's new classification head (and a pooler the checkpoint lacks) may be
    missing, and is initialised from ``seed``."""
    from offsite.models.adapters import head_parameter_names
    from offsite.models.streaming import initialise, saved_names, skeleton

    model = skeleton(subset_config(config, layer_map), task, dtype)
    check_layout(model)
    plan = EmulatorPlan(model, list(layer_map), source, dtype, {})
    state = model.state_dict()
    missing = []
    for name in saved_names(model):
        try:
            stored = source.tensors[plan.source_name(name)]
        except FormatError:
            missing.append(name)
            continue
        if stored.shape != tuple(state[name].shape):
            raise FormatError(
                f"{source.directory}: tensor {plan.source_name(name)} has shape {list(stored.shape)}, "
                f"the model's config says {list(state[name].shape)}"
            )
    new_allowed = set(head_parameter_names(model)) if task is Task.SEQ_CLS else set()
    unexpected = [n for n in missing if n not in new_allowed]
    if unexpected:
        raise FormatError(f"{source.directory}: the checkpoint lacks {', '.join(unexpected[:3])}")
    plan.new = initialise(model, missing, seed, dtype)
    return plan


def write_emulator(
    plan: EmulatorPlan,
    directory: Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    replace: dict[str, torch.Tensor] | None = None,
) -> None:
    """The emulator checkpoint in ``directory`` (a new or emptied directory), as ``save_pretrained``
    lays it out (sharded past ``max_shard_bytes``), one tensor at a time."""
    from offsite.models.streaming import parameter_count, write_config

    directory.mkdir(parents=True, exist_ok=True)
    write_config(plan.model, directory)
    write_weights(
        directory,
        plan.entries(replace),
        max_shard_bytes=max_shard_bytes,
        total_parameters=parameter_count(plan.model),
    )
