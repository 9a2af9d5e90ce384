"""Tiny real `transformers` models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedTokenizerFast,
)

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<mask>", "<cls>", "<sep>")


def word_level_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over ``words`` plus the special tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        mask_token="<mask>",
        cls_token="<cls>",
        sep_token="<sep>",
    )


WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "is",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "and",
    "or",
    "not",
    "yes",
    "no",
    "one",
    "two",
    "three",
]
DECODERS = ("gpt2", "opt", "llama", "mistral", "qwen2", "bloom")
ENCODERS = ("bert", "roberta")
FAMILIES = DECODERS + ENCODERS


def tiny_config(model_type: str, layers: int = 6, hidden: int = 32):
    tok = word_level_tokenizer(WORDS)
    vocab = len(tok)
    common = dict(
        vocab_size=vocab,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    kw = {
        "gpt2": dict(
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
        "opt": dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            ffn_dim=2 * hidden,
            word_embed_proj_dim=hidden,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
        ),
        "llama": dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        ),
        "mistral": dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=64,
        ),
        "qwen2": dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=64,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=2,
        ),
        "bloom": dict(
            hidden_size=hidden, n_layer=layers, n_head=4, hidden_dropout=0.0, attention_dropout=0.0
        ),
        "bert": dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=2 * hidden,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
        "roberta": dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=2 * hidden,
            max_position_embeddings=70,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
    }[model_type]
    return AutoConfig.for_model(model_type, **common, **kw), tok


def make_tiny_checkpoint(
    out: Path, model_type: str, layers: int = 6, hidden: int = 32, seed: int = 0, distinct: bool = True
) -> Path:
    """Save a tiny randomly initialised checkpoint + tokenizer to ``out``.

    With ``distinct`` every tensor is re-drawn from N(0, 0.5): fresh norms are all ones and
    would make different blocks' tensors identical, which defeats content-hash checks.
    """
    config, tok = tiny_config(model_type, layers, hidden)
    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if model_type in DECODERS else AutoModelForMaskedLM
    model = cls.from_config(config)
    if distinct:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.5 if p.dim() == 1 else 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def load_full(path: Path, model_type: str, num_labels: int | None = None):
    if model_type in DECODERS:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if num_labels:
        return AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.float32, num_labels=num_labels
        ).eval()
    return AutoModelForMaskedLM.from_pretrained(path, dtype=torch.float32).eval()


def write_lm_records(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` prompt/completion records of random words (4 + 2), one JSON object per line."""
    import json
    import random

    rng = random.Random(seed)
    lines = (
        json.dumps(
            {"prompt": " ".join(rng.choices(WORDS, k=4)), "completion": " ".join(rng.choices(WORDS, k=2))}
        )
        for _ in range(n)
    )
    path.write_text("".join(line + "\n" for line in lines))
    return path


def make_dp_setup(root: Path) -> Path:
    """A tiny LLaMA's bundle, 64 training records and a data owner's keys under ``root``: what the DP
    tests train on."""
    from offsite import crypto
    from offsite.prepare import PrepareOptions, prepare

    src = make_tiny_checkpoint(root / "model", "llama", layers=6)
    prepare(src, root / "bundle", PrepareOptions())
    write_lm_records(root / "train.jsonl", 64)
    crypto.init_client_keys(root / "keys")
    return root
