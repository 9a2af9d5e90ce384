"""`offsite demo`: the mission over the wire, then the five settings and an audit of the ledger.

The owner's state with its own PKI, a gRPC server on loopback, one data owner that enrols, fetches the
signed bundle, trains with DP and submits, the owner plugging the accepted submission in
(``offsite.demo.mission``); then the five-setting table, and `offsite audit ledger` on the demo's own
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
from pathlib import Path

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


def run_demo(
    quick: bool = False,
    seed: int = 0,
    as_json: bool = False,
    keep: Path | None = None,
    recompute_reference: bool = False,
) -> int:
    from offsite.demo.mission import (
        HOST,
        DataOwner,
        Layout,
        Policy,
        Timings,
        audit,
        audit_passed,
        check_new_work,
        run_mission,
    )
    from offsite.demo.model import PretrainRecipe, build_demo_owner, cache_root, cached_demo
    from offsite.demo.reference import reference_rows
    from offsite.demo.settings import (
        CLIENT_ID,
        DATASET_ID,
        EMULATOR_NODP,
        FULL,
        FULL_FT,
        JOB_ID,
        PLUGIN_NODP,
        QUICK,
        prepare_options,
    )
    from offsite.evaluation.settings import EvalInputs, evaluate_settings
    from offsite.formats.enrolment import OWNER_KEY

    settings = QUICK if quick else FULL
    recipe = PretrainRecipe()
    timings: dict[str, float] = {}
    stage = Timings(timings)
    total_start = time.perf_counter()
    if keep:
        check_new_work(Path(keep))  # before the first run's pretraining, not minutes after it
    root = cached_demo(recipe)
    cached = root is not None
    if not cached:
        with (
            stage("pretrain the demo model (first run only)"),
            step_bar("pretraining the demo model owner (first run only)", recipe.steps) as bar,
        ):
            root = build_demo_owner(recipe, on_step=bar)
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
        private = mission.owners[CLIENT_ID]
        with stage("evaluation (zero-shot and private rows)"), console.status("evaluating…"):
            report = evaluate_settings(
                eval_file,
                "mc",
                EvalInputs(
                    model=model_dir,
                    bundle=layout.bundle,
                    adapter=layout.adapter(CLIENT_ID),
                    merged=layout.merged,
                ),
            )
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
                cache_root() / "reference",
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
    total = time.perf_counter() - total_start
    audit_ok = audit_passed(ledger, 1)

    # Full fine-tuning fills its row of the five settings; the two rows without DP follow them.
    report.rows = [refs[FULL_FT] if r.setting == FULL_FT else r for r in report.rows]
    report.rows += [refs[EMULATOR_NODP], refs[PLUGIN_NODP]]
    acc = {r.setting: 100 * r.metrics["acc"] for r in report.rows if r.metrics}
    checks = _checks(acc["full zero-shot"], acc[DP_FT], acc[DP_PLUG], acc[FULL_FT])
    eps = private.receipt["epsilon"]["cumulative"]
    defaults = private.defaults
    ok = all(passed for _, passed, _ in checks) and audit_ok
    wire = {
        "server": f"{HOST}:{mission.port}",
        "job_id": mission.job_id,
        "client_id": CLIENT_ID,
        "submission_id": private.submission_id,
        "submission_state": private.state,
        "plugged_submission": mission.plugged,
        "limits": private.limits,
    }
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
                "wire": wire,
                "ledger_audit": ledger.to_dict() | {"passed": audit_ok},
                "kept": str(layout.root) if keep else None,
                "timings_s": timings,
                "total_s": total,
            }
        )
        return 0 if ok else 1
    from offsite.cli.evaluate import report_table

    console.print(report_table(report, f"offsite demo, seed {seed}"))
    console.print(
        f"privacy: the adapter was trained with DP at ε = {eps['prv_upper']:.2f} (PRV upper bound; "
        f"RDP {eps['rdp']:.2f}), δ = {private.receipt['delta']:g}, σ = {private.noise_multiplier:.3f}, "
        f"with the DP defaults for a dataset of at most {defaults['bucket']} records; the receipt is signed"
    )
    console.print(
        f"over the wire: {CLIENT_ID} enrolled with the owner's CA, fetched job {mission.job_id}'s signed "
        f"bundle from {HOST}:{mission.port}, trained at the smallest of its limits ({private.limits['chosen']}: "
        f"ε = {private.limits['epsilon']:g}, δ = {private.limits['delta']:g}) and submitted; the server "
        f"verified and accepted submission {private.submission_id}, which the owner plugged in"
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
    from offsite.cli.audit_ledger import print_report

    print_report(ledger)
    if not audit_ok:
        console.print(
            "[bold red]the demo's ledger audit did not pass[/bold red] (it needs the owner key pinned and "
            "the data owner's checkpoints found in the ledger)"
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
    if keep:
        console.print(f"kept in {layout.root}: the owner's state is {layout.owner}; audit it again with")
        console.print(
            f"  offsite audit ledger {layout.owner} --owner-pubkey {layout.auditor / OWNER_KEY} "
            f"--checkpoints {layout.auditor / 'checkpoints'} "
            f"--client-key {CLIENT_ID}={layout.auditor / (CLIENT_ID + '.pub.pem')} --html report.html",
            soft_wrap=True,  # a command to copy: never broken across lines
        )
    return 0 if ok else 1
