"""Writing Hugging Face checkpoints tensor by tensor, without ever holding the model in memory.

A model *skeleton* (the model class built on the ``meta`` device: names, shapes, dtypes, tied
weights, but no memory) says what ``save_pretrained`` would write: the state dict without tied
aliases (``saved_names``), the config with the dtype and class it records, and the generation
config (``write_config``). The tensors themselves come from the source checkpoint one at a time
(``offsite.formats.checkpoint_files``); the few that are new (an encoder's new classification head)
are initialised here with the model's own initialisation, from a fixed seed, one module at a time.
Emulator surgery (``offsite.models.emulator.write_emulator``) and plug-in
(``offsite.models.plugin.write_merged``) are built on this; both give the same tensors as loading the
model whole and calling ``save_pretrained`` (``tests/test_streaming.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from offsite.errors import FormatError
from offsite.formats.checkpoint_files import CheckpointFiles
from offsite.models.registry import Task


def skeleton(config: PretrainedConfig, task: Task, dtype: torch.dtype) -> nn.Module:
    """The model class of ``task`` for ``config`` on the meta device, in ``dtype``: no memory."""
    from offsite.models.loading import auto_class

    with torch.device("meta"):
        model = auto_class(task).from_config(config)
    return model.to(dtype)


def saved_names(model: nn.Module) -> list[str]:
    """The state-dict names ``save_pretrained`` writes for ``model`` (tied aliases removed), in
    state-dict order."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    kept = remove_tied_weights_from_state_dict(dict(state), model)
    return [name for name in state if name in kept]


def write_config(model: nn.Module, directory: Path) -> None:
    """``config.json`` (and ``generation_config.json`` for generative models) exactly as
    ``save_pretrained`` writes them for ``model``."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    model.config.dtype = str(dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model`` counted once each (the ``total_parameters`` of a sharded index)."""
    return sum(p.numel() for p in model.parameters())


def add_legacy_names(source: CheckpointFiles) -> None:
    """Let ``source`` answer to the current names of tensors stored under legacy ones (old BERT
    checkpoints' ``LayerNorm.gamma``/``beta``), by the renaming rules transformers loads them with."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renamings = [
        r for r in get_checkpoint_conversion_mapping("legacy") or [] if isinstance(r, WeightRenaming)
    ]
    for stored in list(source.tensors):
        name = stored
        for renaming in renamings:
            name = renaming.rename_source_key(name)[0]
        if name != stored and name not in source.tensors:
            source.aliases[name] = stored


def initialise(
    model: nn.Module, names: Iterable[str], seed: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """New values for the parameters ``names`` of skeleton ``model`` (parameters the checkpoint does
    not hold: a new classification head), by the model's own ``_init_weights``, from ``seed``. Only
    the modules owning them are materialised, on the CPU."""
    names = sorted(names)
    owners = sorted({n.rpartition(".")[0] for n in names})
    out: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for owner in owners:
            module = model.get_submodule(owner)
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
            for local, p in module.named_parameters(recurse=False):
                full = f"{owner}.{local}" if owner else local
                if full in names:
                    out[full] = p.detach().to(dtype).contiguous()
    missing = sorted(set(names) - set(out))
    if missing:
        raise FormatError(f"cannot initialise {missing[:3]}: not parameters of {type(model).__name__}")
    return out
