"""The adapter spec and tensor table: which tensors a data owner trains, declared once.

Both appear in the bundle manifest (what the owner expects back) and in ``adapter.json`` (what
the data owner says it sends); the validators here keep the two halves of each consistent, so a
document whose spec and tensors disagree is refused before anything is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import pairwise
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from offsite.errors import FormatError
from offsite.formats.schema import Schema

BLOCKS = "blocks"
LORA = "lora"
HEAD_PREFIX = "head."
#: Torch dtype names a tensor table may name (the dtypes of ``offsite.fileio.SAFETENSORS_DTYPES``).
DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
#: No model has this many blocks; the bound keeps hostile documents small to check.
MAX_LAYERS = 4096
MAX_TENSORS = 100_000

Layer = Annotated[int, Field(ge=0, lt=MAX_LAYERS)]


class AdapterSpec(Schema):
    """Which blocks are trained, and how (whole blocks or LoRA on their linear layers)."""

    kind: Literal["blocks", "lora"] = Field(description="`blocks` (whole blocks train) or `lora`")
    layers: tuple[Layer, ...] = Field(
        min_length=1,
        max_length=MAX_LAYERS,
        description="full-model indices of the adapter blocks, strictly increasing (bottom, then top)",
    )
    lora_rank: Annotated[int, Field(ge=1, le=65536)] | None = Field(
        default=None, description="LoRA rank r (LoRA only, else null)"
    )
    lora_alpha: Annotated[float, Field(gt=0, le=1e6)] | None = Field(
        default=None, description="LoRA scale α; the update is (α / r)·B·A (LoRA only, else null)"
    )
    trains_head: bool = Field(
        default=False, description="true for encoders fine-tuned to classify: the new head and pooler train"
    )

    @field_validator("layers", mode="before")
    @classmethod
    def _json_array(cls, value: Any) -> Any:
        # JSON has arrays, not tuples; everything else stays strict.
        return tuple(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _consistent(self) -> AdapterSpec:
        if any(b <= a for a, b in pairwise(self.layers)):
            raise ValueError("layers must be strictly increasing")
        lora_fields = (self.lora_rank is not None, self.lora_alpha is not None)
        if self.kind == LORA and lora_fields != (True, True):
            raise ValueError("a LoRA spec needs lora_rank and lora_alpha")
        if self.kind == BLOCKS and any(lora_fields):
            raise ValueError("a blocks spec has no lora_rank or lora_alpha")
        return self

    def to_json(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, d: Mapping) -> AdapterSpec:
        from offsite.formats.schema import validate

        return validate(cls, dict(d) if isinstance(d, Mapping) else d, "adapter spec")


class TensorEntry(Schema):
    """One tensor of an adapter: its shape and dtype."""

    shape: list[Annotated[int, Field(ge=0, le=1 << 40)]] = Field(
        max_length=16, description="dimensions (at most 16)"
    )
    dtype: Literal[DTYPES] = Field(description="torch dtype name, e.g. `float32`, `bfloat16`")

    @model_validator(mode="after")
    def _bounded(self) -> TensorEntry:
        if math.prod(self.shape) > 1 << 40:
            raise ValueError("more than 2^40 elements")
        return self


TensorName = Annotated[str, Field(min_length=1, max_length=1024)]
TensorTable = Annotated[dict[TensorName, TensorEntry], Field(max_length=MAX_TENSORS)]


def check_spec_and_table(spec: AdapterSpec, tensors: Mapping[str, TensorEntry]) -> None:
    """Tensor names must be exactly the kind the spec describes: ``layers.<i>.…`` for its layers
    (LoRA: only ``lora_A``/``lora_B`` weights), ``head.…`` only if it trains the head; every layer
    (and the head, if trained) has at least one tensor. Raises ValueError (a validator's error)."""
    seen: set[int] = set()
    head = False
    layers = set(spec.layers)
    for name in tensors:
        if name.startswith(HEAD_PREFIX):
            if not spec.trains_head:
                raise ValueError(f"tensor {name!r}: the spec trains no head")
            head = True
            continue
        parts = name.split(".", 2)
        if len(parts) < 3 or parts[0] != "layers" or not parts[1].isdigit() or int(parts[1]) not in layers:
            raise ValueError(f"tensor {name!r} is not named layers.<i>.… for a layer of the spec")
        is_lora = ".lora_A." in name or ".lora_B." in name
        if is_lora != (spec.kind == LORA):
            raise ValueError(f"tensor {name!r} does not belong to a {spec.kind} adapter")
        seen.add(int(parts[1]))
    missing = sorted(layers - seen)
    if missing:
        raise ValueError(f"no tensors for adapter layers {missing[:5]}")
    if spec.trains_head and not head:
        raise ValueError("the spec trains the head but no head.… tensor is listed")


def table_of(tensors: Mapping[str, Any]) -> dict[str, dict]:
    """The tensor table (name -> shape, dtype) of in-memory torch tensors."""
    return {
        name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for name, t in sorted(tensors.items())
    }


def check_tensor_table(found: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    """Names, shapes and dtypes of ``found`` must match ``expected`` exactly (entries are dicts or
    ``TensorEntry``)."""

    def plain(entry: Any) -> tuple[list[int], str]:
        if isinstance(entry, TensorEntry):
            return list(entry.shape), entry.dtype
        return list(entry["shape"]), entry["dtype"]

    unexpected = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    if unexpected:
        raise FormatError(
            f"{where}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    if missing:
        raise FormatError(f"{where}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name in sorted(expected):
        (got_shape, got_dtype), (exp_shape, exp_dtype) = plain(found[name]), plain(expected[name])
        if got_shape != exp_shape:
            raise FormatError(f"{where}: tensor {name} has shape {got_shape}, expected {exp_shape}")
        if got_dtype != exp_dtype:
            raise FormatError(f"{where}: tensor {name} has dtype {got_dtype}, expected {exp_dtype}")
