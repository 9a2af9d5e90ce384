"""What the reference rows' selection and the faster evaluation rely on.

* Multiple-choice scoring shares one forward pass among single-token choices: it must give the
  same log-likelihoods as scoring each (question + choice) sequence on its own.
* The sweep reads epochs 1, 2 and 4 from one 4-epoch run: with a constant learning rate the model
  after epoch k must be exactly the k-epoch model.
* The demo's validation split holds out whole fine-tuning families, never evaluation questions.
"""

from __future__ import annotations

import json

import torch
from tiny import WORDS, make_tiny_checkpoint

from offsite.data import MC, Record, lm_example, read_records
from offsite.demo import corpus
from offsite.evaluation.metrics import choice_log_likelihoods, multiple_choice_accuracy
from offsite.full_finetune import SETTINGS_FILE, finetune_full
from offsite.models.loading import load_model, load_tokenizer
from offsite.training.finetune import TrainConfig, train


def _one_by_one(model, tokenizer, records) -> list[list[float]]:
    """The plain definition: each question + choice alone, summing the choice tokens' log-probs."""
    bos = [tokenizer.bos_token_id]
    out = []
    for r in records:
        q = bos + tokenizer(r.fields["question"], add_special_tokens=False)["input_ids"]
        row = []
        for choice in r.fields["choices"]:
            c = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([q + c])
            logp = torch.log_softmax(model(input_ids=ids).logits.float()[0, :-1], dim=-1)
            row.append(sum(logp[len(q) - 1 + i, t].item() for i, t in enumerate(c)))
        out.append(row)
    return out


def test_shared_context_scores_equal_one_sequence_per_choice(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "llama", layers=4)
    model, tok = load_model(src, dtype=torch.float32).eval(), load_tokenizer(src)
    task = tmp_path / "mc.jsonl"
    rows = [
        # single-token choices (the shared path), questions of different lengths
        {"question": "the cat sat on", "choices": ["mat", "dog", "red"], "answer": 0},
        {"question": "a dog", "choices": ["sat", "cat", "on", "the"], "answer": 2},
        # a multi-token choice sends the record down the one-sequence-per-choice path
        {"question": "the dog sat", "choices": ["on the mat", "red"], "answer": 0},
    ]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_records(task, MC)
    with torch.no_grad():
        fast = choice_log_likelihoods(model, tok, records, batch_size=2)
        slow = _one_by_one(model, tok, records)
    assert [len(r) for r in fast] == [3, 4, 2]
    for f, s in zip(fast, slow, strict=True):
        assert torch.allclose(torch.tensor(f), torch.tensor(s), atol=1e-4), (f, s)
    acc = multiple_choice_accuracy(model, tok, records)
    expected = sum(
        max(range(len(s)), key=s.__getitem__) == r.fields["answer"]
        for s, r in zip(slow, records, strict=True)
    )
    assert acc["acc"] == expected / len(records)


def _examples(tok, n=24):
    import random

    rng = random.Random(0)
    rows = [
        {"prompt": " ".join(rng.choices(WORDS, k=4)), "completion": " " + " ".join(rng.choices(WORDS, k=2))}
        for _ in range(n)
    ]
    return [lm_example(tok, Record(f"line {i}", r), 32) for i, r in enumerate(rows)]


def test_epoch_k_of_a_longer_run_is_the_k_epoch_model(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "llama", layers=4)
    tok = load_tokenizer(src)
    examples = _examples(tok)

    def run(epochs: int, snapshot_at: int | None = None):
        model = load_model(src, dtype=torch.float32)
        snap = {}

        def on_epoch(e: int) -> None:
            if e + 1 == snapshot_at:
                snap.update({k: v.clone() for k, v in model.state_dict().items()})

        cfg = TrainConfig(epochs=epochs, lr=3e-3, batch_size=8, seed=5)
        torch.manual_seed(5)
        train(
            model, model.parameters(), examples, cfg, pad_id=tok.pad_token_id, shift=True, on_epoch=on_epoch
        )
        return model.state_dict(), snap

    two, _ = run(2)
    _, at_two = run(3, snapshot_at=2)
    assert all(torch.equal(two[k], at_two[k]) for k in two)
    three, _ = run(3)
    assert not all(torch.equal(two[k], three[k]) for k in two)


