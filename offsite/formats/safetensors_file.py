"""Checking a safetensors file before the safetensors library sees it.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header, and the
tensor data. The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin,
end]}`` (offsets into the data that follows), plus an optional ``"__metadata__"`` object of
strings. Everything here is checked with clear errors before any tensor is read: N within the
file and at most ``MAX_HEADER_BYTES``; the header a JSON object of that shape; known dtypes;
each tensor's byte length equal to its element count times its dtype's size; the tensors laid
end to end from offset 0 to the end of the file, with no gap and no overlap. A pickle renamed
``.safetensors`` fails the first check. Only then is the library asked to load the tensors.

Call these on a private copy (``offsite.formats.staging``) or on bytes in memory: a file that
can change between the check and the load is not checked.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from offsite.errors import FormatError
from offsite.fileio import SAFETENSORS_DTYPES
from offsite.formats.schema import Schema, parse
from offsite.formats.spec import check_tensor_table

#: Larger than any real model's header (a few hundred kB) and far below what would hurt to parse.
MAX_HEADER_BYTES = 16 << 20
ITEM_SIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
assert set(ITEM_SIZE) == set(SAFETENSORS_DTYPES)

Offset = Annotated[int, Field(ge=0, le=1 << 50)]


class HeaderEntry(Schema):
    dtype: Literal[tuple(ITEM_SIZE)] = Field(description="safetensors dtype code")
    shape: list[Annotated[int, Field(ge=0, le=1 << 40)]] = Field(max_length=16, description="dimensions")
    data_offsets: list[Offset] = Field(
        min_length=2,
        max_length=2,
        description="[begin, end) in the data after the header: end − begin = elements × dtype size",
    )

    @model_validator(mode="after")
    def _size(self) -> HeaderEntry:
        begin, end = self.data_offsets
        if end < begin:
            raise ValueError("data_offsets end before they begin")
        if end - begin != math.prod(self.shape) * ITEM_SIZE[self.dtype]:
            raise ValueError(f"{end - begin} bytes do not hold shape {self.shape} of {self.dtype}")
        return self


class SafetensorsHeader(Schema):
    """The header, with ``__metadata__`` split from the tensor entries."""

    metadata: dict[str, str] | None = None
    tensors: dict[Annotated[str, Field(min_length=1, max_length=1024)], HeaderEntry]

    @model_validator(mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, dict):
            value = dict(value)
            return {"metadata": value.pop("__metadata__", None), "tensors": value}
        return value

    @model_validator(mode="after")
    def _laid_end_to_end(self) -> SafetensorsHeader:
        position = 0
        for name, entry in sorted(self.tensors.items(), key=lambda kv: tuple(kv[1].data_offsets)):
            begin, end = entry.data_offsets
            if begin != position:
                problem = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
                raise ValueError(f"tensor {name!r} {problem} (data_offsets {entry.data_offsets})")
            position = end
        return self

    @property
    def data_length(self) -> int:
        return max((e.data_offsets[1] for e in self.tensors.values()), default=0)

    def table(self) -> dict[str, dict]:
        """name -> shape and torch dtype name, as in a tensor table."""
        return {
            name: {"shape": list(e.shape), "dtype": SAFETENSORS_DTYPES[e.dtype]}
            for name, e in sorted(self.tensors.items())
        }


def parse_header(prefix: bytes, file_size: int, what: str) -> tuple[SafetensorsHeader, int]:
    """The header of a safetensors file of ``file_size`` bytes, from its first bytes ``prefix``.

    Returns the header and the number of bytes it needs (8 + N): pass at least that many, or get
    a FormatError asking for them (``read_header`` does).
    """
    if file_size < 8 or len(prefix) < 8:
        raise FormatError(f"{what}: {file_size} bytes, too short to be a safetensors file")
    n = int.from_bytes(prefix[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise FormatError(
            f"{what}: not a safetensors file (header length {n} is over the {MAX_HEADER_BYTES}-byte limit)"
        )
    if n > file_size - 8:
        raise FormatError(f"{what}: not a safetensors file (header length {n} runs past the end of the file)")
    if len(prefix) < 8 + n:
        raise FormatError(f"{what}: truncated safetensors header")
    header = parse(SafetensorsHeader, prefix[8 : 8 + n], f"{what} header", max_bytes=MAX_HEADER_BYTES)
    data = file_size - 8 - n
    if header.data_length != data:
        raise FormatError(
            f"{what}: the header describes {header.data_length} bytes of tensor data, the file holds {data}"
        )
    return header, 8 + n


def read_header(path: str | os.PathLike, what: str) -> SafetensorsHeader:
    """Check the header of the safetensors file at ``path`` (a private copy)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) == 8:
            n = int.from_bytes(prefix, "little")
            if n <= min(MAX_HEADER_BYTES, size - 8):
                prefix += f.read(n)
    return parse_header(prefix, size, what)[0]


def load_tensors(path: str | os.PathLike, what: str, expected: Mapping[str, Any] | None = None) -> dict:
    """Check the file at ``path`` (a private copy), its table against ``expected`` if given, then load it."""
    from safetensors.torch import load_file

    header = read_header(path, what)
    if expected is not None:
        check_tensor_table(header.table(), expected, what)
    try:
        return load_file(str(path))
    except Exception as e:  # the checks above should leave nothing for the library to refuse
        raise FormatError(f"{what}: not a valid safetensors file ({e})") from None


def load_tensors_bytes(data: bytes, what: str, expected: Mapping[str, Any] | None = None) -> dict:
    """As ``load_tensors``, for a file's bytes in memory: hash and load the same bytes."""
    from safetensors.torch import load

    header, _ = parse_header(data, len(data), what)
    if expected is not None:
        check_tensor_table(header.table(), expected, what)
    try:
        return load(data)
    except Exception as e:
        raise FormatError(f"{what}: not a valid safetensors file ({e})") from None
