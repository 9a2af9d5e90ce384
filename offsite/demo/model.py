"""The demo's model owner: a small LLaMA-architecture model pretrained on the generated world.

Built on first use and cached in the user cache directory under a key made of the
library versions and the recipe, so a warm run skips pretraining. The cache holds a
normal Hugging Face checkpoint plus the demo's data files.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from offsite.demo import corpus
from offsite.fileio import canonical_json, sha256_bytes, staged_directory


@dataclass(frozen=True)
class PretrainRecipe:
    hidden: int = 128
    layers: int = 8
    heads: int = 4
    intermediate: int = 384
    seq: int = 64
    steps: int = 450
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 50
    docs: int = 6000
    world_seed: int = 0
    init_seed: int = 1234


def cache_key(recipe: PretrainRecipe) -> str:
    import tokenizers
    import transformers

    import offsite

    versions = {
        "offsite": offsite.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    return sha256_bytes(canonical_json({"versions": versions, "recipe": asdict(recipe)}))[:16]


def hf_tokenizer(world: corpus.World) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=corpus.build_tokenizer(world),
        bos_token=corpus.BOS,
        eos_token=corpus.EOS,
        unk_token=corpus.UNK,
        pad_token=corpus.PAD,
    )


def _pack(tokenizer: PreTrainedTokenizerFast, docs: list[str], seq: int) -> torch.Tensor:
    """Pretraining only (public text of the owner): documents are concatenated into fixed blocks."""
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc + [tokenizer.eos_token_id])
    n = len(ids) // (seq - 1)
    body = torch.tensor(ids[: n * (seq - 1)]).view(n, seq - 1)
    return torch.cat([torch.full((n, 1), tokenizer.bos_token_id), body], dim=1)


def pretrain(recipe: PretrainRecipe, world: corpus.World, tokenizer, on_step=None) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=recipe.seq,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    data = _pack(tokenizer, corpus.pretraining_corpus(world, recipe.docs), recipe.seq)
    torch.manual_seed(recipe.init_seed)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / recipe.warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(s, recipe.steps) / recipe.steps))
        ),
    )
    gen = torch.Generator().manual_seed(0)
    perm, pos = torch.randperm(len(data), generator=gen), 0
    model.train()
    for step in range(recipe.steps):
        if pos + recipe.batch > len(perm):
            perm, pos = torch.randperm(len(data), generator=gen), 0
        x = data[perm[pos : pos + recipe.batch]]
        pos += recipe.batch
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if on_step:
            on_step(step + 1, loss.item())
    model.eval()
    return model


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def cached_demo(recipe: PretrainRecipe, cache: Path) -> Path | None:
    """The demo owner pretrained by ``recipe`` under the demo cache ``cache``, if complete there."""
    root = cache / cache_key(recipe)
    return (
        root
        if (root / "model" / "config.json").is_file() and (root / "data" / "eval.jsonl").is_file()
        else None
    )


def build_demo_owner(recipe: PretrainRecipe, cache: Path, on_step=None) -> Path:
    """Pretrain the demo model and write it with the demo's data files into the demo cache ``cache``."""
    root = cache / cache_key(recipe)
    world = corpus.build_world(recipe.world_seed)
    tokenizer = hf_tokenizer(world)
    model = pretrain(recipe, world, tokenizer, on_step)
    train, evals = corpus.downstream_task(world)
    with staged_directory(root, overwrite=True) as stage:
        model.save_pretrained(stage / "model", safe_serialization=True)
        tokenizer.save_pretrained(stage / "model")
        (stage / "data").mkdir()
        _write_jsonl(stage / "data" / "train.jsonl", train)
        _write_jsonl(stage / "data" / "eval.jsonl", evals)
        (stage / "data" / "public.txt").write_text("\n".join(corpus.distillation_corpus()) + "\n")
        (stage / "recipe.json").write_bytes(canonical_json(asdict(recipe)))
    return root
