"""`offsite demo`: prepare (with distillation) -> private tuning -> plug-in -> the five settings.

Everything runs through the same library calls as the CLI, in a scratch directory with its
own owner record, keys and budget history, so the demo never touches a user's real state.

The private run uses the DP defaults a data owner gets from `offsite client train` (no hand-tuned
settings). The non-private reference rows use the settings `benchmarks/sweep_reference.py` chose on
a validation split; their scores are cached by content (``offsite.demo.reference``), so a warm run
trains only what the demo is about: the owner's preparation and the private adapter.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from offsite.cli.progress import step_bar
from offsite.cli.ui import console, err_console, print_json, table

DP_FT = "emulator fine-tuned"
DP_PLUG = "plug-in"


@contextmanager
def _stage(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def _checks(zs: float, emu_ft: float, plug: float, full_ft: float) -> list[tuple[str, bool, str]]:
    gain, full_gain = plug - zs, full_ft - zs
    ratio = gain / full_gain if full_gain > 0 else float("inf")
    return [
        ("plug-in beats full zero-shot by ≥ 5 points", gain >= 5, f"{gain:+.2f} points"),
        (
            "plug-in beats emulator fine-tuned by ≥ 2 points (the owner's model stays protected)",
            plug - emu_ft >= 2,
            f"{plug - emu_ft:+.2f} points",
        ),
        (
            "plug-in's gain ≥ 70% of the tuned full fine-tuning's gain",
            ratio >= 0.7,
            f"{100 * ratio:.0f}%" if full_gain > 0 else "full fine-tuning gained nothing",
        ),
    ]


def run_demo(
    quick: bool = False,
    seed: int = 0,
    as_json: bool = False,
    keep: Path | None = None,
    recompute_reference: bool = False,
) -> int:
    from offsite import crypto
    from offsite.demo.model import PretrainRecipe, build_demo_owner, cache_root, cached_demo
    from offsite.demo.reference import reference_rows
    from offsite.demo.settings import EMULATOR_NODP, FULL, FULL_FT, PLUGIN_NODP, QUICK, prepare_options
    from offsite.evaluation.settings import EvalInputs, evaluate_settings
    from offsite.plug import manifest_from_bundle_dir, plug
    from offsite.prepare import prepare
    from offsite.training.dp_defaults import DEFAULTED
    from offsite.tune import TuneOptions, tune

    settings = QUICK if quick else FULL
    recipe = PretrainRecipe()
    timings: dict[str, float] = {}
    total_start = time.perf_counter()
    root = cached_demo(recipe)
    cached = root is not None
    if not cached:
        with (
            _stage(timings, "pretrain the demo model (first run only)"),
            step_bar("pretraining the demo model owner (first run only)", recipe.steps) as bar,
        ):
            root = build_demo_owner(recipe, on_step=bar)
    model_dir, data = root / "model", root / "data"
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="offsite-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    if not crypto.KeyPaths.in_dir(work / "client").existing():  # a kept work directory keeps its keys
        crypto.init_client_keys(work / "client")
    eval_file = data / "eval.jsonl"
    defaults: dict = {}
    try:
        with _stage(timings, "owner prepare + distillation"):
            opts = prepare_options(settings, data, seed)
            with step_bar("distilling the emulator", opts.distill.steps, "kd") as bar:
                prepare(model_dir, work / "bundle", opts, on_distill_step=bar)
        with _stage(timings, f"client train with DP (ε={settings.epsilon:g}, DP defaults)"):
            dp_opts = TuneOptions(
                seed=seed,
                eval_fraction=0.0,
                dataset_id="demo-private-task",
                epsilon=settings.epsilon,
                physical_batch_size=settings.physical_batch,
                keys_dir=work / "client",
                budget_dir=work / "client",
                dp_defaults_for=DEFAULTED,  # what `offsite client train` does without --batch-size/--epochs/--lr
            )
            with step_bar(f"data owner: DP training (ε={settings.epsilon:g})") as bar:
                private = tune(
                    work / "bundle",
                    data / "train.jsonl",
                    work / "adapter",
                    dp_opts,
                    on_step=bar,
                    on_total=bar.set_total,
                    on_defaults=lambda d: defaults.update(d.to_json()),
                )
        with _stage(timings, "owner plug"):
            plug(model_dir, work / "adapter", work / "merged", manifest_from_bundle_dir(work / "bundle"))
        with _stage(timings, "evaluation (zero-shot and private rows)"), console.status("evaluating…"):
            report = evaluate_settings(
                eval_file,
                "mc",
                EvalInputs(
                    model=model_dir, bundle=work / "bundle", adapter=work / "adapter", merged=work / "merged"
                ),
            )
        # --keep wants the reference models on disk, so it trains them (and refreshes the cache entry).
        with (
            _stage(timings, "reference rows without DP (cached after the first run)"),
            step_bar("reference rows without DP (full fine-tuning, adapter)") as bar,
        ):
            refs, refs_cached = reference_rows(
                model_dir,
                work / "bundle",
                data / "train.jsonl",
                eval_file,
                seed,
                work,
                cache_root() / "reference",
                refresh=bool(keep) or recompute_reference,
                on_step=bar,
            )
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - total_start

    # Full fine-tuning fills its row of the five settings; the two rows without DP follow them.
    report.rows = [refs[FULL_FT] if r.setting == FULL_FT else r for r in report.rows]
    report.rows += [refs[EMULATOR_NODP], refs[PLUGIN_NODP]]
    acc = {r.setting: 100 * r.metrics["acc"] for r in report.rows if r.metrics}
    checks = _checks(acc["full zero-shot"], acc[DP_FT], acc[DP_PLUG], acc[FULL_FT])
    eps = private.receipt["epsilon"]["cumulative"]
    ok = all(passed for _, passed, _ in checks)
    if as_json:
        doc = report.to_json()
        print_json(
            {
                "quick": quick,
                "seed": seed,
                "cached_model": cached,
                "reference_rows_cached": refs_cached,
                "settings": doc["settings"],
                "hyperparameters": doc["hyperparameters"],
                "dp_defaults": defaults,
                "epsilon": eps,
                "delta": private.receipt["delta"],
                "checks": {name: passed for name, passed, _ in checks},
                "timings_s": timings,
                "total_s": total,
            }
        )
        return 0 if ok else 1
    from offsite.cli.evaluate import report_table

    console.print(report_table(report, f"offsite demo, seed {seed}"))
    console.print(
        f"privacy: the adapter was trained with DP at ε = {eps['prv_upper']:.2f} (PRV upper bound; "
        f"RDP {eps['rdp']:.2f}), δ = {private.receipt['delta']:g}, σ = {private.plan.noise_multiplier:.3f}, "
        f"with the DP defaults for a dataset of at most {defaults['bucket']} records; the receipt is signed"
    )
    console.print(
        "reference rows: the non-private settings were chosen by benchmarks/sweep_reference.py on a "
        "validation split of the fine-tuning records"
        + (
            " (scores reused from the cache: same model, bundle, data, settings and code)"
            if refs_cached
            else ""
        )
    )
    console.print(
        table(
            "checks (acc, held-out questions about unseen entities)",
            ["check", "result", "pass"],
            [(name, detail, "[green]yes[/green]" if p else "[red]no[/red]") for name, p, detail in checks],
        )
    )
    console.print(
        table(
            "timings",
            ["stage", "seconds"],
            [(k, f"{v:.1f}") for k, v in timings.items()] + [("total", f"{total:.1f}")],
        )
    )
    if cached:
        err_console.print(f"(demo model loaded from the cache: {root})")
    return 0 if ok else 1
