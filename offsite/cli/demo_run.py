"""`offsite demo`: the mission over the wire, then the five settings and an audit of the ledger.

The owner's state with its own PKI, a gRPC server on loopback, one data owner that enrols, fetches the
signed bundle, trains with DP and submits, the owner plugging the accepted submission in
(``offsite.cli.demo_mission``); then the five-setting table, and `offsite audit ledger` on the demo's own
server state. Everything runs through the same library calls as the CLI, in a scratch directory (or
``--keep DIR``) with its own owner state, keys and budget history, so the demo never touches a user's
real state.

The private run uses the DP defaults a data owner gets from `offsite client train` (no hand-tuned
settings). The non-private reference rows use the settings `benchmarks/sweep_reference.py` chose on
a validation split; their scores are cached by content (``offsite.demo.reference``), so a warm run
trains only what the demo is about: the owner's preparation and the private adapter.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offsite import state
from offsite.cli.progress import step_bar
from offsite.cli.ui import console, err_console, print_json, table

DP_FT = "emulator fine-tuned"
DP_PLUG = "plug-in"


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


@dataclass
class DemoRun:
    """Everything one demo run produced, for the two ways of showing it."""

    quick: bool
    seed: int
    keep: Path | None
    cached_model: Path | None  # the cache entry the demo model came from (None: pretrained now)
    layout: Any  # offsite.cli.demo_mission.Layout
    mission: Any  # offsite.cli.demo_mission.Mission
    report: Any  # offsite.evaluation.settings.Report, reference rows included
    refs_cached: bool
    ledger: Any  # offsite.privacy.ledger_audit.LedgerReport
    audit_ok: bool
    checks: list[tuple[str, bool, str]]
    timings: dict[str, float]
    total: float

    @property
    def private(self):
        from offsite.demo.settings import CLIENT_ID

        return self.mission.owners[CLIENT_ID]

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.checks) and self.audit_ok


def run_demo(
    quick: bool = False,
    seed: int = 0,
    as_json: bool = False,
    keep: Path | None = None,
    recompute_reference: bool = False,
) -> int:
    """Run the demo and show it (a table and more on the terminal, or one JSON object); 0 if every
    check and the ledger audit passed, else 1."""
    from offsite.cli.demo_mission import Timings, check_new_work

    timings: dict[str, float] = {}
    stage = Timings(timings)
    total_start = time.perf_counter()
    if keep:
        check_new_work(Path(keep))  # before the first run's pretraining, not minutes after it
    root, cached = _demo_owner(stage)
    run = _run(root, quick, seed, keep, recompute_reference, stage)
    run.cached_model = root if cached else None
    run.timings, run.total = timings, time.perf_counter() - total_start
    if as_json:
        print_json(_as_json(run))
    else:
        _print(run)
    return 0 if run.ok else 1


def _demo_owner(stage) -> tuple[Path, bool]:
    """The demo model owner's directory (model and data), from the cache or pretrained now."""
    from offsite.demo.model import PretrainRecipe, build_demo_owner, cached_demo

    recipe = PretrainRecipe()
    root = cached_demo(recipe, state.demo_cache_dir())
    if root is not None:
        return root, True
    with (
        stage("pretrain the demo model (first run only)"),
        step_bar("pretraining the demo model owner (first run only)", recipe.steps) as bar,
    ):
        return build_demo_owner(recipe, state.demo_cache_dir(), on_step=bar), False