def test_full_finetune_epoch_hook_sees_the_model_and_records_its_settings(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "llama", layers=4)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "the cat", "completion": " sat"}) + "\n" for _ in range(8)))
    seen = []
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=4, seed=0)
    finetune_full(src, data, tmp_path / "out", cfg, on_epoch=lambda e, m: seen.append((e, m.training)))
    assert seen == [(0, False), (1, False)]
    recorded = json.loads((tmp_path / "out" / SETTINGS_FILE).read_text())
    assert recorded == {"full_finetune": cfg.to_json()}


def test_validation_split_holds_out_whole_training_families():
    world = corpus.build_world(0)
    train, evals = corpus.downstream_task(world)
    rest, questions = corpus.validation_split(world, train, 0.1, seed=3)
    family = {e: f for f in world.families for e in world.members[f]}

    def fam(prompt: str) -> str:
        return family[prompt.removeprefix("Q : ").split(" ? ")[0]]

    held = {fam(q["question"]) for q in questions}
    assert held and held <= set(world.train_families)
    assert not held & {fam(r["prompt"]) for r in rest}
    assert len(rest) + len(questions) == len(train) and len(questions) >= 0.1 * len(train)
    # Never an evaluation question; and a question's answer is its family's fact.
    assert not {q["question"] for q in questions} & {q["question"] for q in evals}
    for q in questions:
        e, a = q["question"].removeprefix("Q : ").removesuffix(" => A :").split(" ? ")
        assert q["choices"][q["answer"]] == " " + world.fact(e, a)
    assert corpus.validation_split(world, train, 0.1, seed=3) == (rest, questions)
    assert corpus.validation_split(world, train, 0.1, seed=4)[1] != questions


def test_eval_says_which_settings_each_fine_tuned_row_used(tmp_path):
    from offsite.evaluation.settings import EvalInputs, describe_hyperparameters, evaluate_settings
    from offsite.plug import manifest_from_bundle_dir, plug
    from offsite.prepare import PrepareOptions, prepare
    from offsite.tune import TuneOptions, tune

    src = make_tiny_checkpoint(tmp_path / "m", "llama", layers=6)
    prepare(src, tmp_path / "b", PrepareOptions())
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "the cat", "completion": " sat"}) + "\n" for _ in range(8)))
    tune(
        tmp_path / "b",
        data,
        tmp_path / "a",
        TuneOptions(epochs=2, lr=3e-3, batch_size=4, eval_fraction=0, dp=False),
    )
    plug(src, tmp_path / "a", tmp_path / "merged", manifest_from_bundle_dir(tmp_path / "b"))
    finetune_full(src, data, tmp_path / "ft", TrainConfig(epochs=1, lr=1e-4, batch_size=8))
    task = tmp_path / "mc.jsonl"
    task.write_text(json.dumps({"question": "the cat", "choices": ["sat", "dog"], "answer": 0}) + "\n")
    inputs = EvalInputs(
        model=src,
        bundle=tmp_path / "b",
        adapter=tmp_path / "a",
        merged=tmp_path / "merged",
        full_ft=tmp_path / "ft",
    )
    report = evaluate_settings(task, "mc", inputs)
    h = {r.setting: r.hyperparameters for r in report.rows}
    assert h["full zero-shot"] is None and h["emulator zero-shot"] is None
    assert (h["emulator fine-tuned"]["lr"], h["emulator fine-tuned"]["epochs"]) == (3e-3, 2)
    assert h["plug-in"] == h["emulator fine-tuned"] and h["plug-in"]["dp"] is False
    assert (h["full fine-tuned"]["lr"], h["full fine-tuned"]["epochs"]) == (1e-4, 1)
    assert describe_hyperparameters(h["plug-in"]) == "no DP · lr 0.003 · 2 ep · batch 4"
    assert report.to_json()["hyperparameters"]["full fine-tuned"]["batch_size"] == 8
    # A merged model from before settings were recorded, or a damaged record: "unknown", not an error.
    (tmp_path / "merged" / "offsite_plug.json").write_text("{not json")
    assert evaluate_settings(task, "mc", inputs).rows[3].hyperparameters is None
