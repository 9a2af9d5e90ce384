"""Writing safetensors files one tensor at a time, sharded the way Hugging Face checkpoints are.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once; a bundle's emulator
or a merged model can be larger than the memory of the machine writing it. Here a file's header is
written from the tensors' names, dtypes and shapes alone, then each tensor's bytes are produced and
written in turn (``TensorOut.write``: a kernel copy from another file, a conversion a slice at a time,
or one in-memory tensor). The header is laid out exactly as ``save_file`` lays it out (tensors by
dtype rank, then name; compact JSON padded with spaces to a multiple of 8), so for the same tensors
the file is the same, byte for byte (``tests/test_streaming.py`` checks it).

``write_weights`` shards like ``save_pretrained``: ``model.safetensors`` when everything fits in one
shard, else ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``; tensors are
taken in the order given (the model's state-dict order) and a shard is closed before it would exceed
the limit (a tensor larger than the limit gets a shard of its own).
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from offsite.fileio import SAFETENSORS_DTYPES
from offsite.formats.safetensors_file import ITEM_SIZE

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
#: The default shard size limit of ``offsite owner prepare`` and ``offsite owner plug``.
DEFAULT_SHARD_BYTES = 2 * 10**9
#: safetensors orders a file's tensors by dtype, in this order, then by name.
_RANK = {
    code: i for i, code in enumerate(("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL"))
}
assert set(_RANK) == set(ITEM_SIZE)
_CODE = {getattr(torch, name): code for code, name in SAFETENSORS_DTYPES.items()}
_COPY_CHUNK = 8 << 20


def dtype_code(dtype: torch.dtype) -> str:
    return _CODE[dtype]


@dataclass(frozen=True)
class TensorOut:
    """One tensor to write: its name, dtype code and shape, and how to write its bytes to a file."""

    name: str
    code: str
    shape: tuple[int, ...]
    write: Callable[[BinaryIO], None]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEM_SIZE[self.code]


def tensor_out(name: str, tensor: torch.Tensor) -> TensorOut:
    """An in-memory tensor."""
    return TensorOut(name, dtype_code(tensor.dtype), tuple(tensor.shape), lambda f: write_tensor(f, tensor))


def lazy_out(
    name: str, dtype: torch.dtype, shape: Sequence[int], make: Callable[[], torch.Tensor]
) -> TensorOut:
    """A tensor computed only when it is written (one at a time: a LoRA merge, a new head)."""

    def write(f: BinaryIO) -> None:
        t = make()
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise RuntimeError(f"{name}: made {t.dtype} {tuple(t.shape)}, declared {dtype} {tuple(shape)}")
        write_tensor(f, t)

    return TensorOut(name, dtype_code(dtype), tuple(shape), write)


# -- bytes ------------------------------------------------------------------------------------
def _write_all(f: BinaryIO, data: memoryview | bytes) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = f.write(view)
        view = view[n:]


def write_tensor(f: BinaryIO, tensor: torch.Tensor) -> None:
    """A CPU tensor's bytes, little-endian, row-major (what safetensors stores)."""
    t = tensor.detach().contiguous()
    if t.numel():
        _write_all(f, t.reshape(-1).view(torch.uint8).numpy().data)


def copy_range(path: Path, offset: int, nbytes: int, f: BinaryIO) -> None:
    """Copy ``nbytes`` of ``path`` from ``offset`` to ``f`` in the kernel (no copy in this process's
    memory), falling back to a bounded read/write loop where the kernel cannot."""
    with open(path, "rb", buffering=0) as src:
        done = 0
        try:
            while done < nbytes:
                n = os.copy_file_range(src.fileno(), f.fileno(), nbytes - done, offset + done)
                if n == 0:
                    raise OSError(errno.EIO, f"{path} ended before its tensor data")
                done += n
        except (AttributeError, OSError) as e:
            if isinstance(e, OSError) and e.errno not in (
                errno.EXDEV,
                errno.ENOSYS,
                errno.EINVAL,
                errno.EOPNOTSUPP,
            ):
                raise
            src.seek(offset + done)
            while done < nbytes:
                chunk = src.read(min(_COPY_CHUNK, nbytes - done))
                if not chunk:
                    raise OSError(errno.EIO, f"{path} ended before its tensor data") from None
                _write_all(f, chunk)
                done += len(chunk)


# -- files --------------------------------------------------------------------------------------
def header_bytes(
    entries: Sequence[TensorOut], metadata: dict[str, str] | None
) -> tuple[bytes, list[TensorOut]]:
    """The header (with its 8-byte length) and the order the tensors' bytes follow it in."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("a safetensors file cannot hold two tensors of one name")
    order = sorted(entries, key=lambda e: (_RANK[e.code], e.name))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in order:
        header[e.name] = {
            "dtype": e.code,
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def write_safetensors(
    path: str | os.PathLike, entries: Sequence[TensorOut], metadata: dict[str, str] | None = None
) -> None:
    """Write one safetensors file, one tensor at a time."""
    header, order = header_bytes(entries, metadata)
    with open(path, "wb", buffering=0) as f:
        _write_all(f, header)
        position = len(header)
        for e in order:
            e.write(f)
            position += e.nbytes
            if f.tell() != position:
                raise RuntimeError(
                    f"{path}: tensor {e.name} wrote {f.tell() - position + e.nbytes} bytes, not {e.nbytes}"
                )


def write_weights(
    directory: str | os.PathLike,
    entries: Sequence[TensorOut],
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    total_parameters: int | None = None,
) -> list[str]:
    """A model's weights in ``directory``, sharded as ``save_pretrained`` shards; returns the files."""
    if max_shard_bytes < 1:
        raise ValueError("the shard size limit must be positive")
    directory = Path(directory)
    shards: list[list[TensorOut]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(directory / SINGLE, shards[0], metadata)
        return [SINGLE]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards, strict=True):
        write_safetensors(directory / name, shard, metadata)
    index_metadata: dict = {"total_size": sum(e.nbytes for e in entries)}
    if total_parameters is not None:
        index_metadata["total_parameters"] = total_parameters
    index = {
        "metadata": index_metadata,
        "weight_map": {e.name: name for name, shard in zip(names, shards, strict=True) for e in shard},
    }
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [*names, INDEX]
