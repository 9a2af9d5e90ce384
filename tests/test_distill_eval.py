"""Distillation (only kept middle blocks train, resumable) and the five-setting evaluation."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny import WORDS, make_tiny_checkpoint

from offsite.data import LM, lm_example, read_records
from offsite.evaluation.settings import EvalInputs, evaluate_settings
from offsite.formats.bundle import Bundle
from offsite.models.emulator import build_emulator
from offsite.models.loading import load_model, load_tokenizer
from offsite.models.registry import get_blocks
from offsite.prepare import PrepareOptions, prepare
from offsite.training.distill import DistillConfig, Distiller


def _corpus(path, n=40, seed=0):
    rng = random.Random(seed)
    path.write_text(
        "".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=10))}) + "\n" for _ in range(n))
    )
    return path


def _distiller(src, cfg, layer_map):
    teacher = load_model(src, dtype=torch.float32)
    student = build_emulator(teacher, layer_map)
    tok = load_tokenizer(src)
    return (
        teacher,
        student,
        tok,
        Distiller(teacher, student, layer_map, 2, 2, cfg, pad_id=tok.pad_token_id, shift=True, use_lm=True),
    )


def test_distillation_trains_only_kept_middle_blocks_and_lowers_kd(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "llama", layers=8)
    layer_map = [0, 1, 2, 5, 6, 7]
    teacher, student, tok, d = _distiller(src, DistillConfig(steps=30, lr=3e-3, warmup_steps=3), layer_map)
    examples = [lm_example(tok, r, 64) for r in read_records(_corpus(tmp_path / "c.jsonl"), LM)]
    before = {k: v.clone() for k, v in student.state_dict().items()}
    kd_before = d.mean_kd(examples)
    d.train(examples)
    assert d.mean_kd(examples) < kd_before
    blocks = get_blocks(student)
    changed = {n for n, v in student.state_dict().items() if not torch.equal(v, before[n])}
    middle = {f"model.layers.{p}." for p in (2, 3)}
    assert changed and all(any(n.startswith(m) for m in middle) for n in changed)
    assert len(blocks) == 6


def test_distillation_resumes_from_its_checkpoint(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "gpt2", layers=8)
    corpus = _corpus(tmp_path / "c.jsonl")
    cfg = DistillConfig(steps=6, lr=3e-3, warmup_steps=2, checkpoint_every=3, batch_size=8)
    layer_map = [0, 1, 2, 5, 6, 7]
    _, straight, tok, d = _distiller(src, cfg, layer_map)
    examples = [lm_example(tok, r, 64) for r in read_records(corpus, LM)]
    d.train(examples)

    _, interrupted, _, d2 = _distiller(src, cfg, layer_map)

    def stop(step, _):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        d2.train(examples, on_step=stop, checkpoint=tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["meta"]["step"] == 3
    _, resumed, _, d3 = _distiller(src, cfg, layer_map)
    d3.train(examples, checkpoint=tmp_path / "ckpt")
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=n)


def test_prepare_with_distillation_records_it_in_the_manifest(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "opt", layers=8)
    prepare(
        src,
        tmp_path / "b",
        PrepareOptions(
            emulator_layers=2,
            distill_data=_corpus(tmp_path / "c.jsonl"),
            distill=DistillConfig(steps=5, warmup_steps=1),
        ),
    )
    d = Bundle.open(tmp_path / "b").manifest["distillation"]
    assert d["steps"] == 5 and d["kd_weight"] == 30.0
    assert set(d["held_out_perplexity"]) == {"full", "emulator_before", "emulator_after"}


def test_five_settings_fill_what_they_can(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "llama", layers=6)
    prepare(src, tmp_path / "b", PrepareOptions())
    task = tmp_path / "mc.jsonl"
    task.write_text(
        "".join(
            json.dumps({"question": "the cat is", "choices": ["red", "blue", "big"], "answer": i % 3}) + "\n"
            for i in range(6)
        )
    )
    report = evaluate_settings(task, "mc", EvalInputs(model=src, bundle=tmp_path / "b", merged=src))
    rows = {r.setting: r for r in report.rows}
    assert rows["full zero-shot"].metrics == rows["plug-in"].metrics
    assert 0 <= rows["emulator zero-shot"].metrics["acc"] <= 1
    assert rows["emulator fine-tuned"].metrics is None and "adapter" in rows["emulator fine-tuned"].note
    assert rows["full fine-tuned"].metrics is None
    lm = evaluate_settings(_corpus(tmp_path / "t.jsonl", 8), "lm", EvalInputs(model=src))
    assert lm.rows[0].metrics["perplexity"] > 1


def test_cls_zero_shot_rows_are_na(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "bert")
    task = tmp_path / "cls.jsonl"
    task.write_text("".join(json.dumps({"text": "the cat", "label": i % 2}) + "\n" for i in range(4)))
    prepare(src, tmp_path / "b", PrepareOptions(num_labels=2))
    report = evaluate_settings(task, "cls", EvalInputs(model=src, bundle=tmp_path / "b"))
    assert report.rows[0].metrics is None and "head is new" in report.rows[0].note


def test_masked_lm_perplexity_uses_a_fixed_masking_seed(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "roberta")
    prepare(src, tmp_path / "b", PrepareOptions())
    corpus = _corpus(tmp_path / "t.jsonl", 12)
    first = evaluate_settings(corpus, "mlm", EvalInputs(model=src, bundle=tmp_path / "b"))
    second = evaluate_settings(corpus, "mlm", EvalInputs(model=src, bundle=tmp_path / "b"))
    assert first.to_json() == second.to_json()
    assert first.rows[0].metrics["perplexity"] > 1 and first.rows[1].metrics["perplexity"] > 1
    with pytest.raises(Exception, match="masked-lm model"):
        evaluate_settings(corpus, "lm", EvalInputs(model=src))


def test_a_distillation_checkpoint_resumes_only_the_same_run(tmp_path):
    from dataclasses import replace

    from offsite.errors import OffsiteError

    src = make_tiny_checkpoint(tmp_path / "m", "gpt2", layers=8)
    other = make_tiny_checkpoint(tmp_path / "o", "gpt2", layers=8, seed=3)
    corpus = _corpus(tmp_path / "c.jsonl")
    cfg = DistillConfig(steps=4, lr=3e-3, warmup_steps=1, checkpoint_every=2)
    ckpt = tmp_path / "ckpt"

    def opts(**kw):
        base = dict(emulator_layers=2, distill_data=corpus, distill=cfg, distill_checkpoint=ckpt)
        return PrepareOptions(**{**base, **kw})

    first = prepare(src, tmp_path / "b1", opts())
    refused = [
        (other, opts(), "a different source model"),
        (src, opts(emulator_layers=3), "a different emulator layer map"),
        (src, opts(adapter_bottom=1, emulator_layers=3), "a different"),
        (src, opts(distill_data=_corpus(tmp_path / "c2.jsonl", seed=1)), "different distillation data"),
        (src, opts(distill=replace(cfg, lr=1e-3)), "different distillation settings"),
    ]
    for i, (model, o, message) in enumerate(refused):
        with pytest.raises(OffsiteError, match=message):
            prepare(model, tmp_path / f"r{i}", o)
        assert not (tmp_path / f"r{i}").exists()
    # Only how often it checkpoints differs: the same run, resumed (already finished), same bundle.
    again = prepare(src, tmp_path / "b2", opts(distill=replace(cfg, checkpoint_every=3)))
    assert again.bundle_id == first.bundle_id
