"""Loading local Hugging Face checkpoints (never from a hub) and fingerprinting them."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from offsite.errors import FormatError, OffsiteError
from offsite.fileio import canonical_json, sha256_bytes, sha256_file
from offsite.models.registry import Task, architecture_for

_AUTO = {
    Task.CAUSAL_LM: AutoModelForCausalLM,
    Task.SEQ_CLS: AutoModelForSequenceClassification,
    Task.MASKED_LM: AutoModelForMaskedLM,
}


def _check_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise OffsiteError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    if any(path.glob("*.bin")) and not any(path.glob("*.safetensors")):
        raise FormatError(f"{path} holds only pickle-based .bin weights; offsite loads safetensors only")
    return path


def load_config(path: str | os.PathLike, num_labels: int | None = None) -> PretrainedConfig:
    """The checkpoint's config; ``num_labels`` as ``from_pretrained(num_labels=...)`` applies it."""
    kwargs = {} if num_labels is None else {"num_labels": num_labels}
    return AutoConfig.from_pretrained(_check_dir(path), local_files_only=True, **kwargs)


def auto_class(task: Task):
    """The ``transformers`` Auto class a task's models are loaded with."""
    return _AUTO[task]


def load_dtype(config: PretrainedConfig, stored: torch.dtype) -> torch.dtype:
    """What ``from_pretrained(dtype="auto")`` loads in: the config's dtype, else ``stored`` (the
    weights' own)."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else stored


def task_from_config(config: PretrainedConfig, num_labels: int | None = None) -> Task:
    """The task a checkpoint is used for: decoders are causal LMs; encoders classify when
    given labels (or were saved as classifiers), else they are masked LMs."""
    arch = architecture_for(config.model_type)
    if not arch.is_encoder:
        return Task.CAUSAL_LM
    saved = " ".join(config.architectures or [])
    if num_labels is not None or "SequenceClassification" in saved:
        return Task.SEQ_CLS
    return Task.MASKED_LM


def load_model(
    path: str | os.PathLike,
    task: Task | None = None,
    dtype: torch.dtype | str = "auto",
    num_labels: int | None = None,
    *,
    device_map: str | dict | None = None,
    **placement: object,
) -> nn.Module:
    """Load a local checkpoint with the Auto class of its task.

    ``dtype="auto"`` keeps the checkpoint's dtype (used when writing files); training and
    exactness checks pass ``torch.float32``. ``device_map`` (from ``offsite.device``: a device, or
    accelerate's per-module map for a teacher too large for one device) and any further placement
    arguments (``max_memory``, ``offload_folder``) go to ``from_pretrained``; by default the model is
    loaded on the CPU.
    """
    path = _check_dir(path)
    config = load_config(path)
    task = task or task_from_config(config, num_labels)
    kwargs: dict = dict(placement)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if task is Task.SEQ_CLS and num_labels is not None:
        kwargs["num_labels"] = num_labels
    model = _AUTO[task].from_pretrained(
        path, dtype=dtype, local_files_only=True, use_safetensors=True, **kwargs
    )
    model.eval()
    return model


def load_placed(
    path: str | os.PathLike, task: Task | None = None, num_labels: int | None = None
) -> nn.Module:
    """A model that only runs forward passes, on the current placement (``offsite.device``): loaded
    onto its device with every part in its frozen dtype."""
    from offsite import device

    placement = device.current()
    return placement.place(load_model(path, task, num_labels=num_labels, **placement.load_kwargs()))


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(Path(path), local_files_only=True)
    if tok.pad_token is None:
        # Padding is only ever masked out; any existing special token will do.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def model_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the config and every weight file of a checkpoint directory.

    Cheap to recompute at plug-in time and independent of how tensors are laid out in memory.
    """
    path = _check_dir(path)
    files = sorted(p.name for p in path.iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
    table = {name: sha256_file(path / name) for name in files}
    return sha256_bytes(canonical_json(table))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f"unknown dtype {name!r}")
    return dtype
