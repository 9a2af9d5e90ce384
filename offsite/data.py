"""Reading records from JSONL, CSV or plain text, and turning them into model inputs.

One record is one JSONL line, one CSV row or one non-blank text line. Records are never
packed together or split: under DP a record is the unit of privacy. Every problem is
reported with the file and line it comes from.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from offsite.errors import DataError

if TYPE_CHECKING:  # torch loads only when data is tokenised, not when the CLI builds its parser
    import torch

LM, MC, CLS, MLM = "lm", "mc", "cls", "mlm"
KINDS = (LM, MC, CLS, MLM)
IGNORE = -100


@dataclass(frozen=True)
class Record:
    source: str  # "file:line", for error messages
    fields: dict
    raw: bytes = field(repr=False, default=b"")  # the record's bytes, for the dataset fingerprint
    # What identifies the record whatever file it came from (set by ``read_records``): canonical JSON
    # of the fields its task reads, after parsing, so its JSONL, CSV and text forms are equal.
    canonical: bytes = field(repr=False, default=b"")


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    return "text"


#: A single record (one line, or one CSV row) may not be larger than this: a huge record would be
#: tokenised whole and cost gigabytes, and is never a legitimate training example here.
MAX_RECORD_BYTES = 1 << 20


def _lines(f: BinaryIO, path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, line with its ending)``; a line over the limit is refused once the limit is
    read, so it is never held whole."""
    limit = MAX_RECORD_BYTES + 2  # the limit is on the content; "\r\n" does not count
    lineno = 0
    while line := f.readline(limit + 1):
        lineno += 1
        if len(line.rstrip(b"\r\n")) > MAX_RECORD_BYTES:
            raise DataError(f"{path}:{lineno}: record larger than {MAX_RECORD_BYTES} bytes (1 MiB); refused")
        yield lineno, line


