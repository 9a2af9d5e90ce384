"""How much of the non-private gain DP keeps, on the demo task and on a sixth of it.

    python benchmarks/dp_small_data.py [--quick] [--sizes 2880 480] [--seeds 0 1 2] [--epsilon 8]
                                       [--reference SIZE=FILE ...] [--json OUT]
    python benchmarks/dp_small_data.py --grid B:E:LR [B:E:LR ...] [--lora-rank R] [--sizes 480] ...

**Report mode** (default). For each size N (the first N fine-tuning records of the demo task) and
seed, the private plug-in is trained exactly as `offsite client train --epsilon E` trains it with no
--batch-size/--epochs/--lr: the batch, epochs and learning rate come from the DP defaults
(`offsite.training.dp_defaults`, from the dataset's size bucket and the budget only). It is plugged
into the full model and scored on the 1,152 held-out evaluation questions. The script prints

    retained gain = (private plug-in acc - full zero-shot acc) / (tuned non-private plug-in acc - full zero-shot acc)

per seed, and the mean and spread. The denominator is the plug-in trained without DP with the
setting `benchmarks/sweep_reference.py --records N --test --json FILE` chose on a validation split
(pass that file as --reference N=FILE; without it the script runs that selection itself). DP draws
fresh sampling and noise from the operating system every run, so each seed's private run differs
even with the same seed; the spread is part of the result.

`--setting B:E:LR` replaces the defaults by a fixed setting (to compare with what they replaced).
`--quick` is a smoke test (480 records, one seed, and the sweep's own --quick grid for the denominator,
so its retained gain means nothing).

**Grid mode** (`--grid`), how the defaults' constants were chosen: for each candidate
(expected batch B, epochs E, learning rate LR) the private adapter is trained on the training part
of `corpus.validation_split` (whole fine-tuning families held out) and the plug-in is scored on
the validation questions (log-loss, as `sweep_reference.py` selects), never on the evaluation set.
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

sys.path.insert(0, str(Path(__file__).parent))

import sweep_reference as sweep  # noqa: E402

from offsite import crypto  # noqa: E402
from offsite.data import MC, read_records  # noqa: E402
from offsite.demo import corpus  # noqa: E402
from offsite.demo.model import PretrainRecipe  # noqa: E402
from offsite.demo.settings import FULL, PLUGIN_NODP, prepare_options  # noqa: E402
from offsite.evaluation.settings import score  # noqa: E402
from offsite.models.loading import load_model, load_tokenizer  # noqa: E402
from offsite.plug import manifest_from_bundle_dir, plug  # noqa: E402
from offsite.prepare import prepare  # noqa: E402
from offsite.training.dp_defaults import DEFAULTED, describe  # noqa: E402
from offsite.tune import TuneOptions, tune  # noqa: E402


def make_bundle(root: Path, work: Path, seed: int, lora_rank: int | None) -> Path:
    if not lora_rank:
        return sweep.make_bundle(root, work, seed)
    work = sweep.BUNDLES or work
    out = work / f"bundle-{seed}-lora{lora_rank}"
    if not out.exists():
        opts = prepare_options(FULL, root / "data", seed)
        if lora_rank:
            opts.lora_rank = lora_rank
        prepare(root / "model", out, opts)
    return out


def private_plugin(
    root: Path,
    work: Path,
    bundle: Path,
    data: Path,
    questions,
    seed: int,
    epsilon: float,
    setting: tuple[int, int, float] | None,
    tag: str,
    validation=None,
) -> tuple[float, dict]:
    """Train with DP (``setting`` = (batch, epochs, lr), or None for the defaults), plug, score: the
    accuracy on ``questions``, or ``validation(model, tokenizer)``."""
    keys = work / "keys"
    if not keys.exists():
        crypto.init_client_keys(keys)
    batch, epochs, lr = setting or (16, 3, 1e-3)  # placeholders the defaults replace
    opts = TuneOptions(
        epochs=epochs,
        lr=lr,
        batch_size=batch,
        seed=seed,
        eval_fraction=0.0,
        dataset_id=f"bench-{tag}",
        epsilon=epsilon,
        physical_batch_size=64,
        keys_dir=keys,
        budget_dir=work / f"budget-{tag}",
        dp_defaults_for=DEFAULTED if setting is None else (),
    )
    chosen: dict = {}
    result = tune(
        bundle, data, work / f"adapter-{tag}", opts, on_defaults=lambda d: chosen.update(d.to_json())
    )
    plug(root / "model", work / f"adapter-{tag}", work / f"merged-{tag}", manifest_from_bundle_dir(bundle))
    merged = load_model(work / f"merged-{tag}", dtype=torch.float32)
    tokenizer = load_tokenizer(root / "model")
    acc = (
        score(merged, tokenizer, questions, MC)["acc"]
        if validation is None
        else validation(merged, tokenizer)
    )
    info = {
        "sigma": result.plan.noise_multiplier,
        "q": result.plan.sample_rate,
        "steps": result.plan.steps,
        "epsilon": result.receipt["epsilon"]["cumulative"]["prv_upper"],
        "defaults": chosen or None,  # what the rule chose (its σ and steps are for q = batch/bucket)
    }
    return acc, info


def fmt(values: list[float], scale: float = 100) -> str:
    m = scale * statistics.mean(values)
    return f"{m:.1f}" if len(values) < 2 else f"{m:.1f} ± {scale * statistics.stdev(values):.1f}"


def run_grid(args, root: Path, world, records: list[dict], work: Path) -> dict:
    settings = []
    for g in args.grid:
        b, e, lr = g.split(":")
        settings.append((int(b), int(e), float(lr)))
    out: dict = {}
    for n in args.sizes:
        for seed in args.seeds:
            rest, questions = sweep.split(world, records, n, seed)
            data = sweep.write_jsonl(work / f"grid-train-{n}-{seed}.jsonl", rest)
            valid = read_records(sweep.write_jsonl(work / f"grid-valid-{n}-{seed}.jsonl", questions), MC)
            bundle = make_bundle(root, work, seed, args.lora_rank)
            for s in settings:
                tag = f"grid-{n}-{seed}-{s[0]}-{s[1]}-{s[2]:g}-{args.lora_rank or 'b'}"
                t = time.perf_counter()
                (acc, nll), info = private_plugin(
                    root,
                    work,
                    bundle,
                    data,
                    valid,
                    seed,
                    args.epsilon,
                    s,
                    tag,
                    validation=lambda m, t, valid=valid: sweep.validation_scores(m, t, valid),
                )
                out.setdefault(f"{n}|{s[0]}|{s[1]}|{s[2]:g}", []).append((acc, nll))
                print(
                    f"N={n} seed={seed} B={s[0]} E={s[1]} lr={s[2]:g}: validation plug-in log-loss {nll:.3f}, "
                    f"acc {100 * acc:.1f} "
                    f"(σ={info['sigma']:.3f}, q={info['q']:.3f}, {info['steps']} steps, "
                    f"{time.perf_counter() - t:.0f} s)",
                    flush=True,
                )
    print("\n| N | B | E | lr | validation plug-in log-loss (acc %) |\n|---|---|---|---|---|")
    for key, vals in out.items():
        n, b, e, lr = key.split("|")
        print(f"| {n} | {b} | {e} | {lr} | {sweep.cell(vals)} |")
    return {"grid": out}


def reference_plugin(args, root: Path, records: list[dict], n: int, work: Path) -> list[float]:
    """Per-seed evaluation accuracy of the tuned non-private plug-in, and the full zero-shot."""
    given = dict(r.split("=", 1) for r in args.reference)
    if str(n) in given:
        res = json.loads(Path(given[str(n)]).read_text())
    else:
        print(
            f"N={n}: selecting the non-private plug-in's setting (benchmarks/sweep_reference.py)", flush=True
        )
        res_file = work / f"ref-{n}.json"
        more = ["--bundles", str(sweep.BUNDLES)] if sweep.BUNDLES else []
        more += ["--quick"] if args.quick else []
        sweep.main(
            ["--records", str(n), "--seeds", *map(str, args.seeds), "--test", "--json", str(res_file), *more]
        )
        res = json.loads(res_file.read_text())
    by_seed = dict(zip(res["seeds"], res["test"], strict=True))
    return [by_seed[s] for s in args.seeds], res["chosen"][PLUGIN_NODP]


def run_report(args, root: Path, records: list[dict], work: Path) -> dict:
    eval_q = read_records(root / "data" / "eval.jsonl", MC)
    fixed = None
    if args.setting:  # a fixed setting instead of the defaults (to compare with what they replace)
        b, e, lr = args.setting.split(":")
        fixed = (int(b), int(e), float(lr))
    results: dict = {}
    for n in args.sizes:
        subset = records[:n]
        data = sweep.write_jsonl(work / f"train-{n}.jsonl", subset)
        refs, ref_setting = reference_plugin(args, root, records, n, work)
        rows = []
        for seed, ref in zip(args.seeds, refs, strict=True):
            bundle = make_bundle(root, work, seed, args.lora_rank)
            t = time.perf_counter()
            acc, info = private_plugin(
                root, work, bundle, data, eval_q, seed, args.epsilon, fixed, f"rep-{n}-{seed}"
            )
            if fixed:
                info["defaults"] = {"batch_size": fixed[0], "epochs": fixed[1], "lr": fixed[2]}
            zs, nodp = ref["full zero-shot"], ref[PLUGIN_NODP]
            retained = (acc - zs) / (nodp - zs)
            rows.append(
                {"seed": seed, "dp": acc, "zero_shot": zs, "no_dp": nodp, "retained": retained, **info}
            )
            print(
                f"N={n} seed={seed}: DP plug-in {100 * acc:.1f} (defaults {describe(info['defaults'])}; "
                f"σ={info['sigma']:.3f}, "
                f"q={info['q']:.3f}, {info['steps']} steps, ε={info['epsilon']:.2f}), non-private plug-in "
                f"{100 * nodp:.1f}, zero-shot {100 * zs:.1f}: retained {100 * retained:.0f}% "
                f"({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
        results[n] = {"rows": rows, "non_private_setting": ref_setting}
    print(
        f"\nε = {args.epsilon:g}; retained gain = (DP plug-in − full zero-shot) / (non-private plug-in − full zero-shot)\n"
    )
    print(
        "| records | DP settings | full zero-shot | non-private plug-in (tuned) | DP plug-in | retained gain | per seed |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, r in results.items():
        rows = r["rows"]
        per_seed = ", ".join(f"{100 * x['retained']:.0f}%" for x in rows)
        print(
            f"| {n} | {describe(rows[0]['defaults'])} | {fmt([x['zero_shot'] for x in rows])} | "
            f"{fmt([x['no_dp'] for x in rows])} (lr {r['non_private_setting']['lr']:g}, "
            f"{r['non_private_setting']['epochs']} ep) | {fmt([x['dp'] for x in rows])} | "
            f"{fmt([x['retained'] for x in rows])}% | {per_seed} |"
        )
    return {"report": results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 480 records, one seed")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2880, 480])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--grid", nargs="+", default=None, metavar="B:E:LR")
    ap.add_argument(
        "--setting",
        default=None,
        metavar="B:E:LR",
        help="report mode: this setting instead of the DP defaults",
    )
    ap.add_argument("--lora-rank", type=int, default=None, help="prepare LoRA bundles of this rank")
    ap.add_argument(
        "--reference", nargs="+", default=[], metavar="N=FILE", help="sweep_reference.py --json results"
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--bundles", type=Path, default=None, help="keep and reuse prepared bundles here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sweep.BUNDLES = args.bundles
    if args.quick:
        args.sizes, args.seeds = [480], args.seeds[:1]
    start = time.perf_counter()
    root = sweep.demo_root()
    world = corpus.build_world(PretrainRecipe().world_seed)
    records = [json.loads(line) for line in (root / "data" / "train.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory(prefix="offsite-dp-small-") as tmp:
        work = Path(tmp)
        if args.grid:
            results = run_grid(args, root, world, records, work)
        else:
            results = run_report(args, root, records, work)
    print(f"\ntotal {time.perf_counter() - start:.0f} s, torch threads {torch.get_num_threads()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
