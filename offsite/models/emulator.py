"""Emulator surgery: keep the adapter blocks and a uniform subset of the middle blocks.

The emulator is a real checkpoint of the same model class with fewer layers, so that
``from_pretrained`` loads it and generation with a KV cache works: it is built from a
config with ``num_hidden_layers`` = bottom + K + top (per-layer config entries subset),
which also numbers each attention's ``layer_idx`` by its new position.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from offsite.errors import OffsiteError
from offsite.models.registry import architecture_for, blocks_path, check_layout, num_layers


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
    prefix = blocks_path(model) + "."
    source = model.state_dict()
    mapped = {}
    for name in emulator.state_dict():
        if name.startswith(prefix):
            pos, _, rest = name[len(prefix) :].partition(".")
            name_in_source = f"{prefix}{layer_map[int(pos)]}.{rest}"
        else:
            name_in_source = name
        mapped[name] = source[name_in_source]
    with torch.no_grad():
        emulator.load_state_dict(mapped, strict=True)
    if getattr(model.config, "tie_word_embeddings", False):
        emulator.tie_weights()
    emulator.eval()
    return emulator
