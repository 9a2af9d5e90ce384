"""The demo's generated world: deterministic, and held-out questions cannot be memorised."""

from __future__ import annotations

from offsite.demo import corpus
from offsite.demo.model import hf_tokenizer


def test_world_and_task_are_deterministic_and_disjoint():
    a, b = corpus.build_world(0), corpus.build_world(0)
    assert a == b and corpus.build_world(1) != a
    train, evals = corpus.downstream_task(a)
    assert (train, evals) == corpus.downstream_task(b)
    assert len(evals) >= 1000
    train_entities = {r["prompt"].split(" ? ")[0] for r in train}
    eval_entities = {r["question"].split(" ? ")[0] for r in evals}
    assert not train_entities & eval_entities
    # Held-out families are disjoint too, so fine-tuning cannot reveal a held-out fact.
    assert not set(a.train_families) & set(a.eval_families)
    for r in evals:
        assert 0 <= r["answer"] < len(r["choices"]) and len(set(r["choices"])) == len(r["choices"])


def test_every_word_has_a_token_and_the_question_format_is_new():
    world = corpus.build_world(0)
    tok = hf_tokenizer(world)
    docs = corpus.pretraining_corpus(world, n_docs=200)
    train, evals = corpus.downstream_task(world)
    texts = docs + corpus.distillation_corpus(50) + [r["prompt"] + r["completion"] for r in train[:200]]
    for text in texts:
        assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text
    assert not any("=>" in d for d in docs)