def _decode(line: bytes, where: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _iter_csv(f: BinaryIO, path: Path) -> Iterator[Record]:
    since_last_row = 0  # bytes read for the row being assembled (a quoted cell may span lines)

    def text_lines() -> Iterator[str]:
        nonlocal since_last_row
        for lineno, line in _lines(f, path):
            since_last_row += len(line)
            if since_last_row > MAX_RECORD_BYTES + 2:
                raise DataError(
                    f"{path}:{lineno}: record larger than {MAX_RECORD_BYTES} bytes (1 MiB); refused"
                )
            yield _decode(line, f"{path}:{lineno}")

    # The csv module's own cell limit (128 KiB by default) is below the record limit.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_RECORD_BYTES + 2))
    reader = csv.DictReader(text_lines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        if not reader.fieldnames:
            return
        since_last_row = 0
        for row in reader:
            since_last_row = 0
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise DataError(f"{where}: row has more cells than the header")
            raw = json.dumps(row, sort_keys=True).encode()
            yield Record(where, dict(row), raw)
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def _iter_raw(path: Path) -> Iterator[Record]:
    fmt = _format_of(path)
    with open(path, "rb") as f:
        if fmt == "csv":
            yield from _iter_csv(f, path)
            return
        for lineno, line in _lines(f, path):
            where = f"{path}:{lineno}"
            raw = line.rstrip(b"\r\n")
            stripped = _decode(raw, where)
            if not stripped.strip():
                continue
            if fmt == "text":
                yield Record(where, {"text": stripped}, raw)
                continue
            try:
                obj = json.loads(stripped)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{where}: JSON nested too deeply") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: each JSONL line must be an object")
            yield Record(where, obj, raw)


def read_records(path: str | os.PathLike, kind: str) -> list[Record]:
    """All records of ``path`` for task ``kind``, validated; raises DataError naming file and line."""
    path = Path(path)
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = [_validate(r, kind) for r in _iter_raw(path)]
    if not records:
        raise DataError(f"{path}: no records (empty file)")
    return records


def _need_str(r: Record, key: str) -> str:
    v = r.fields.get(key)
    if not isinstance(v, str):
        raise DataError(f"{r.source}: missing or non-text field '{key}'")
    return v


def _validate(r: Record, kind: str) -> Record:
    f = r.fields
    if kind in (LM, MLM):
        if "text" in f:
            _need_str(r, "text")
        elif kind == LM and "prompt" in f:
            _need_str(r, "prompt")
            if not _need_str(r, "completion"):
                raise DataError(f"{r.source}: empty 'completion': the record has no loss tokens")
        else:
            need = "'text'" if kind == MLM else "'text', or 'prompt' and 'completion'"
            raise DataError(f"{r.source}: missing field {need}")
    elif kind == MC:
        _need_str(r, "question")
        choices = f.get("choices")
        if isinstance(choices, str):  # CSV: a JSON array in a cell
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError:
                raise DataError(f"{r.source}: 'choices' must be a JSON array") from None
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{r.source}: 'choices' must be a list of at least two strings")
        answer = _as_int(r, "answer")
        if not 0 <= answer < len(choices):
            raise DataError(f"{r.source}: 'answer' {answer} is not a valid index into {len(choices)} choices")
        r = Record(r.source, {**f, "choices": choices, "answer": answer}, r.raw)
    elif kind == CLS:
        _need_str(r, "text")
        r = Record(r.source, {**f, "label": _as_int(r, "label")}, r.raw)
    return Record(r.source, r.fields, r.raw, _canonical(r.fields, kind))


def _canonical(fields: dict, kind: str) -> bytes:
    if kind == MC:
        used = ("question", "choices", "answer")
    elif kind == CLS:
        used = ("text", "label")
    else:
        used = ("text",) if "text" in fields else ("prompt", "completion")
    doc = {k: fields[k] for k in used}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _as_int(r: Record, key: str) -> int:
    v = r.fields.get(key)
    if isinstance(v, bool):
        v = None
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if not isinstance(v, int):
        raise DataError(f"{r.source}: missing or non-integer field '{key}'")
    return v


# -- tokenisation ------------------------------------------------------------------
@dataclass
class Example:
    """One tokenised record: ``labels`` is IGNORE where a token carries no loss."""

    input_ids: list[int]
    labels: list[int] | int
    source: str = ""


def max_positions(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            # RoBERTa reserves padding_idx + 1 positions.
            return v - 2 if config.model_type == "roberta" else v
    return 2048


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def lm_example(tokenizer, r: Record, max_length: int) -> Example:
    """Causal-LM example; with prompt/completion the loss is on the completion only."""
    bos = _bos(tokenizer)
    if "text" in r.fields:
        ids = bos + _encode(tokenizer, r.fields["text"])
        if len(ids) > max_length:
            warnings.warn(f"{r.source}: text truncated to {max_length} tokens", stacklevel=2)
            ids = ids[:max_length]
        labels = [IGNORE] * len(bos) + ids[len(bos) :]
    else:
        prompt = bos + _encode(tokenizer, r.fields["prompt"])
        completion = _encode(tokenizer, r.fields["completion"])
        if len(prompt) + len(completion) > max_length:
            warnings.warn(
                f"{r.source}: prompt truncated from the left to fit {max_length} tokens", stacklevel=2
            )
            keep = max(max_length - len(completion), 1)
            prompt = prompt[-keep:]
            completion = completion[: max_length - len(prompt)]
        ids = prompt + completion
        labels = [IGNORE] * len(prompt) + completion
    # The first token is never predicted (nothing precedes it).
    if sum(1 for x in labels[1:] if x != IGNORE) == 0:
        raise DataError(f"{r.source}: the record has no loss tokens")
    return Example(ids, labels, r.source)


def cls_example(tokenizer, r: Record, max_length: int, num_labels: int) -> Example:
    label = r.fields["label"]
    if not 0 <= label < num_labels:
        raise DataError(f"{r.source}: label {label} outside 0..{num_labels - 1}")
    ids = tokenizer(r.fields["text"], truncation=True, max_length=max_length)["input_ids"]
    return Example(ids, label, r.source)


def mlm_example(
    tokenizer, r: Record, max_length: int, generator: torch.Generator, rate: float = 0.15
) -> Example:
    """Mask ``rate`` of the non-special tokens (at least one) with the mask token."""
    ids = tokenizer(r.fields["text"], truncation=True, max_length=max_length)["input_ids"]
    special = set(tokenizer.all_special_ids)
    candidates = [i for i, t in enumerate(ids) if t not in special]
    if not candidates:
        raise DataError(f"{r.source}: the record has no tokens to mask")
    n = max(1, round(rate * len(candidates)))
    import torch

    chosen = torch.randperm(len(candidates), generator=generator)[:n].tolist()
    labels = [IGNORE] * len(ids)
    masked = list(ids)
    for c in chosen:
        pos = candidates[c]
        labels[pos] = ids[pos]
        masked[pos] = tokenizer.mask_token_id
    return Example(masked, labels, r.source)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; ``labels`` is (B,) for classification, (B, T) otherwise."""
    import torch

    width = max((len(e.input_ids) for e in examples), default=1)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if examples and isinstance(examples[0].labels, int):
        batch["labels"] = torch.tensor([e.labels for e in examples], dtype=torch.long)
    else:
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
        batch["labels"] = labels
    return batch


def make_examples(
    kind: str,
    records: Sequence[Record],
    tokenizer,
    max_length: int,
    num_labels: int | None = None,
    mask_seed: int = 0,
) -> list[Example]:
    """Records -> examples for ``kind`` (lm, cls or mlm); MLM masks with ``mask_seed`` so runs repeat."""
    if kind == LM:
        return [lm_example(tokenizer, r, max_length) for r in records]
    if kind == CLS:
        return [cls_example(tokenizer, r, max_length, int(num_labels)) for r in records]
    if kind == MLM:
        import torch

        gen = torch.Generator().manual_seed(mask_seed)
        return [mlm_example(tokenizer, r, max_length, gen) for r in records]
    raise ValueError(f"no training examples for data kind {kind!r}")
