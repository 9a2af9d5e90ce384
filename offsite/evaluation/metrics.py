"""Metrics: perplexity (lm, mlm), multiple-choice accuracy (lm-eval's acc / acc_norm), accuracy (cls)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from offsite.data import IGNORE, Example, Record, collate, max_positions
from offsite.device import inputs_for, to_device_of
from offsite.training.finetune import batches


@torch.no_grad()
def token_perplexity(
    model: nn.Module, examples: Sequence[Example], pad_id: int, shift: bool, batch_size: int = 32
) -> float:
    """exp(total NLL / total loss tokens) over the whole set."""
    nll, count = 0.0, 0
    for chunk in batches(examples, batch_size, None):
        b = inputs_for(model, collate(chunk, pad_id))
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        labels = to_device_of(b["labels"], logits)
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        nll += F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        ).item()
        count += int((labels != IGNORE).sum())
    return math.exp(nll / max(count, 1))


@torch.no_grad()
def classification_accuracy(
    model: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 64
) -> float:
    correct = 0
    for chunk in batches(examples, batch_size, None):
        b = inputs_for(model, collate(chunk, pad_id))
        pred = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
        correct += int((pred == to_device_of(b["labels"], pred)).sum())
    return correct / max(len(examples), 1)


@torch.no_grad()
def multiple_choice_accuracy(
    model: nn.Module, tokenizer, records: Sequence[Record], batch_size: int = 64
) -> dict[str, float]:
    """Score each choice by the summed log-likelihood of its tokens after the question.

    ``acc`` picks the highest sum; ``acc_norm`` divides by the choice's length in bytes, as
    lm-eval does. The question is truncated from the left if question + choice is too long.
    """
    limit = max_positions(model.config)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pairs: list[tuple[list[int], int]] = []  # (ids, number of choice tokens)
    for r in records:
        q = bos + tokenizer(r.fields["question"], add_special_tokens=False)["input_ids"]
        for choice in r.fields["choices"]:
            c = tokenizer(choice, add_special_tokens=False)["input_ids"] or [tokenizer.unk_token_id]
            ctx = q[-max(1, limit - len(c)) :]
            pairs.append((ctx + c, len(c)))
    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        examples = [Example(ids, [IGNORE] * (len(ids) - n) + ids[len(ids) - n :]) for ids, n in chunk]
        b = inputs_for(model, collate(examples, tokenizer.pad_token_id))
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        labels = to_device_of(b["labels"], logits)[:, 1:]
        mask = labels != IGNORE
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores.extend((picked * mask).sum(dim=1).tolist())
    acc = acc_norm = 0
    i = 0
    for r in records:
        n = len(r.fields["choices"])
        s = scores[i : i + n]
        i += n
        lengths = [max(len(c.encode("utf-8")), 1) for c in r.fields["choices"]]
        acc += int(max(range(n), key=lambda k: s[k]) == r.fields["answer"])
        acc_norm += int(max(range(n), key=lambda k: s[k] / lengths[k]) == r.fields["answer"])
    return {"acc": acc / len(records), "acc_norm": acc_norm / len(records)}
