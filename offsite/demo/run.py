"""`offsite demo`: prepare (with distillation) -> private tuning -> plug-in -> the five settings.

Everything runs through the same library calls as the CLI, in a scratch directory with its
own owner record, keys and budget history, so the demo never touches a user's real state.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from offsite.cli.progress import step_bar
from offsite.cli.ui import console, err_console, print_json, table


@dataclass(frozen=True)
class DemoSettings:
    emulator_layers: int = 2
    distill_steps: int = 100
    distill_lr: float = 1e-3
    epsilon: float = 8.0
    dp_epochs: int = 4
    dp_batch: int = 256
    dp_lr: float = 3e-3
    ft_epochs: int = 2
    ft_lr: float = 1e-3
    ft_batch: int = 32
    eval_records: int | None = None  # None: all 1152


FULL = DemoSettings()
QUICK = replace(FULL, distill_steps=20, dp_epochs=2, eval_records=400)


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
            "plug-in's gain ≥ 70% of full fine-tuning's gain",
            ratio >= 0.7,
            f"{100 * ratio:.0f}%" if full_gain > 0 else "full fine-tuning gained nothing",
        ),
    ]


def run_demo(quick: bool = False, seed: int = 0, as_json: bool = False, keep: Path | None = None) -> int:
    from offsite import crypto
    from offsite.demo.model import PretrainRecipe, build_demo_owner, cached_demo
    from offsite.evaluation.settings import EvalInputs, evaluate_settings, score
    from offsite.full_finetune import finetune_full
    from offsite.models.loading import load_placed, load_tokenizer
    from offsite.plug import manifest_from_bundle_dir, plug
    from offsite.prepare import PrepareOptions, prepare
    from offsite.training.distill import DistillConfig
    from offsite.training.finetune import TrainConfig
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
    if settings.eval_records:
        eval_file = work / "eval.jsonl"
        lines = (data / "eval.jsonl").read_text().splitlines()[: settings.eval_records]
        eval_file.write_text("\n".join(lines) + "\n")
    try:
        with _stage(timings, "owner prepare + distillation"):
            distill = DistillConfig(
                steps=settings.distill_steps,
                lr=settings.distill_lr,
                batch_size=16,
                warmup_steps=max(1, settings.distill_steps // 10),
                seed=seed,
            )
            with step_bar("distilling the emulator", distill.steps, "kd") as bar:
                prepare(
                    model_dir,
                    work / "bundle",
                    PrepareOptions(
                        emulator_layers=settings.emulator_layers,
                        distill_data=data / "public.txt",
                        distill=distill,
                        seed=seed,
                    ),
                    on_distill_step=bar,
                )
        common = dict(seed=seed, eval_fraction=0.0, keys_dir=work / "client", budget_dir=work / "client")
        with _stage(timings, f"client train with DP (ε={settings.epsilon:g})"):
            dp_opts = TuneOptions(
                epochs=settings.dp_epochs,
                lr=settings.dp_lr,
                batch_size=settings.dp_batch,
                dataset_id="demo-private-task",
                epsilon=settings.epsilon,
                physical_batch_size=64,
                **common,
            )
            with step_bar(f"data owner: DP training (ε={settings.epsilon:g})") as bar:
                private = tune(
                    work / "bundle",
                    data / "train.jsonl",
                    work / "adapter",
                    dp_opts,
                    on_step=bar,
                    on_total=bar.set_total,
                )
        with _stage(timings, "client train without DP (comparison)"):
            plain_opts = TuneOptions(
                epochs=settings.ft_epochs, lr=settings.ft_lr, batch_size=settings.ft_batch, dp=False, **common
            )
            with step_bar("data owner: non-private training (comparison only)") as bar:
                tune(
                    work / "bundle",
                    data / "train.jsonl",
                    work / "adapter-nodp",
                    plain_opts,
                    on_step=bar,
                    on_total=bar.set_total,
                )
        with _stage(timings, "owner plug"):
            bundle_manifest = manifest_from_bundle_dir(work / "bundle")
            plug(model_dir, work / "adapter", work / "merged", bundle_manifest)
            plug(model_dir, work / "adapter-nodp", work / "merged-nodp", bundle_manifest)
        with _stage(timings, "full fine-tuning (reference)"):
            cfg = TrainConfig(
                epochs=settings.ft_epochs, lr=settings.ft_lr, batch_size=settings.ft_batch, seed=seed
            )
            with step_bar("full fine-tuning (reference row)") as bar:
                finetune_full(model_dir, data / "train.jsonl", work / "full-ft", cfg, on_step=bar)
        with _stage(timings, "evaluation"), console.status("evaluating the five settings…"):
            report = evaluate_settings(
                eval_file,
                "mc",
                EvalInputs(
                    model=model_dir,
                    bundle=work / "bundle",
                    adapter=work / "adapter",
                    merged=work / "merged",
                    full_ft=work / "full-ft",
                ),
            )
            from offsite.data import MC, read_records

            nodp = score(
                load_placed(work / "merged-nodp"),
                load_tokenizer(model_dir),
                read_records(eval_file, MC),
                MC,
            )
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - total_start

    acc = {r.setting: 100 * r.metrics["acc"] for r in report.rows if r.metrics}
    checks = _checks(
        acc["full zero-shot"], acc["emulator fine-tuned"], acc["plug-in"], acc["full fine-tuned"]
    )
    eps = private.receipt["epsilon"]["cumulative"]
    if as_json:
        print_json(
            {
                "quick": quick,
                "seed": seed,
                "cached_model": cached,
                "settings": report.to_json()["settings"],
                "plug_in_without_dp": nodp,
                "epsilon": eps,
                "delta": private.receipt["delta"],
                "checks": {name: ok for name, ok, _ in checks},
                "timings_s": timings,
                "total_s": total,
            }
        )
        return 0 if all(ok for _, ok, _ in checks) else 1
    from offsite.cli.evaluate import report_table

    console.print(report_table(report, f"offsite demo, seed {seed}"))
    console.print(
        f"plug-in trained WITHOUT DP (comparison): acc {100 * nodp['acc']:.2f}%, "
        f"acc_norm {100 * nodp['acc_norm']:.2f}%"
    )
    console.print(
        f"privacy: the adapter was trained with DP at ε = {eps['prv_upper']:.2f} (PRV upper bound; "
        f"RDP {eps['rdp']:.2f}), δ = {private.receipt['delta']:g}, σ = {private.plan.noise_multiplier:.3f}; "
        "the receipt is signed"
    )
    console.print(
        table(
            "checks (acc, held-out questions about unseen entities)",
            ["check", "result", "pass"],
            [(name, detail, "[green]yes[/green]" if ok else "[red]no[/red]") for name, ok, detail in checks],
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
    return 0 if all(ok for _, ok, _ in checks) else 1
