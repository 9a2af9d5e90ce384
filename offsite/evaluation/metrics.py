"""Metrics: perplexity (lm, mlm), multiple-choice accuracy (lm-eval's acc / acc_norm), accuracy (cls)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from offsite.data import IGNORE, Example, Record, collate, max_positions
from offsite.device import inputs_for, to_cpu, to_device_of
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
def choice_log_likelihoods(
    model: nn.Module, tokenizer, records: Sequence[Record], batch_size: int = 64
) -> list[list[float]]:
    """Summed log-likelihood of each choice's tokens after its question, record by record.

    When every choice of a record is one token and the question fits untruncated, the choices
    share one context: a single forward pass of the question gives all of them (the log-softmax
    at its last position, read at each choice's token). Other records run one sequence per
    choice. Both paths compute the same sums; the shared one is 1/len(choices) of the work.
    """
    limit = max_positions(model.config)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    shared: list[tuple[int, list[int], list[int]]] = []  # (record, question ids, choice tokens)
    pairs: list[tuple[int, list[int], int]] = []  # (record, ids, number of choice tokens)
    for i, r in enumerate(records):
        q = bos + tokenizer(r.fields["question"], add_special_tokens=False)["input_ids"]
        choices = [
            tokenizer(c, add_special_tokens=False)["input_ids"] or [tokenizer.unk_token_id]
            for c in r.fields["choices"]
        ]
        if all(len(c) == 1 for c in choices) and len(q) + 1 <= limit:
            shared.append((i, q, [c[0] for c in choices]))
            continue
        for c in choices:
            ctx = q[-max(1, limit - len(c)) :]
            pairs.append((i, ctx + c, len(c)))
    scores: list[list[float]] = [[] for _ in records]
    for start in range(0, len(shared), batch_size):
        chunk = shared[start : start + batch_size]
        b = inputs_for(
            model, collate([Example(q, [IGNORE] * len(q)) for _, q, _ in chunk], tokenizer.pad_token_id)
        )
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        # Indexing on the CPU: the last positions' log-probabilities are few, and come back as lists.
        last = torch.tensor([len(q) - 1 for _, q, _ in chunk])
        logp = to_cpu(
            torch.log_softmax(
                logits[to_device_of(torch.arange(len(chunk)), logits), to_device_of(last, logits)], dim=-1
            )
        )
        for row, (i, _, tokens) in enumerate(chunk):
            scores[i] = logp[row, tokens].tolist()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        examples = [Example(ids, [IGNORE] * (len(ids) - n) + ids[len(ids) - n :]) for _, ids, n in chunk]
        b = inputs_for(model, collate(examples, tokenizer.pad_token_id))
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        labels = to_device_of(b["labels"], logits)[:, 1:]
        mask = labels != IGNORE
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        for (i, _, _), s in zip(chunk, (picked * mask).sum(dim=1).tolist(), strict=True):
            scores[i].append(s)
    return scores


@torch.no_grad()
def multiple_choice_accuracy(
    model: nn.Module, tokenizer, records: Sequence[Record], batch_size: int = 64
) -> dict[str, float]:
    """Score each choice by the summed log-likelihood of its tokens after the question.

    ``acc`` picks the highest sum; ``acc_norm`` divides by the choice's length in bytes, as
    lm-eval does. The question is truncated from the left if question + choice is too long.
    """
    acc = acc_norm = 0
    for r, s in zip(records, choice_log_likelihoods(model, tokenizer, records, batch_size), strict=True):
        n = len(r.fields["choices"])
        lengths = [max(len(c.encode("utf-8")), 1) for c in r.fields["choices"]]
        acc += int(max(range(n), key=lambda k: s[k]) == r.fields["answer"])
        acc_norm += int(max(range(n), key=lambda k: s[k] / lengths[k]) == r.fields["answer"])
    return {"acc": acc / len(records), "acc_norm": acc_norm / len(records)}
