"""The data owner's fine-tuning of a bundle's adapter on its private data.

Everything derived from the data (losses, counts) stays on this machine: it goes to the
terminal, never into the adapter's files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from offsite.data import CLS, LM, MLM, Example, Record, cls_example, lm_example, max_positions, mlm_example
from offsite.errors import DataError
from offsite.formats.bundle import Bundle
from offsite.models.registry import Task


def data_kind(task: Task) -> str:
    return {Task.CAUSAL_LM: LM, Task.SEQ_CLS: CLS, Task.MASKED_LM: MLM}[task]


def tokenize_records(records: Sequence[Record], tokenizer, config, task: Task, num_labels: int | None,
                     max_length: int | None = None, mask_seed: int = 0) -> list[Example]:
    """Records -> examples for ``task``; MLM masks with a fixed seed so runs are reproducible."""
    limit = min(max_length or max_positions(config), max_positions(config))
    if task is Task.CAUSAL_LM:
        return [lm_example(tokenizer, r, limit) for r in records]
    if task is Task.SEQ_CLS:
        return [cls_example(tokenizer, r, limit, int(num_labels)) for r in records]
    gen = torch.Generator().manual_seed(mask_seed)
    return [mlm_example(tokenizer, r, limit, gen) for r in records]


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A held-out slice for the per-epoch eval loss (shown only on the data owner's terminal)."""
    if fraction <= 0 or len(examples) < 10:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    n_eval = max(1, int(len(examples) * fraction))
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


@dataclass
class TuneInputs:
    bundle: Bundle
    model: torch.nn.Module
    view: object
    tokenizer: object
    train: list[Example]
    eval: list[Example]
    records: list[Record]


def load_for_tuning(bundle_dir: str | os.PathLike, data: str | os.PathLike, *, eval_data: str | None,
                    eval_fraction: float, seed: int, max_length: int | None,
                    reader: Callable[[Path, str], list[Record]]) -> TuneInputs:
    bundle = Bundle.open(bundle_dir)
    model, view = bundle.load_emulator(torch.float32)
    tokenizer = bundle.load_tokenizer()
    kind = data_kind(bundle.task)
    num_labels = bundle.manifest["source"].get("num_labels")
    records = reader(Path(data), kind)
    examples = tokenize_records(records, tokenizer, model.config, bundle.task, num_labels, max_length)
    if eval_data:
        train = examples
        ev = tokenize_records(reader(Path(eval_data), kind), tokenizer, model.config, bundle.task, num_labels,
                              max_length)
    else:
        train, ev = split_eval(examples, eval_fraction, seed)
    if not train:
        raise DataError(f"{data}: no training records left")
    return TuneInputs(bundle, model, view, tokenizer, train, ev, records)


def adapter_tensors_for_export(view, bundle: Bundle) -> dict[str, torch.Tensor]:
    """The trained adapter in the bundle's stored dtype (training ran in fp32)."""
    from offsite.models.loading import parse_dtype

    expected = bundle.expected_tensors
    return {name: t.to(parse_dtype(expected[name]["dtype"])) for name, t in view.state_dict().items()}
