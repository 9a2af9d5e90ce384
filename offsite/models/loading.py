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


def load_config(path: str | os.PathLike) -> PretrainedConfig:
    return AutoConfig.from_pretrained(_check_dir(path), local_files_only=True)


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
) -> nn.Module:
    """Load a local checkpoint with the Auto class of its task.

    ``dtype="auto"`` keeps the checkpoint's dtype (used when writing files); training and
    exactness checks pass ``torch.float32``.
    """
    path = _check_dir(path)
    config = load_config(path)
    task = task or task_from_config(config, num_labels)
    kwargs = {}
    if task is Task.SEQ_CLS and num_labels is not None:
        kwargs["num_labels"] = num_labels
    model = _AUTO[task].from_pretrained(
        path, dtype=dtype, local_files_only=True, use_safetensors=True, **kwargs
    )
    model.eval()
    return model


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
