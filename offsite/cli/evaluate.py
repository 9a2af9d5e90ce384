"""`offsite eval`: the five-setting comparison table."""

from __future__ import annotations

import argparse
from pathlib import Path

from offsite.cli.placement import add_placement_arguments, placement_from
from offsite.cli.ui import console, print_json, table
from offsite.data import KINDS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="compare the five settings (zero-shot, emulator, plug-in, full fine-tuning)",
        description="Evaluate on a task file and fill the rows of the five offsite-tuning settings that the "
        "given inputs allow: full zero-shot (--model), emulator zero-shot (--bundle), emulator fine-tuned "
        "(--bundle --adapter), plug-in (--merged), full fine-tuned (--full-ft). Never trains. Metrics: "
        "lm perplexity; mc accuracy by log-likelihood (acc, acc_norm); cls accuracy; mlm masked-token "
        "perplexity (fixed masking seed). Each fine-tuned row also shows the settings it was trained with "
        "(from the adapter's metadata, the merged model's offsite_plug.json and the fully fine-tuned "
        "model's offsite_finetune.json; --json: 'hyperparameters').",
    )
    p.add_argument("--task", type=Path, required=True, help="evaluation records (JSONL, CSV or text)")
    p.add_argument("--type", dest="kind", choices=KINDS, required=True, help="task type")
    p.add_argument("--model", type=Path, help="the full model (full zero-shot)")
    p.add_argument(
        "--bundle", type=Path, help="a bundle (emulator zero-shot; with --adapter, emulator fine-tuned)"
    )
    p.add_argument("--adapter", type=Path, help="a fine-tuned adapter for --bundle")
    p.add_argument("--merged", type=Path, help="a plugged-in model from `offsite owner plug`")
    p.add_argument("--full-ft", type=Path, help="a fully fine-tuned model (`offsite owner finetune-full`)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_placement_arguments(p, frozen="every part: evaluation trains nothing; the adapter stays fp32")
    p.set_defaults(func=cmd_eval)


def format_metric(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if name == "perplexity" else f"{100 * value:.2f}"


def report_table(report, title: str = "five settings"):
    """The rows of ``report`` with their metrics, the settings each fine-tuned row was trained with,
    and notes."""
    from offsite.evaluation.settings import METRICS, describe_hyperparameters

    names = METRICS[report.kind]
    notes = any(r.note for r in report.rows)  # a column of nothing only costs width
    headers = [
        "setting",
        *[f"{n} (%)" if n != "perplexity" else n for n in names],
        "trained with",
        *(["note"] if notes else []),
    ]
    rows = [
        (
            r.setting,
            *[format_metric(n, (r.metrics or {}).get(n)) for n in names],
            describe_hyperparameters(r.hyperparameters),
            *([r.note] if notes else []),
        )
        for r in report.rows
    ]
    return table(f"{title} ({report.kind}, {report.records} records)", headers, rows)


def cmd_eval(args: argparse.Namespace) -> int:
    from offsite.evaluation.settings import EvalInputs, evaluate_settings

    inputs = EvalInputs(
        model=args.model, bundle=args.bundle, adapter=args.adapter, merged=args.merged, full_ft=args.full_ft
    )
    with placement_from(args), console.status("evaluating…"):
        report = evaluate_settings(args.task, args.kind, inputs)
    if args.json:
        print_json(report.to_json())
    else:
        console.print(report_table(report))
    return 0
