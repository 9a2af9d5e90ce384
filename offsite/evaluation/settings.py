"""The five settings every offsite-tuning result is reported in (Xiao et al. 2023).

``evaluate_settings`` fills the rows it has inputs for and leaves the rest as n/a. It
never trains anything.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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
from offsite.models.adapters import task_of
from offsite.models.loading import load_placed, load_tokenizer
from offsite.models.registry import Task

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
        }


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
        return score(model, tokenizer, records, kind)

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
        report.rows.append(row)
        if on_row:
            on_row(row)
    return report
