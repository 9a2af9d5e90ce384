"""Choose the settings of the demo's non-private reference rows on a validation split, fairly.

    python benchmarks/sweep_reference.py [--quick] [--seeds 0 1 2] [--records N] [--test] [--json OUT]

Every non-private row gets the same selection budget: learning rates {1e-4, 3e-4, 1e-3, 3e-3} x
epochs {1, 2, 4} (batch 32, plain AdamW with a constant learning rate, as `offsite owner
finetune-full` and `offsite client train --no-dp` train). The rows:

* full fine-tuned: every parameter of the full model;
* emulator fine-tuned without DP: the adapter trained on the emulator, scored on the emulator;
* plug-in without DP: the same kind of adapter, scored plugged into the full model.

Selection never sees the evaluation set. Per seed, `corpus.validation_split` holds out whole
fine-tuning families (at least 10% of the records; the evaluation is about families fine-tuning
never mentions, so a random split of records would reward memorising family facts) and turns them
into multiple-choice questions built like the evaluation's (with --records N, the families' records
among all fine-tuning records, see `split`). A configuration is trained on the
rest; with a constant learning rate the model after epoch k of a 4-epoch run is exactly the
k-epoch model (tests/test_reference_selection.py), so one run per learning rate gives all three
epoch counts. The chosen setting of a row is the lowest mean validation log-loss over the seeds
(ties: fewer epochs, then the smaller learning rate); see `validation_scores` for why not accuracy.

`--test` then trains each row with its chosen setting on all the records, per seed, through the
library's own calls (`finetune_full`, `tune(dp=False)` + `plug`) and reports the evaluation-set
accuracy (mean and spread over seeds); `--cross-check` adds full fine-tuning written from scratch
with transformers and torch alone (`independent_full_ft`), same setting, as a check on the row. `--records N` uses the first N fine-tuning records (the
small-data variant: 480). `--quick` is a smoke test (480 records, one seed, 2 x 2 grid).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from offsite import state
from offsite.data import LM, MC, read_records
from offsite.demo import corpus
from offsite.demo.model import PretrainRecipe, build_demo_owner, cached_demo
from offsite.demo.settings import (
    EMULATOR_NODP,
    FULL,
    FULL_FT,
    PLUGIN_NODP,
    REFERENCE,
    Reference,
    prepare_options,
)
from offsite.evaluation.metrics import choice_log_likelihoods
from offsite.formats.bundle import Bundle
from offsite.full_finetune import finetune_full
from offsite.models.loading import load_model, load_tokenizer
from offsite.models.plugin import plug_in
from offsite.prepare import prepare
from offsite.training.finetune import TrainConfig, train
from offsite.tune import TuneOptions, adapter_tensors_for_export, load_for_tuning

LRS = (1e-4, 3e-4, 1e-3, 3e-3)
EPOCHS = (1, 2, 4)
BATCH = 32
ROWS = (FULL_FT, EMULATOR_NODP, PLUGIN_NODP)
INDEPENDENT = "full fine-tuned, independent loop (cross-check)"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def demo_root() -> Path:
    recipe = PretrainRecipe()
    cache = state.demo_cache_dir()  # the demo's own cache: the same model
    return cached_demo(recipe, cache) or build_demo_owner(recipe, cache)


#: Where prepared bundles are kept (--bundles); None: the run's scratch directory.
BUNDLES: Path | None = None


def make_bundle(root: Path, work: Path, seed: int) -> Path:
    """The demo owner's bundle, prepared exactly as `offsite demo` prepares it (deterministic given
    the seed, so --bundles may keep it for later runs)."""
    work = BUNDLES or work
    out = work / f"bundle-{seed}"
    if not out.exists():
        prepare(root / "model", out, prepare_options(FULL, root / "data", seed))
    return out


def split(world, all_records: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """The training part of the first ``n`` records and the validation questions.

    Families are held out on the whole fine-tuning set; the validation questions are all of their
    records (360 for seed 0), so a small variant is selected on as many questions as the full task
    (its own held-out share would be about 60, too few to rank twelve settings). Neither part ever
    touches the evaluation set.
    """
    rest, questions = corpus.validation_split(world, all_records, 0.1, seed)
    kept = {r["prompt"] for r in rest}
    return [r for r in all_records[:n] if r["prompt"] in kept], questions


def validation_scores(model, tokenizer, questions) -> tuple[float, float]:
    """(accuracy, log-loss) on the validation questions.

    The log-loss is the mean of -log p(true choice), p the softmax over a question's choices of
    their log-likelihoods (the scores `acc` ranks). Selection uses it, not accuracy: the held-out
    fine-tuning families are ones pretraining repeated more often than the evaluation's (20 members
    per family against 8), so validation accuracy sits near its ceiling (95-99%) for most settings
    and cannot rank them, while the log-loss still sees a model that is confidently wrong or barely
    right.
    """
    model.eval()
    acc = nll = 0.0
    for r, s in zip(questions, choice_log_likelihoods(model, tokenizer, questions), strict=True):
        scores = torch.tensor(s)
        acc += int(int(scores.argmax()) == r.fields["answer"])
        nll -= torch.log_softmax(scores, dim=0)[r.fields["answer"]].item()
    return acc / len(questions), nll / len(questions)


def sweep_full(root: Path, train_file: Path, valid, seed: int, lrs, epochs) -> dict:
    """{(lr, epochs): (validation acc, log-loss)} for full fine-tuning."""
    tokenizer = load_tokenizer(root / "model")
    scores = {}
    for lr in lrs:

        def on_epoch(epoch: int, model, lr=lr) -> None:
            if epoch + 1 in epochs:
                scores[(lr, epoch + 1)] = validation_scores(model, tokenizer, valid)

        cfg = TrainConfig(epochs=max(epochs), lr=lr, batch_size=BATCH, seed=seed)
        finetune_full(root / "model", train_file, None, cfg, on_epoch=on_epoch)
    return scores


def sweep_adapter(root: Path, bundle_dir: Path, train_file: Path, valid, seed: int, lrs, epochs) -> dict:
    """{(lr, epochs): (emulator (acc, log-loss), plug-in (acc, log-loss))} for the non-private adapter.

    The same steps as `tune(dp=False)`: load the bundle and data, seed, plain `train` on the
    adapter's parameters; after each epoch the adapter is scored on the emulator and plugged into
    a fresh copy of the full model.
    """
    bundle = Bundle.open(bundle_dir)
    scores = {}
    for lr in lrs:
        opts = TuneOptions(
            epochs=max(epochs), lr=lr, batch_size=BATCH, seed=seed, eval_fraction=0.0, dp=False
        )
        inputs = load_for_tuning(bundle_dir, train_file, opts)
        torch.manual_seed(opts.seed)

        def on_epoch(epoch: int, inputs=inputs, lr=lr) -> None:
            if epoch + 1 not in epochs:
                return
            inputs.model.eval()
            emu = validation_scores(inputs.model, inputs.tokenizer, valid)
            full = load_model(root / "model", dtype=torch.float32)
            plug_in(full, bundle.spec, adapter_tensors_for_export(inputs.view, bundle))
            scores[(lr, epoch + 1)] = (emu, validation_scores(full, inputs.tokenizer, valid))
            inputs.model.train()

        cfg = TrainConfig(epochs=opts.epochs, lr=opts.lr, batch_size=opts.batch_size, seed=opts.seed)
        train(
            inputs.model,
            inputs.view.named_parameters().values(),
            inputs.train,
            cfg,
            pad_id=inputs.tokenizer.pad_token_id,
            shift=True,
            on_epoch=on_epoch,
        )
    return scores


def choose(table: dict[tuple[float, int], list[tuple[float, float]]]) -> tuple[float, int]:
    """Lowest mean validation log-loss; ties go to fewer epochs, then the smaller learning rate."""
    return min(table, key=lambda k: (statistics.mean(nll for _, nll in table[k]), k[1], k[0]))


def test_rows(root: Path, work: Path, records: list[dict], chosen: dict, seed: int) -> dict[str, float]:
    """Train each row with its chosen setting on all ``records`` through the library's own calls;
    return the evaluation-set accuracy of each row."""
    from offsite.evaluation.settings import EvalInputs, evaluate_settings
    from offsite.plug import manifest_from_bundle_dir, plug
    from offsite.tune import tune

    data = write_jsonl(work / f"test-train-{seed}.jsonl", records)
    eval_file = root / "data" / "eval.jsonl"
    out = work / f"test-{seed}"
    out.mkdir()
    bundle = make_bundle(root, work, seed)
    ref = chosen[FULL_FT]
    finetune_full(
        root / "model",
        data,
        out / "full-ft",
        TrainConfig(epochs=ref.epochs, lr=ref.lr, batch_size=ref.batch_size, seed=seed),
    )
    adapters = {}
    for row in (EMULATOR_NODP, PLUGIN_NODP):
        ref = chosen[row]
        key = (ref.lr, ref.epochs, ref.batch_size)
        if key not in adapters:  # the same setting is trained once
            adapters[key] = out / f"adapter-{len(adapters)}"
            opts = TuneOptions(
                epochs=ref.epochs,
                lr=ref.lr,
                batch_size=ref.batch_size,
                seed=seed,
                eval_fraction=0.0,
                dp=False,
            )
            tune(bundle, data, adapters[key], opts)
    emu_adapter = adapters[(chosen[EMULATOR_NODP].lr, chosen[EMULATOR_NODP].epochs, BATCH)]
    plug_adapter = adapters[(chosen[PLUGIN_NODP].lr, chosen[PLUGIN_NODP].epochs, BATCH)]
    plug(root / "model", plug_adapter, out / "merged", manifest_from_bundle_dir(bundle))
    report = evaluate_settings(
        eval_file,
        "mc",
        EvalInputs(
            model=root / "model",
            bundle=bundle,
            adapter=emu_adapter,
            merged=out / "merged",
            full_ft=out / "full-ft",
        ),
    )
    acc = {r.setting: r.metrics["acc"] for r in report.rows if r.metrics}
    return {
        "full zero-shot": acc["full zero-shot"],
        "emulator zero-shot": acc["emulator zero-shot"],
        FULL_FT: acc["full fine-tuned"],
        EMULATOR_NODP: acc["emulator fine-tuned"],
        PLUGIN_NODP: acc["plug-in"],
    }


def independent_full_ft(root: Path, records: list[dict], ref, seed: int) -> float:
    """Evaluation accuracy of full fine-tuning written from scratch with transformers and torch only
    (no offsite training code): the model's own loss over the completion tokens (a mean over the
    batch's tokens, not over records), a shuffled DataLoader, AdamW. A cross-check that the
    library's full fine-tuning row is not handicapped by its own loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offsite.evaluation.metrics import multiple_choice_accuracy

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(root / "model")
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    rows = []
    for r in records:
        prompt = [tok.bos_token_id] + tok(r["prompt"], add_special_tokens=False)["input_ids"]
        completion = tok(r["completion"], add_special_tokens=False)["input_ids"]
        rows.append((prompt + completion, [-100] * len(prompt) + completion))

    def collate(batch):
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (x, y) in enumerate(batch):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        return ids, mask, labels

    loader = torch.utils.data.DataLoader(rows, batch_size=ref.batch_size, shuffle=True, collate_fn=collate)
    opt = torch.optim.AdamW(model.parameters(), lr=ref.lr, weight_decay=0.0)
    model.train()
    for _ in range(ref.epochs):
        for ids, mask, labels in loader:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return multiple_choice_accuracy(model, tok, read_records(root / "data" / "eval.jsonl", MC))["acc"]


