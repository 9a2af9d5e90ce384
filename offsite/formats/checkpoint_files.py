"""A Hugging Face checkpoint's weights, read one tensor at a time (never the whole model).

A checkpoint directory holds ``model.safetensors``, or shards named by ``model.safetensors.index.json``
(``{"metadata": {...}, "weight_map": {tensor name: file name}}``). ``CheckpointFiles`` reads the index
(bounded, schema-checked: every file name a plain name in the directory, never a path that leaves it)
and every file's header (``safetensors_file.read_header``: offsets, sizes, dtypes), checks that the
index and the files agree exactly (each tensor in one file, the file the index names), and then knows
where each tensor's bytes are. A tensor leaves the checkpoint as a ``TensorOut`` for the writer
(``offsite.formats.safetensors_writer``): its bytes copied file to file by the kernel when its dtype is
kept, or converted a bounded slice at a time when it is not, so the memory used does not grow with the
model. The checkpoint is the model owner's own; symlinked files (a Hugging Face cache snapshot) are
followed as ``from_pretrained`` follows them.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, BinaryIO

import torch
from pydantic import Field

from offsite.errors import FormatError
from offsite.fileio import SAFETENSORS_DTYPES
from offsite.formats.safetensors_file import MAX_HEADER_BYTES, read_header
from offsite.formats.safetensors_writer import INDEX, SINGLE, TensorOut, copy_range, dtype_code, write_tensor
from offsite.formats.schema import JsonObject, Schema, parse

#: Converting a tensor to another dtype reads at most this many bytes of it at once.
CONVERT_CHUNK_BYTES = 64 << 20

_FILE_NAME = r"^[^/\\\x00-\x1f]{1,255}\.safetensors$"


class ShardIndex(Schema):
    """``model.safetensors.index.json`` as Hugging Face writes it."""

    metadata: JsonObject | None = Field(default=None, description="total size and the like (not used)")
    weight_map: dict[
        Annotated[str, Field(min_length=1, max_length=1024)],
        Annotated[str, Field(pattern=_FILE_NAME)],
    ] = Field(description="tensor name -> shard file name (a plain name in the checkpoint directory)")


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes are."""

    path: Path
    dtype: torch.dtype
    code: str  # safetensors dtype code
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file
    nbytes: int


class CheckpointFiles:
    """The tensors of a checkpoint directory, by name, with where their bytes are."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.sharded = (self.directory / INDEX).exists()
        files = self._files()
        self.tensors: dict[str, Stored] = {}
        #: current name -> stored name, for tensors stored under a legacy name
        self.aliases: dict[str, str] = {}
        for name in sorted(set(files.values())):
            path = self.directory / name
            header = read_header(path, f"checkpoint file {path}")
            base = 8 + _header_length(path)
            for tensor, entry in header.tensors.items():
                if tensor in self.tensors:
                    raise FormatError(f"{self.directory}: tensor {tensor} is in two files")
                if self.sharded and files.get(tensor) != name:
                    raise FormatError(
                        f"{self.directory / INDEX}: tensor {tensor} is in {name}, the index says "
                        f"{files.get(tensor, 'nothing')}"
                    )
                begin, end = entry.data_offsets
                dtype = getattr(torch, SAFETENSORS_DTYPES[entry.dtype])
                self.tensors[tensor] = Stored(
                    path, dtype, entry.dtype, tuple(entry.shape), base + begin, end - begin
                )
        missing = sorted(set(files) - set(self.tensors)) if self.sharded else []
        if missing:
            raise FormatError(f"{self.directory / INDEX}: names tensors no file holds: {missing[:3]}")

    def _files(self) -> dict[str, str]:
        """Tensor name -> file name (sharded), or {} with the single file checked to exist."""
        if self.sharded:
            index_path = self.directory / INDEX
            with open(index_path, "rb") as f:
                data = f.read(MAX_HEADER_BYTES + 1)
            index = parse(ShardIndex, data, str(index_path), max_bytes=MAX_HEADER_BYTES)
            for name in sorted(set(index.weight_map.values())):
                _regular(self.directory / name, f"{index_path}: shard {name}")
            return dict(index.weight_map)
        _regular(self.directory / SINGLE, f"checkpoint {self.directory}")
        return {"": SINGLE}

    # -- naming ---------------------------------------------------------------------------
    def find(self, name: str, base_prefix: str = "") -> str:
        """The stored name of model tensor ``name``: itself, or without the base model's prefix
        (checkpoints saved from the base model, like the original GPT-2's ``h.0...``)."""
        candidates = [name]
        if base_prefix and name.startswith(base_prefix):
            candidates.append(name[len(base_prefix) :])
        for candidate in candidates:
            if candidate in self.tensors:
                return candidate
            if candidate in self.aliases:
                return self.aliases[candidate]
        raise FormatError(f"{self.directory}: the checkpoint has no tensor {name}")

    def has(self, name: str, base_prefix: str = "") -> bool:
        try:
            self.find(name, base_prefix)
        except FormatError:
            return False
        return True

    def floating_dtype(self) -> torch.dtype:
        """The dtype of the floating-point tensor first in name order (what the weights are stored in)."""
        for name in sorted(self.tensors):
            if self.tensors[name].dtype.is_floating_point:
                return self.tensors[name].dtype
        return torch.float32

    # -- reading ------------------------------------------------------------------------------
    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor in memory (for the few that are changed: LoRA merges, heads)."""
        from safetensors import safe_open

        stored = self.tensors[name]
        with safe_open(str(stored.path), framework="pt") as f:
            t = f.get_tensor(name)
        return t if dtype is None or t.dtype == dtype or not t.is_floating_point() else t.to(dtype)

    def out(self, name: str, as_name: str, dtype: torch.dtype | None = None) -> TensorOut:
        """Tensor ``name`` written as ``as_name`` in ``dtype`` (floating-point tensors only; default:
        as stored): a byte copy when the dtype is kept, a sliced conversion when it is not."""
        stored = self.tensors[name]
        target = stored.dtype if dtype is None or not stored.dtype.is_floating_point else dtype
        if target == stored.dtype:
            return TensorOut(
                as_name,
                stored.code,
                stored.shape,
                lambda f: copy_range(stored.path, stored.offset, stored.nbytes, f),
            )
        return TensorOut(as_name, dtype_code(target), stored.shape, lambda f: self._convert(name, target, f))

    def _convert(self, name: str, dtype: torch.dtype, f: BinaryIO) -> None:
        from safetensors import safe_open

        stored = self.tensors[name]
        if len(stored.shape) == 0:
            write_tensor(f, self.read(name, dtype))
            return
        row_bytes = max(1, stored.nbytes // max(stored.shape[0], 1))
        step = max(1, CONVERT_CHUNK_BYTES // row_bytes)
        with safe_open(str(stored.path), framework="pt") as st:
            sl = st.get_slice(name)
            for start in range(0, stored.shape[0], step):
                write_tensor(f, sl[start : start + step].to(dtype))


def _header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def _regular(path: Path, what: str) -> None:
    try:
        st = os.stat(path)  # follows symlinks, as from_pretrained does (Hugging Face cache snapshots)
    except FileNotFoundError:
        raise FormatError(f"{what}: {path.name} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{what}: {path.name} is not a regular file")
