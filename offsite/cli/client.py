"""`offsite client`: the data owner's commands (fine-tune an adapter privately, manage keys)."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from offsite.cli.ui import console, err_console, print_json, table, warn


def register(sub: argparse._SubParsersAction) -> None:
    client = sub.add_parser(
        "client",
        help="data owner: fine-tune adapters on private data",
        description="Commands for a data owner, whose data never leaves its machine.",
    )
    cmds = client.add_subparsers(dest="client_command", metavar="COMMAND", required=True)
    p = cmds.add_parser(
        "train",
        help="fine-tune a bundle's adapter on local data",
        description="Fine-tune the adapter of BUNDLE on the emulator with local data and write ADAPTER "
        "(adapter.safetensors + adapter.json). Only the adapter leaves this machine; losses are shown here.",
    )
    p.add_argument("bundle", type=Path, help="bundle directory from the model owner")
    p.add_argument("--data", type=Path, required=True, help="training records (JSONL, CSV or text)")
    p.add_argument("--out", type=Path, required=True, help="adapter directory to create")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passes over the data (default: under DP the DP default, see below; without DP 3)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: under DP the DP default; without DP 1e-3)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batch size; under DP the expected batch of Poisson sampling (default: under DP the DP "
        "default; without DP 16)",
    )
    p.add_argument("--seed", type=int, default=0, help="data order, initialisation and dropout")
    p.add_argument("--eval-data", type=Path, default=None, help="records for the per-epoch eval loss")
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=0.1,
        help="without --eval-data: fraction of --data held out for the eval loss (default 0.1)",
    )
    p.add_argument(
        "--max-length", type=int, default=None, help="token limit per record (default: the model's)"
    )
    p.add_argument("--json", action="store_true", help="print the result (plan, ε, paths) as JSON")
    add_dp_arguments(p)
    p.set_defaults(func=cmd_train)
    from offsite.cli.keys import register_keys

    register_keys(cmds)

    p = cmds.add_parser(
        "budget",
        help="show the privacy budget spent per dataset",
        description="ε spent on each dataset (or the named ones) by every DP run recorded on this machine: "
        "the recorded mechanism histories composed (never added), by PRV (upper bound) and RDP.",
    )
    p.add_argument("dataset_ids", nargs="*", metavar="DATASET_ID", help="datasets to show (default: all)")
    p.add_argument("--delta", type=float, default=1e-5, help="δ at which to state ε (default 1e-5)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_budget)


def add_dp_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "differential privacy (on by default)",
        "DP-SGD: Poisson sampling, per-sample clipping and Gaussian noise. One record is the unit "
        "protected. --epsilon is the TOTAL budget of --dataset-id at δ: earlier runs on the same dataset "
        "(recorded on this machine) are composed with this one, and σ is the smallest noise that stays "
        "within it. Sampling and noise use the operating system's randomness, never --seed. DP defaults: "
        "tuning DP settings by trial would spend budget, so --batch-size, --epochs and --lr, when not "
        "given, follow a documented rule (offsite.training.dp_defaults, docs/privacy.md) from the "
        "dataset's size bucket (the power of two at or above its record count), ε, δ and the adapter "
        "kind; the chosen values are printed, flags you give always win, and a warning says when the "
        "data is too small for the budget to buy much.",
    )
    g.add_argument("--dataset-id", help="name of the private dataset whose budget this run spends")
    g.add_argument("--epsilon", type=float, default=None, help="total ε budget for --dataset-id")
    g.add_argument(
        "--delta",
        type=float,
        default=None,
        help="δ (default: a power of ten at most 1/(10·N) for N records; δ ≥ 1/N is refused)",
    )
    g.add_argument(
        "--noise-multiplier",
        type=float,
        default=None,
        help="use this σ instead of calibrating it to --epsilon",
    )
    g.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="per-sample clipping norm C (default 1.0)"
    )
    g.add_argument(
        "--physical-batch-size",
        type=int,
        default=32,
        help="records per forward/backward; bounds memory (default 32)",
    )
    g.add_argument(
        "--keys-dir",
        type=Path,
        default=None,
        help="signing key and salt (default: the client credentials directory)",
    )
    g.add_argument(
        "--no-dp", action="store_true", help="train WITHOUT differential privacy (not recommended)"
    )
    g.add_argument("--insecure-noise-seed", type=int, default=None, help=argparse.SUPPRESS)


def cmd_train(args: argparse.Namespace) -> int:
    from offsite import state
    from offsite.cli.progress import step_bar
    from offsite.tune import TuneOptions, tune

    if args.no_dp:
        err_console.print(
            "[bold red on yellow] DIFFERENTIAL PRIVACY IS OFF [/bold red on yellow] "
            "[bold]the adapter can memorise and leak individual training records; "
            "no privacy receipt is written.[/bold]"
        )
    if args.insecure_noise_seed is not None:
        err_console.print(
            "[bold red]noise is seeded (test only): this run is NOT private; the receipt says so[/bold red]"
        )
    # Hyperparameters not given: under DP the DP defaults choose them once the data's size bucket is
    # known; without DP TuneOptions' own defaults apply.
    given = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size}
    opts = TuneOptions(
        **{name: value for name, value in given.items() if value is not None},
        dp_defaults_for=tuple(name for name, value in given.items() if value is None)
        if not args.no_dp
        else (),
        seed=args.seed,
        eval_data=args.eval_data,
        eval_fraction=args.eval_fraction,
        max_length=args.max_length,
        dp=not args.no_dp,
        dataset_id=args.dataset_id,
        epsilon=args.epsilon,
        delta=args.delta,
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm,
        physical_batch_size=args.physical_batch_size,
        noise_seed=args.insecure_noise_seed,
        keys_dir=args.keys_dir or state.client_dir(),
        budget_dir=state.client_dir(),
    )
    if opts.dp and opts.epsilon is None and opts.noise_multiplier is None:
        from offsite.errors import OffsiteError

        raise OffsiteError("give --epsilon (the dataset's total budget) or --noise-multiplier, or --no-dp")

    def on_plan(plan) -> None:
        err_console.print(
            f"DP plan: σ={plan.noise_multiplier:.4f}, q={plan.sample_rate:.4g}, "
            f"steps={plan.steps}, C={plan.max_grad_norm:g}, δ={plan.delta:g}"
        )
        if plan.noise_multiplier > 10:
            warn(
                f"the budget left for this dataset only allows σ={plan.noise_multiplier:.1f}: the noise will "
                "swamp the gradient and the adapter will learn almost nothing"
            )

    chosen_defaults: dict = {}

    def on_defaults(d) -> None:
        chosen_defaults.update(d.to_json())
        picked = ", ".join(f"--{n.replace('_', '-')}" for n in opts.dp_defaults_for)
        err_console.print(f"{d.summary()}; used for {picked} (flags you give win)")
        if d.warning:
            warn(d.warning)

    def on_eval(epoch: int, loss: float) -> None:
        err_console.print(f"epoch {epoch}: eval loss {loss:.4f}")

    with step_bar("training adapter" + ("" if opts.dp else " (NO DP)")) as bar:
        result = tune(
            args.bundle,
            args.data,
            args.out,
            opts,
            on_step=bar,
            on_eval=on_eval,
            on_plan=on_plan,
            on_total=bar.set_total,
            on_defaults=on_defaults,
        )
    if args.json:
        print_json(
            {
                "adapter": str(args.out),
                "bundle_id": result.bundle_id,
                "dp": opts.dp,
                "plan": asdict(result.plan) if result.plan else None,
                "dp_defaults": chosen_defaults or None,
                "epsilon": result.receipt["epsilon"] if result.receipt else None,
                "delta": result.receipt["delta"] if result.receipt else None,
                "receipt": str(args.out / "receipt.json") if result.receipt else None,
            }
        )
        return 0
    if result.eval_losses:
        console.print(
            table(
                "eval loss (shown on this machine only)",
                ["epoch", "loss"],
                [(e, f"{loss:.4f}") for e, loss in result.eval_losses],
            )
        )
    if result.receipt:
        eps = result.receipt["epsilon"]
        console.print(
            table(
                f"privacy spent (δ={result.receipt['delta']:g})",
                ["", "ε (PRV upper)", "ε (RDP)"],
                [
                    ("this run", f"{eps['this_run']['prv_upper']:.3f}", f"{eps['this_run']['rdp']:.3f}"),
                    (
                        f"dataset {args.dataset_id} in total",
                        f"{eps['cumulative']['prv_upper']:.3f}",
                        f"{eps['cumulative']['rdp']:.3f}",
                    ),
                ],
            )
        )
        console.print(f"signed receipt: {args.out / 'receipt.json'}")
    console.print(f"[green]adapter written[/green] to {args.out}")
    return 0


def cmd_budget(args: argparse.Namespace) -> int:
    from offsite import state
    from offsite.privacy import accounting, history

    budgets = state.client_dir()
    ids = args.dataset_ids or history.dataset_ids(budgets)
    rows = []
    for dataset_id in ids:
        entries = history.load_history(history.validate_dataset_id(dataset_id), budgets)
        eps = history.spent_epsilon(dataset_id, accounting.validate_delta(args.delta), budgets)
        rows.append(
            {
                "dataset_id": dataset_id,
                "runs": len({e["run_id"] for e in entries}),
                "steps": sum(e["steps"] for e in entries),
                "epsilon": eps.to_dict(),
            }
        )
    if args.json:
        print_json({"delta": args.delta, "datasets": rows})
        return 0
    if not rows:
        console.print("no DP runs recorded on this machine")
        return 0
    console.print(
        table(
            f"privacy budget spent (δ={args.delta:g})",
            ["dataset", "runs", "steps", "ε (PRV upper)", "ε (RDP)"],
            [
                (
                    r["dataset_id"],
                    r["runs"],
                    r["steps"],
                    f"{r['epsilon']['prv_upper']:.3f}",
                    f"{r['epsilon']['rdp']:.3f}",
                )
                for r in rows
            ],
        )
    )
    return 0