def fmt(values: list[float], scale: float = 100, digits: int = 1) -> str:
    m = scale * statistics.mean(values)
    if len(values) < 2:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def cell(pairs: list[tuple[float, float]]) -> str:
    """ "log-loss (acc %)" over seeds."""
    return f"{fmt([n for _, n in pairs], 1, 3)} ({fmt([a for a, _ in pairs])})"


def select(args, root, world, all_records, records, seeds, lrs, epochs, work, start) -> tuple[dict, dict]:
    """The sweep on the validation split: prints the table and the choice; returns (results, chosen)."""
    table: dict[str, dict[tuple[float, int], list[float]]] = {row: {} for row in ROWS}
    for seed in seeds:
        rest, questions = split(world, all_records, len(records), seed)
        train_file = write_jsonl(work / f"train-{seed}.jsonl", rest)
        valid = read_records(write_jsonl(work / f"valid-{seed}.jsonl", questions), MC)
        read_records(train_file, LM)  # fail early on a bad split
        print(
            f"seed {seed}: {len(rest)} training records, {len(questions)} validation questions",
            flush=True,
        )
        if "full" in args.rows:
            for k, acc in sweep_full(root, train_file, valid, seed, lrs, epochs).items():
                table[FULL_FT].setdefault(k, []).append(acc)
        if "adapter" in args.rows:
            bundle = make_bundle(root, work, seed)
            for k, (emu, plug) in sweep_adapter(root, bundle, train_file, valid, seed, lrs, epochs).items():
                table[EMULATOR_NODP].setdefault(k, []).append(emu)
                table[PLUGIN_NODP].setdefault(k, []).append(plug)
        print(f"  seed {seed} done at {time.perf_counter() - start:.0f} s", flush=True)
    rows = [row for row in ROWS if table[row]]
    print("\nvalidation log-loss (accuracy %), mean ± s.d. over seeds:\n")
    print("| lr | epochs | " + " | ".join(rows) + " |")
    print("|---|---|" + "---|" * len(rows))
    for lr in lrs:
        for e in epochs:
            print(f"| {lr:g} | {e} | " + " | ".join(cell(table[row][(lr, e)]) for row in rows) + " |")
    chosen = {row: Reference(*choose(table[row]), batch_size=BATCH) for row in rows}
    full_task = len(records) == len(all_records)  # the demo's settings are for the whole task
    print("\nchosen (lowest mean validation log-loss):\n")
    print("| row | lr | epochs | validation log-loss (acc %) |" + (" the demo uses |" if full_task else ""))
    print("|---|---|---|---|" + ("---|" if full_task else ""))
    for row in rows:
        c, demo = chosen[row], REFERENCE[row]
        line = f"| {row} | {c.lr:g} | {c.epochs} | {cell(table[row][(c.lr, c.epochs)])} |"
        if full_task:
            same = (c.lr, c.epochs, c.batch_size) == (demo.lr, demo.epochs, demo.batch_size)
            line += f" lr {demo.lr:g}, {demo.epochs} epochs ({'same' if same else 'DIFFERENT'}) |"
        print(line)
    results: dict = {
        "records": len(records),
        "seeds": seeds,
        "validation": {
            row: {
                f"lr={lr:g},epochs={e}": [{"acc": a, "log_loss": n} for a, n in table[row][(lr, e)]]
                for lr, e in table[row]
            }
            for row in rows
        },
        "chosen": {row: chosen[row].to_json() for row in rows},
    }
    return results, chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 480 records, one seed, 2 x 2 grid")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--records", type=int, default=None, help="use the first N fine-tuning records")
    ap.add_argument("--rows", nargs="+", choices=("full", "adapter"), default=["full", "adapter"])
    ap.add_argument(
        "--test", action="store_true", help="then train the chosen settings and score the eval set"
    )
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: robust on a shared machine)"
    )
    ap.add_argument("--bundles", type=Path, default=None, help="keep and reuse prepared bundles here")
    ap.add_argument(
        "--chosen-from",
        type=Path,
        default=None,
        help="skip the selection: take the chosen settings from a --json file",
    )
    ap.add_argument(
        "--cross-check",
        action="store_true",
        help="also full fine-tuning from scratch with transformers + torch, same setting (with --test, or "
        "alone with --chosen-from a file that has the --test results)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global BUNDLES
    BUNDLES = args.bundles
    lrs, epochs, seeds = LRS, EPOCHS, args.seeds
    records_n = args.records
    if args.quick:
        lrs, epochs, seeds, records_n = (1e-3, 3e-3), (1, 2), seeds[:1], records_n or 480
    start = time.perf_counter()
    root = demo_root()
    world = corpus.build_world(PretrainRecipe().world_seed)
    all_records = [json.loads(line) for line in (root / "data" / "train.jsonl").read_text().splitlines()]
    records = all_records[:records_n] if records_n else all_records
    print(
        f"{len(records)} fine-tuning records, seeds {seeds}, lr {list(lrs)} x epochs {list(epochs)}, "
        f"batch {BATCH}, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="offsite-sweep-") as tmp:
        work = Path(tmp)
        if args.chosen_from:
            results = json.loads(args.chosen_from.read_text())
            chosen = {row: Reference(**c) for row, c in results["chosen"].items()}
            rows = list(chosen)
            print(f"chosen settings from {args.chosen_from} (no selection run)")
        else:
            results, chosen = select(args, root, world, all_records, records, seeds, lrs, epochs, work, start)
            rows = list(chosen)
        per_seed = None
        if args.test and len(rows) == len(ROWS):
            per_seed = [test_rows(root, work, records, chosen, seed) for seed in seeds]
        elif args.cross_check and "test" in results:
            # Only the cross-check, beside the evaluation results of the --chosen-from run.
            known = dict(zip(results["seeds"], results["test"], strict=True))
            per_seed = [dict(known[seed]) for seed in seeds]
        if per_seed is not None:
            if args.cross_check:
                for seed, row in zip(seeds, per_seed, strict=True):
                    row[INDEPENDENT] = independent_full_ft(root, records, chosen[FULL_FT], seed)
            names = list(per_seed[0])
            print("\nevaluation set (1152 held-out questions), chosen settings trained on all records:\n")
            print("| row | acc (%) mean ± s.d. | per seed |")
            print("|---|---|---|")
            for name in names:
                vals = [s[name] for s in per_seed]
                print(f"| {name} | {fmt(vals)} | {', '.join(f'{100 * v:.1f}' for v in vals)} |")
            results["test"] = per_seed
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
