"""The architecture registry: the only code that knows where a family keeps its blocks.

Everything else (emulator surgery, adapters, plug-in, distillation, DP training)
asks this module for paths and never hard-codes a family's layout.

Paths are relative to the model's *base model* (``model.base_model``: ``transformer``
for GPT-2 and BLOOM, ``model`` for OPT and the LLaMA family, ``bert``/``roberta`` for
encoders), so one entry serves every head class of a family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from torch import nn

from offsite.errors import UnsupportedArchitectureError


class Task(str, Enum):
    CAUSAL_LM = "causal-lm"
    SEQ_CLS = "seq-cls"
    MASKED_LM = "masked-lm"


@dataclass(frozen=True)
class Architecture:
    family: str
    model_types: tuple[str, ...]
    tasks: tuple[Task, ...]
    blocks: str
    """Dotted path, from the base model, of the ModuleList of transformer blocks."""
    frozen: tuple[str, ...]
    """Every non-block child of the base model; all frozen (embeddings, position
    embeddings, projections, norms). Optional parts may be absent from a checkpoint."""
    pooler: str | None = None
    """Encoders: the pooler, trained with the new classification head (seq-cls only)."""
    per_layer_config_keys: tuple[str, ...] = field(default=())
    """Config entries holding one value per block; subset when blocks are dropped."""

    @property
    def is_encoder(self) -> bool:
        return Task.CAUSAL_LM not in self.tasks


_DECODER = (Task.CAUSAL_LM,)
_ENCODER = (Task.SEQ_CLS, Task.MASKED_LM)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("gpt2", ("gpt2",), _DECODER, blocks="h", frozen=("wte", "wpe", "drop", "ln_f")),
    Architecture(
        "opt",
        ("opt",),
        _DECODER,
        blocks="decoder.layers",
        frozen=(
            "decoder.embed_tokens",
            "decoder.embed_positions",
            "decoder.project_in",
            "decoder.project_out",
            "decoder.final_layer_norm",
        ),
    ),
    Architecture(
        "llama",
        ("llama", "mistral", "qwen2"),
        _DECODER,
        blocks="layers",
        frozen=("embed_tokens", "norm", "rotary_emb"),
        per_layer_config_keys=("layer_types",),
    ),
    Architecture(
        "bloom",
        ("bloom",),
        _DECODER,
        blocks="h",
        frozen=("word_embeddings", "word_embeddings_layernorm", "ln_f"),
    ),
    Architecture(
        "bert",
        ("bert", "roberta"),
        _ENCODER,
        blocks="encoder.layer",
        # token-type embeddings, position embeddings and the embedding norm live in `embeddings`.
        frozen=("embeddings", "pooler"),
        pooler="pooler",
    ),
)

_BY_MODEL_TYPE = {mt: arch for arch in ARCHITECTURES for mt in arch.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def architecture_for(model_type: str) -> Architecture:
    """The registry entry for a config's ``model_type``, or a clear error listing what is supported."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        ) from None


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def base_prefix(model: nn.Module) -> str:
    """Parameter-name prefix of the base model inside ``model`` ('' when model is the base)."""
    prefix = model.base_model_prefix
    return f"{prefix}." if hasattr(model, prefix) and model.base_model is not model else ""


def blocks_path(model: nn.Module) -> str:
    """Full dotted path of the block list inside ``model`` (e.g. ``model.layers``)."""
    arch = architecture_for(model.config.model_type)
    return base_prefix(model) + arch.blocks


def get_blocks(model: nn.Module) -> nn.ModuleList:
    blocks = model.get_submodule(blocks_path(model))
    assert isinstance(blocks, nn.ModuleList)
    return blocks


def num_layers(config) -> int:
    return int(config.num_hidden_layers)


def model_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The parts a model is placed and cast by (``offsite.device``): each block, each non-block part
    of the base model the registry names, and each child of the model outside its base model (the
    head). Together they hold every parameter of a model ``check_layout`` accepts."""
    arch = architecture_for(model.config.model_type)
    prefix = base_prefix(model)
    parts = [(f"{blocks_path(model)}.{i}", block) for i, block in enumerate(get_blocks(model))]
    for path in arch.frozen:
        part = _get(model.base_model, path)
        if part is not None:
            parts.append((prefix + path, part))
    if prefix:
        base_name = prefix.removesuffix(".")
        parts += [(name, child) for name, child in model.named_children() if name != base_name]
    return parts


def split_block_name(name: str, blocks: str) -> tuple[int, str] | None:
    """``(index, rest)`` of a tensor name inside the block list ``blocks`` (``blocks_path``), e.g.
    ``model.layers.22.mlp.up_proj.weight`` -> ``(22, "mlp.up_proj.weight")``; None outside it."""
    head = blocks + "."
    if not name.startswith(head):
        return None
    index, sep, rest = name[len(head) :].partition(".")
    if not sep or not index.isdigit():
        return None
    return int(index), rest


def block_name(blocks: str, index: int, rest: str) -> str:
    """The inverse of ``split_block_name``."""
    return f"{blocks}.{index}.{rest}"


def renumber_blocks(name: str, blocks: str, index_map: dict[int, int] | list[int]) -> str:
    """``name`` with its block index ``i`` replaced by ``index_map[i]`` (names outside the blocks
    unchanged): how emulator surgery maps emulator positions to source layers."""
    found = split_block_name(name, blocks)
    if found is None:
        return name
    index, rest = found
    return block_name(blocks, index_map[index], rest)


def check_layout(model: nn.Module) -> Architecture:
    """Check that the registry accounts for every part of the base model.

    A variant with a part the registry does not know (a new norm, a new projection)
    must fail loudly here rather than be silently treated as frozen or dropped.
    """
    arch = architecture_for(model.config.model_type)
    base = model.base_model
    known_roots = {arch.blocks.split(".")[0]} | {p.split(".")[0] for p in arch.frozen}
    unknown = [name for name, _ in base.named_children() if name not in known_roots]
    nested = {p.rsplit(".", 1)[0] for p in (arch.blocks, *arch.frozen) if "." in p}
    for parent in nested:
        parent_mod = _get(base, parent)
        if parent_mod is None:
            continue
        known = {p.split(".", 1)[1] for p in (arch.blocks, *arch.frozen) if p.startswith(parent + ".")}
        unknown += [f"{parent}.{n}" for n, _ in parent_mod.named_children() if n not in known]
    if unknown:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has parts the {arch.family!r} registry entry does not know: "
            f"{', '.join(unknown)}"
        )
    return arch
