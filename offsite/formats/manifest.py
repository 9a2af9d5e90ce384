"""The bundle manifest (``manifest.json``), declared once: the model that validates it and that
``docs/formats.md`` is generated from. The owner's record of an issued bundle is a byte-exact
copy of its manifest, so this is its format too."""

from __future__ import annotations

from itertools import pairwise
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from offsite.formats.schema import JsonObject, RelPath, Schema, Sha256Hex, parse
from offsite.formats.spec import MAX_LAYERS, AdapterSpec, Layer, TensorTable, check_spec_and_table

FORMAT = "offsite-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMULATOR_DIR = "emulator"
TOKENIZER_DIR = "tokenizer"
INITIAL_ADAPTER = "initial_adapter.safetensors"
TASKS = ("causal-lm", "seq-cls", "masked-lm")
MAX_FILES = 10_000

Name = Annotated[str, Field(min_length=1, max_length=128)]
Finite = float  # Schema refuses NaN and infinities everywhere


class Source(Schema):
    """The full model the bundle was prepared from (it never leaves the owner)."""

    fingerprint: Sha256Hex = Field(
        description="sha256 over the sha256 of the source checkpoint's `config.json` and `*.safetensors` files"
    )
    family: Name = Field(description="architecture family in the registry, e.g. `llama`")
    model_type: Name = Field(description="the checkpoint's `model_type`")
    model_class: Name = Field(description="the transformers class it was loaded as")
    task: Literal[TASKS] = Field(description="`causal-lm`, `seq-cls` or `masked-lm`")
    num_labels: Annotated[int, Field(ge=2, le=1_000_000)] | None = Field(
        description="classes of a `seq-cls` model (at least 2), else null"
    )
    total_layers: Annotated[int, Field(ge=1, le=MAX_LAYERS)] = Field(description="blocks in the full model")
    dtype: Literal["float64", "float32", "float16", "bfloat16"] = Field(
        description="the checkpoint's stored dtype"
    )
    config: JsonObject = Field(description="the full model's config (without its local path)")

    @model_validator(mode="after")
    def _labels(self) -> Source:
        if (self.task == "seq-cls") != (self.num_labels is not None):
            raise ValueError("num_labels is given exactly when the task is seq-cls")
        return self


class Emulator(Schema):
    layer_map: list[Layer] = Field(
        min_length=1, max_length=MAX_LAYERS, description="emulator position → original layer index"
    )
    num_layers: Annotated[int, Field(ge=1, le=MAX_LAYERS)] = Field(
        description="blocks in the emulator (the layer map's length)"
    )

    @model_validator(mode="after")
    def _map(self) -> Emulator:
        if self.num_layers != len(self.layer_map):
            raise ValueError(f"num_layers is {self.num_layers} but the layer map has {len(self.layer_map)}")
        if any(b <= a for a, b in pairwise(self.layer_map)):
            raise ValueError("layer_map must be strictly increasing")
        return self


class AdapterSection(Schema):
    spec: AdapterSpec = Field(description="the adapter the data owner trains (fields below)")
    tensors: TensorTable = Field(
        description="name → `shape`, `dtype` of every adapter tensor: what a returned adapter must contain"
    )

    @model_validator(mode="after")
    def _names(self) -> AdapterSection:
        check_spec_and_table(self.spec, self.tensors)
        return self


class Perplexities(Schema):
    full: Finite = Field(description="the full model")
    emulator_before: Finite = Field(description="the emulator before distillation")
    emulator_after: Finite = Field(description="the emulator after distillation")


class BeforeAfter(Schema):
    before: Finite = Field(description="before distillation")
    after: Finite = Field(description="after distillation")


class Distillation(Schema):
    """How the emulator's middle blocks were distilled on the owner's public text."""

    steps: Annotated[int, Field(ge=1)] = Field(description="optimizer steps")
    lr: Annotated[float, Field(gt=0)] = Field(description="peak learning rate")
    batch_size: Annotated[int, Field(ge=1)] = Field(description="records per step")
    lm_weight: Annotated[float, Field(ge=0)] = Field(description="weight of the language-modelling loss")
    kd_weight: Annotated[float, Field(ge=0)] = Field(
        description="weight of the hidden-state distillation loss"
    )
    final_kd_loss: Finite = Field(description="distillation loss at the last step")
    held_out_records: Annotated[int, Field(ge=1)] = Field(
        description="public records held out for the numbers below"
    )
    held_out_kd: BeforeAfter = Field(description="distillation loss on them before and after")
    held_out_perplexity: Perplexities = Field(description="token perplexity on them")


class CreatedWith(Schema):
    offsite: Name = Field(description="version of offsite")
    torch: Name = Field(description="version of torch")
    transformers: Name = Field(description="version of transformers")


class Manifest(Schema):
    """``manifest.json`` of a bundle. The bundle id is the sha256 of its exact bytes."""

    format: Literal["offsite-bundle"] = Field(description="always `offsite-bundle`")
    format_version: Literal[1] = Field(description="1")
    source: Source = Field(description="the full model (fields below)")
    emulator: Emulator = Field(description="the emulator's blocks")
    adapter: AdapterSection = Field(description="the adapter")
    distillation: Distillation | None = Field(description="null if the emulator was not distilled")
    files: Annotated[dict[RelPath, Sha256Hex], Field(min_length=1, max_length=MAX_FILES)] = Field(
        description="relative path → sha256 of every other file in the bundle"
    )
    created_with: CreatedWith = Field(description="library versions that wrote the bundle")

    @field_validator("files")
    @classmethod
    def _required_files(cls, files: dict[str, str]) -> dict[str, str]:
        if MANIFEST in files:
            raise ValueError(f"must not list {MANIFEST} itself")
        for need in (INITIAL_ADAPTER, f"{EMULATOR_DIR}/config.json"):
            if need not in files:
                raise ValueError(f"must list {need}")
        if not any(p.startswith(f"{TOKENIZER_DIR}/") for p in files):
            raise ValueError(f"must list the files of {TOKENIZER_DIR}/")
        return files

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        total = self.source.total_layers
        if self.emulator.layer_map[-1] >= total:
            raise ValueError(
                f"emulator.layer_map names layer {self.emulator.layer_map[-1]} of a {total}-layer model"
            )
        outside = sorted(set(self.adapter.spec.layers) - set(self.emulator.layer_map))
        if outside:
            raise ValueError(f"adapter layers {outside[:5]} are not in the emulator's layer map")
        if self.adapter.spec.trains_head != (self.source.task == "seq-cls"):
            raise ValueError("adapter.spec.trains_head must be true exactly for a seq-cls model")
        return self


def parse_manifest(data: bytes, what: str) -> Manifest:
    """Validate manifest bytes (at most 1 MiB) into a ``Manifest``; FormatError naming the field if not."""
    return parse(Manifest, data, what)
