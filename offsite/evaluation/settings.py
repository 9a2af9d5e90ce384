"""The five settings every offsite-tuning result is reported in (Xiao et al. 2023).

``evaluate_settings`` fills the rows it has inputs for and leaves the rest as n/a. It
never trains anything. Each fine-tuned row also says which settings it was trained with (a
comparison is only as fair as its settings): the adapter's ``hyperparameters`` for the emulator
row, the same carried into the merged model's ``offsite_plug.json`` for the plug-in row, and
``offsite_finetune.json`` for the full fine-tuned row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from offsite import device
from offsite.data import (
    CLS,
    LM,
    MC,
    MLM,
    Record,
    make_examples,
    max_positions,
    read_records,
)
from offsite.errors import OffsiteError
from offsite.evaluation.metrics import classification_accuracy, multiple_choice_accuracy, token_perplexity
from offsite.formats.adapter import read_adapter
from offsite.formats.bundle import Bundle
from offsite.full_finetune import SETTINGS_FILE as FULL_FT_SETTINGS_FILE
from offsite.models.adapters import task_of
from offsite.models.loading import load_placed, load_tokenizer
from offsite.models.registry import Task
from offsite.plug import PLUG_FILE

MLM_MASK_SEED = 1234
SETTINGS = ("full zero-shot", "emulator zero-shot", "emulator fine-tuned", "plug-in", "full fine-tuned")
METRICS = {LM: ("perplexity",), MLM: ("perplexity",), MC: ("acc", "acc_norm"), CLS: ("acc",)}
_TASK_FOR_KIND = {LM: Task.CAUSAL_LM, MC: Task.CAUSAL_LM, CLS: Task.SEQ_CLS, MLM: Task.MASKED_LM}


@dataclass
class EvalInputs:
    model: Path | None = None
    bundle: Path | None = None
    adapter: Path | None = None
    merged: Path | None = None
    full_ft: Path | None = None


@dataclass
class Row:
    setting: str
    metrics: dict[str, float] | None
    note: str = ""
    hyperparameters: dict | None = None  # what a fine-tuned row was trained with, where known


@dataclass
class Report:
    kind: str
    records: int
    rows: list[Row] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "type": self.kind,
            "records": self.records,
            "settings": {r.setting: r.metrics for r in self.rows},
            "notes": {r.setting: r.note for r in self.rows if r.note},
            "hyperparameters": {r.setting: r.hyperparameters for r in self.rows if r.hyperparameters},
        }


_SHOWN = (
    ("lr", "lr {:g}"),
    ("epochs", "{} ep"),
    ("batch_size", "batch {}"),
    ("noise_multiplier", "σ {:.3g}"),
    ("steps", "{} steps"),
)


def describe_hyperparameters(h: Mapping | None) -> str:
    """One line for a table: ``"no DP · lr 0.001 · 2 ep · batch 32"`` or ``"DP · lr … · σ 0.76 · 48 steps"``."""
    if not h:
        return ""
    parts = ["DP" if h.get("dp") else "no DP"]
    for key, fmt in _SHOWN:
        value = h.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(fmt.format(value))
    return " · ".join(parts)


def _recorded_settings(path: Path, key: str) -> dict | None:
    """``key`` of a small JSON file written beside a model, or None if absent or unreadable.

    Display only: a missing or malformed file means "settings unknown", never an error.
    """
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return None
        value = json.loads(path.read_bytes()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return dict(value) if isinstance(value, dict) else None


@torch.no_grad()
def score(model: nn.Module, tokenizer, records: Sequence[Record], kind: str) -> dict[str, float]:
    model.eval()
    limit = max_positions(model.config)
    pad = tokenizer.pad_token_id
    if kind == MC:
        return multiple_choice_accuracy(model, tokenizer, records)
    examples = make_examples(kind, records, tokenizer, limit, model.config.num_labels, MLM_MASK_SEED)
    if kind == CLS:
        return {"acc": classification_accuracy(model, examples, pad)}
    return {"perplexity": token_perplexity(model, examples, pad, shift=kind == LM)}


def _check_task(model: nn.Module, kind: str, where: Path) -> None:
    if task_of(model) is not _TASK_FOR_KIND[kind]:
        raise OffsiteError(
            f"{where} is a {task_of(model).value} model; --type {kind} needs a "
            f"{_TASK_FOR_KIND[kind].value} model"
        )


def evaluate_settings(task_file: str | os.PathLike, kind: str, inputs: EvalInputs, on_row=None) -> Report:
    records = read_records(task_file, kind)
    report = Report(kind, len(records))
    bundle = Bundle.open(inputs.bundle) if inputs.bundle else None
    tok_dir = next((p for p in (inputs.merged, inputs.model, inputs.full_ft) if p), None)
    tokenizer = bundle.load_tokenizer() if bundle else (load_tokenizer(tok_dir) if tok_dir else None)
    if tokenizer is None:
        raise OffsiteError("nothing to evaluate: pass --model, --bundle, --merged or --full-ft")
    task = _TASK_FOR_KIND[kind]

    def full(path: Path) -> dict[str, float]:
        model = load_placed(path, task=task)
        _check_task(model, kind, path)
        return score(model, tokenizer, records, kind)

    adapter_settings: dict = {}

    def emulator(adapter: Path | None) -> dict[str, float]:
        model, view = bundle.load_emulator(placement=device.current())
        _check_task(model, kind, bundle.path)
        if adapter is not None:
            a = read_adapter(
                adapter,
                expected_tensors=bundle.expected_tensors,
                bundle_id=bundle.id,
                source_fingerprint=bundle.source_fingerprint,
                expected_spec=bundle.spec,
            )
            view.load_state_dict(a.tensors)
            h = a.meta.get("hyperparameters")
            adapter_settings.update(h if isinstance(h, dict) else {})
        return score(model, tokenizer, records, kind)

    def settings_of(setting: str) -> dict | None:
        if setting == SETTINGS[2]:
            return dict(adapter_settings) or None
        if setting == SETTINGS[3]:
            return _recorded_settings(inputs.merged / PLUG_FILE, "adapter_hyperparameters")
        if setting == SETTINGS[4]:
            return _recorded_settings(inputs.full_ft / FULL_FT_SETTINGS_FILE, "full_finetune")
        return None

    plan = [
        (SETTINGS[0], inputs.model, lambda: full(inputs.model), "needs --model"),
        (SETTINGS[1], bundle, lambda: emulator(None), "needs --bundle"),
        (
            SETTINGS[2],
            bundle and inputs.adapter,
            lambda: emulator(inputs.adapter),
            "needs --bundle and --adapter",
        ),
        (SETTINGS[3], inputs.merged, lambda: full(inputs.merged), "needs --merged"),
        (SETTINGS[4], inputs.full_ft, lambda: full(inputs.full_ft), "needs --full-ft"),
    ]
    for setting, available, run, missing in plan:
        if kind == CLS and setting in SETTINGS[:2]:
            row = Row(setting, None, "zero-shot is undefined: the classification head is new")
        elif not available:
            row = Row(setting, None, missing)
        else:
            row = Row(setting, run())
            row.hyperparameters = settings_of(setting)
        report.rows.append(row)
        if on_row:
            on_row(row)
    return report
