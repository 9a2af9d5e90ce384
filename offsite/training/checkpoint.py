"""Resumable training state on disk, one atomic unit; safetensors and JSON, never pickle.

Used by distillation and by DP training. A state directory holds::

    state-<step>-<tag>.safetensors   trained parameters and AdamW moments at that step (0600)
    state.json                       the pointer, written last (0600):
                                     {format, format_version, tensors, tensors_sha256, meta}

``save`` writes the tensors to a new file named by its step (fsynced, then the directory), then
replaces ``state.json`` (temporary file, fsync, rename, directory fsync) so that it names the new
file and its sha256, and only then removes older tensor files. ``state.json`` is the commit point:
a process killed at any moment leaves the previous state or the new one, never tensors of one step
under the step count of another (which would redo steps on top of steps already applied).

``load`` reads each file once, checks the tensors' sha256 against the pointer, and checks that the
optimizer steps stored with the tensors equal ``meta["step"]``: the steps applied to the parameters
are the steps recorded. A state from an older version (two files written one after the other, with
no such guarantee) is refused, not resumed.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from offsite.device import to_device_of
from offsite.errors import FormatError, IntegrityError
from offsite.fileio import canonical_json, sha256_bytes, write_bytes_atomic
from offsite.formats.schema import Schema, parse

FORMAT = "offsite-train-state"
FORMAT_VERSION = 2
META = "state.json"
LEGACY_TENSORS = "state.safetensors"  # format 1: tensors and JSON written separately, not atomic
_TENSORS = re.compile(r"state-(\d{8,})-[0-9a-f]{8}\.safetensors")
#: A training state's tensors (adapter or emulator blocks plus two AdamW moments) may be large.
MAX_STATE_JSON_BYTES = 1 << 20


class _Pointer(Schema):
    format: Literal["offsite-train-state"]
    format_version: Literal[2]
    tensors: Annotated[str, Field(pattern=f"^{_TENSORS.pattern}$")]
    tensors_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    meta: dict[str, Any]


def exists(directory: Path) -> bool:
    """Whether ``directory`` holds a committed state (of any format version)."""
    return (Path(directory) / META).is_file()


def _read_pointer(directory: Path) -> _Pointer:
    path = Path(directory) / META
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise FormatError(f"training state: {path} does not exist") from e
    if (Path(directory) / LEGACY_TENSORS).exists() and b'"format"' not in data:
        raise FormatError(
            f"training state in {directory} was written by an older version of offsite, whose "
            "checkpoints were not atomic: it cannot be resumed safely"
        )
    pointer = parse(_Pointer, data, f"training state {path}", MAX_STATE_JSON_BYTES)
    if not isinstance(pointer.meta.get("step"), int) or pointer.meta["step"] < 0:
        raise FormatError(f"training state {path}: meta.step must be an integer >= 0")
    return pointer


def read_meta(directory: Path) -> dict:
    """The metadata of the committed state (``step`` and whatever identifies the run)."""
    return dict(_read_pointer(directory).meta)


def _tensors_of(params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer | None) -> dict:
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in params.items()}
    for n, p in params.items():
        st = optimizer.state.get(p, {}) if optimizer is not None else {}
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                tensors[f"opt.{key}.{n}"] = st[key].contiguous()
        if "step" in st:
            tensors[f"opt.step.{n}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    return tensors


def save(
    directory: Path,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer | None,
    meta: dict,
) -> None:
    """Commit parameters, AdamW moments (none if ``optimizer`` is None or has not stepped) and
    ``meta`` (which must hold the integer ``step``) as one unit."""
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError("checkpoint meta needs an integer step >= 0")
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = save_tensors(_tensors_of(params, optimizer))
    # A fresh name per save: the file the pointer names is never overwritten.
    name = f"state-{step:08d}-{secrets.token_hex(4)}.safetensors"
    write_bytes_atomic(directory / name, data, mode=0o600)
    pointer = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tensors": name,
        "tensors_sha256": sha256_bytes(data),
        "meta": meta,
    }
    write_bytes_atomic(directory / META, canonical_json(pointer), mode=0o600)
    remove_stale(directory, keep=name)


def remove_stale(directory: Path, keep: str | None = None) -> None:
    """Remove tensor files the pointer does not name and temporary files of interrupted saves."""
    for path in Path(directory).iterdir():
        stale_tensors = _TENSORS.fullmatch(path.name) and path.name != keep
        temporary = path.name.startswith((".state", f".{META}")) or path.name == LEGACY_TENSORS
        if stale_tensors or temporary:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def load(
    directory: Path,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer | None,
    check: Callable[[dict], None] | None = None,
) -> dict:
    """Restore parameters and AdamW moments in place from the committed state; return its meta.

    ``check(meta)``, if given, runs before anything is restored (e.g. to refuse another run's state).
    """
    directory = Path(directory)
    pointer = _read_pointer(directory)
    meta = dict(pointer.meta)
    if check is not None:
        check(meta)
    path = directory / pointer.tensors
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise FormatError(f"training state {directory}: {pointer.tensors} is missing") from e
    if sha256_bytes(data) != pointer.tensors_sha256:
        raise IntegrityError(f"training state {directory}: {pointer.tensors} does not match its sha256")
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError) as e:
        raise FormatError(f"training state {directory}: {pointer.tensors} is not safetensors") from e
    _check_tensors(directory, tensors, params, meta["step"])
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
            if optimizer is not None and f"opt.exp_avg.{n}" in tensors:
                # The moments live beside their parameter (on its device); AdamW keeps the step count
                # on the CPU.
                optimizer.state[p] = {
                    "step": tensors[f"opt.step.{n}"].reshape(()).clone(),
                    "exp_avg": to_device_of(tensors[f"opt.exp_avg.{n}"], p).clone(),
                    "exp_avg_sq": to_device_of(tensors[f"opt.exp_avg_sq.{n}"], p).clone(),
                }
    return meta


def applied_steps(tensors: dict[str, torch.Tensor]) -> int:
    """The optimizer steps applied to the stored parameters (0 before the first step)."""
    steps = {int(t.item()) for name, t in tensors.items() if name.startswith("opt.step.")}
    return max(steps, default=0)


def _check_tensors(directory: Path, tensors: dict, params: dict[str, nn.Parameter], step: int) -> None:
    where = f"training state {directory}"
    for n, p in params.items():
        t = tensors.get(f"param.{n}")
        if t is None or tuple(t.shape) != tuple(p.shape):
            raise FormatError(f"{where}: parameter {n} is missing or has another shape")
        keys = [f"opt.{k}.{n}" for k in ("exp_avg", "exp_avg_sq", "step")]
        present = [k in tensors for k in keys]
        if any(present) and not all(present):
            raise FormatError(f"{where}: optimizer state of {n} is incomplete")
        if all(present) and any(tuple(tensors[k].shape) != tuple(p.shape) for k in keys[:2]):
            raise FormatError(f"{where}: optimizer state of {n} has another shape")
    applied = applied_steps(tensors)
    if applied != step:
        raise FormatError(
            f"{where}: the parameters have {applied} optimizer steps applied but the state records "
            f"step {step}; refusing to resume from an inconsistent state"
        )
