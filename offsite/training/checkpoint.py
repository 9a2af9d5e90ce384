"""Resumable training state on disk: tensors in safetensors, everything else in JSON; never pickle.

Used by distillation and by DP training: the trained parameters and their AdamW moments
go to ``state.safetensors``; the step and whatever identifies the run go to ``state.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from offsite.fileio import canonical_json, read_json, write_bytes_atomic

TENSORS = "state.safetensors"
META = "state.json"


def exists(directory: Path) -> bool:
    return (directory / META).is_file()


def read_meta(directory: Path) -> dict:
    return read_json(directory / META, "training state")


def save(
    directory: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, meta: dict
) -> None:
    """Write parameters and AdamW moments first, then the JSON that makes them current."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in params.items()}
    for n, p in params.items():
        st = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                tensors[f"opt.{key}.{n}"] = st[key].contiguous()
        if "step" in st:
            tensors[f"opt.step.{n}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    tmp = directory / (TENSORS + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(directory / TENSORS)
    write_bytes_atomic(directory / META, canonical_json(meta))


def load(directory: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    """Restore parameters and AdamW moments in place; return the JSON metadata."""
    meta = read_meta(directory)
    tensors = load_file(str(directory / TENSORS))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
            if f"opt.exp_avg.{n}" in tensors:
                optimizer.state[p] = {
                    "step": tensors[f"opt.step.{n}"].reshape(()),
                    "exp_avg": tensors[f"opt.exp_avg.{n}"].clone(),
                    "exp_avg_sq": tensors[f"opt.exp_avg_sq.{n}"].clone(),
                }
    return meta