def _run(root: Path, quick: bool, seed: int, keep: Path | None, recompute_reference: bool, stage) -> DemoRun:
    """The mission over the wire, the evaluation, the reference rows and the ledger audit, in a scratch
    directory (removed afterwards) or ``keep``."""
    from offsite.cli.demo_mission import HOST, DataOwner, Layout, Policy, audit, audit_passed, run_mission
    from offsite.demo.reference import reference_rows
    from offsite.demo.settings import CLIENT_ID, DATASET_ID, FULL, JOB_ID, QUICK, prepare_options
    from offsite.evaluation.settings import EvalInputs, evaluate_settings

    settings = QUICK if quick else FULL
    model_dir, data = root / "model", root / "data"
    layout = Layout(Path(keep) if keep else Path(tempfile.mkdtemp(prefix="offsite-demo-")))
    eval_file = data / "eval.jsonl"
    policy = Policy(
        job_id=JOB_ID,
        epsilon=settings.epsilon,
        delta=settings.delta,
        seed=seed,
        physical_batch=settings.physical_batch,
    )
    try:
        mission = run_mission(
            layout,
            model_dir,
            prepare_options(settings, data, seed),
            [DataOwner(CLIENT_ID, data / "train.jsonl", DATASET_ID)],
            policy,
            stage,
            train_stage=f"client train with DP (ε={settings.epsilon:g}, DP defaults)",
            on_server=lambda port: err_console.print(
                f"owner's server: mutual TLS on {HOST}:{port}, state {layout.owner}"
            ),
        )
        with stage("evaluation (zero-shot and private rows)"), console.status("evaluating…"):
            inputs = EvalInputs(
                model=model_dir, bundle=layout.bundle, adapter=layout.adapter(CLIENT_ID), merged=layout.merged
            )
            report = evaluate_settings(eval_file, "mc", inputs)
        # --keep wants the reference models on disk, so it trains them (and refreshes the cache entry).
        with (
            stage("reference rows without DP (cached after the first run)"),
            step_bar("reference rows without DP (full fine-tuning, adapter)") as bar,
        ):
            refs, refs_cached = reference_rows(
                model_dir,
                layout.bundle,
                data / "train.jsonl",
                eval_file,
                seed,
                layout.root,
                state.demo_cache_dir() / "reference",
                refresh=bool(keep) or recompute_reference,
                on_step=bar,
            )
        with (
            stage("ledger audit (owner and receipt keys pinned, checkpoints)"),
            console.status("auditing the ledger…"),
        ):
            ledger = audit(layout, [CLIENT_ID])
    finally:
        if not keep:
            shutil.rmtree(layout.root, ignore_errors=True)
    report = _with_reference_rows(report, refs)
    return DemoRun(
        quick=quick,
        seed=seed,
        keep=keep,
        cached_model=None,
        layout=layout,
        mission=mission,
        report=report,
        refs_cached=refs_cached,
        ledger=ledger,
        audit_ok=audit_passed(ledger, 1),
        checks=_report_checks(report),
        timings={},
        total=0.0,
    )


def _with_reference_rows(report, refs):
    """Full fine-tuning fills its row of the five settings; the two rows without DP follow them."""
    from offsite.demo.settings import EMULATOR_NODP, FULL_FT, PLUGIN_NODP

    report.rows = [refs[FULL_FT] if r.setting == FULL_FT else r for r in report.rows]
    report.rows += [refs[EMULATOR_NODP], refs[PLUGIN_NODP]]
    return report


def _report_checks(report) -> list[tuple[str, bool, str]]:
    from offsite.demo.settings import FULL_FT

    acc = {r.setting: 100 * r.metrics["acc"] for r in report.rows if r.metrics}
    return _checks(acc["full zero-shot"], acc[DP_FT], acc[DP_PLUG], acc[FULL_FT])


def _wire(run: DemoRun) -> dict:
    from offsite.cli.demo_mission import HOST
    from offsite.demo.settings import CLIENT_ID

    private = run.private
    return {
        "server": f"{HOST}:{run.mission.port}",
        "job_id": run.mission.job_id,
        "client_id": CLIENT_ID,
        "submission_id": private.submission_id,
        "submission_state": private.state,
        "plugged_submission": run.mission.plugged,
        "limits": private.limits,
    }


def _as_json(run: DemoRun) -> dict:
    doc = run.report.to_json()
    receipt = run.private.receipt
    return {
        "quick": run.quick,
        "seed": run.seed,
        "cached_model": run.cached_model is not None,
        "reference_rows_cached": run.refs_cached,
        "settings": doc["settings"],
        "hyperparameters": doc["hyperparameters"],
        "dp_defaults": run.private.defaults,
        "epsilon": receipt["epsilon"]["cumulative"],
        "delta": receipt["delta"],
        "checks": {name: passed for name, passed, _ in run.checks},
        "wire": _wire(run),
        "ledger_audit": run.ledger.to_dict() | {"passed": run.audit_ok},
        "kept": str(run.layout.root) if run.keep else None,
        "timings_s": run.timings,
        "total_s": run.total,
    }


def _print(run: DemoRun) -> None:
    from offsite.cli.audit_ledger import print_report
    from offsite.cli.evaluate import report_table

    console.print(report_table(run.report, f"offsite demo, seed {run.seed}"))
    _print_story(run)
    console.print(
        table(
            "checks (acc, held-out questions about unseen entities)",
            ["check", "result", "pass"],
            [
                (name, detail, "[green]yes[/green]" if p else "[red]no[/red]")
                for name, p, detail in run.checks
            ],
        )
    )
    print_report(run.ledger)
    if not run.audit_ok:
        console.print(
            "[bold red]the demo's ledger audit did not pass[/bold red] (it needs the owner key and the data "
            "owner's receipt key pinned and the data owner's checkpoints found in the ledger)"
        )
    rows = [(k, f"{v:.1f}") for k, v in run.timings.items()] + [("total", f"{run.total:.1f}")]
    console.print(table("timings", ["stage", "seconds"], rows))
    if run.cached_model is not None:
        err_console.print(f"(demo model loaded from the cache: {run.cached_model})")
    if run.keep:
        _print_kept(run.layout)


def _print_story(run: DemoRun) -> None:
    """What the private row is, what went over the wire and where the reference rows come from."""
    from offsite.cli.demo_mission import HOST
    from offsite.demo.settings import CLIENT_ID

    private, eps = run.private, run.private.receipt["epsilon"]["cumulative"]
    console.print(
        f"privacy: the adapter was trained with DP at ε = {eps['prv_upper']:.2f} (PRV upper bound; "
        f"RDP {eps['rdp']:.2f}), δ = {private.receipt['delta']:g}, σ = {private.noise_multiplier:.3f}, "
        f"with the DP defaults for a dataset of at most {private.defaults['bucket']} records; the receipt is "
        "signed"
    )
    console.print(
        f"over the wire: {CLIENT_ID} enrolled with the owner's CA, fetched job {run.mission.job_id}'s signed "
        f"bundle from {HOST}:{run.mission.port}, trained at the smallest of its limits "
        f"({private.limits['chosen']}: ε = {private.limits['epsilon']:g}, δ = {private.limits['delta']:g}) and "
        f"submitted; the server verified and accepted submission {private.submission_id}, which the owner "
        "plugged in"
    )
    console.print(
        "reference rows: the non-private settings were chosen by benchmarks/sweep_reference.py on a "
        "validation split of the fine-tuning records"
        + (
            " (scores reused from the cache: same model, bundle, data, settings and code)"
            if run.refs_cached
            else ""
        )
    )


def _print_kept(layout) -> None:
    from offsite.demo.settings import CLIENT_ID
    from offsite.formats.enrolment import OWNER_KEY

    console.print(f"kept in {layout.root}: the owner's state is {layout.owner}; audit it again with")
    console.print(
        f"  offsite audit ledger {layout.owner} --owner-pubkey {layout.auditor / OWNER_KEY} "
        f"--checkpoints {layout.auditor / 'checkpoints'} "
        f"--client-key {CLIENT_ID}={layout.auditor / (CLIENT_ID + '.pub.pem')} --html report.html",
        soft_wrap=True,  # a command to copy: never broken across lines
    )
