"""`offsite client`: the data owner's commands (fine-tune an adapter privately, manage keys)."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from offsite.cli import client_service
from offsite.cli.placement import add_placement_arguments, placement_from
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
        help="passes over the data (default: under DP the DP default, see below; without DP 3); under DP "
        "the expected passes: steps = ⌈epochs / q⌉",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate, in (0, 10] (default: under DP the DP default; without DP 1e-3)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batch size (default: under DP the DP default; without DP 16). Under DP the nominal batch B: "
        "each record joins each step's batch with probability q = B / bucket (bucket: the power of two at or "
        "above the number of records), so batches hold q·N records on average, between B/2 and B; the noisy "
        "gradient sum is divided by B",
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
    add_placement_arguments(p, frozen="the emulator's middle blocks, embeddings and head", checkpointing=True)
    client_service.add_train_server_arguments(p)
    p.set_defaults(func=cmd_train)
    from offsite.cli.keys import register_keys

    register_keys(cmds)

    p = cmds.add_parser(
        "budget",
        help="show each dataset's privacy budget and what it has spent",
        description="For each dataset (or the named ones): its budget (ε, δ), fixed by its first DP run or "
        "by `offsite client set-budget`, and the ε spent by every DP run recorded on this machine: the "
        "recorded mechanism histories (its own and those of datasets it inherits) composed, never added, "
        "by PRV (upper bound) and RDP. Then the datasets whose records overlap, and how each overlap is "
        "treated (inherited, separate budgets declared with --new-budget, or unresolved: the next run on "
        "either is refused until it says).",
    )
    p.add_argument("dataset_ids", nargs="*", metavar="DATASET_ID", help="datasets to show (default: all)")
    p.add_argument(
        "--delta", type=float, default=None, help="state ε at this δ (default: each dataset's own δ)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    client_service.add_budget_server_arguments(p)
    p.set_defaults(func=cmd_budget)
    client_service.register(cmds)

    p = cmds.add_parser(
        "set-budget",
        help="set or change a dataset's privacy budget (ε, δ)",
        description="A budget is a pair (ε, δ) fixed per dataset: the first DP run on a dataset records its "
        "--epsilon and δ, and later runs may not ask for more ε or another δ. This command is the one "
        "explicit way to change it (or to set it before the first run, or for a history from an older "
        "version of offsite). The change is recorded in the dataset's history with its time, and later "
        "receipts show every change. Runs already recorded keep counting against the new budget.",
    )
    p.add_argument("dataset_id", metavar="DATASET_ID", help="the dataset whose budget to set")
    p.add_argument("--epsilon", type=float, required=True, help="the dataset's total ε budget")
    p.add_argument("--delta", type=float, required=True, help="the δ at which every run on it is accounted")
    p.add_argument("--keys-dir", type=Path, default=None, help=client_service.KEYS_DIR_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_set_budget)


def add_dp_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "differential privacy (on by default)",
        "DP-SGD: Poisson sampling, per-sample clipping and Gaussian noise. One record is the unit "
        "protected. Each dataset has a budget (ε, δ), fixed by its first DP run (its --epsilon and δ) or "
        "by `offsite client set-budget`: every run recorded on this machine for --dataset-id (and for the "
        "datasets it inherits) is composed with this one, and σ is the smallest noise that keeps the total "
        "within the budget. q, the number of steps and the default δ follow from the flags and the size "
        "bucket (the power of two at or above the number of records), which the receipt publishes instead "
        "of the number of records. Sampling and noise come from a ChaCha20 stream keyed from os.urandom (a "
        "new key per run, never stored), never from --seed. Every option is checked before any budget is "
        "reserved; an interrupted run (crash, Ctrl-C) resumes under its reservation when rerun with the "
        "same bundle, data, --out and settings. DP defaults: tuning DP settings by trial would spend "
        "budget, so --batch-size, --epochs and --lr, when not given, follow a documented rule "
        "(offsite.training.dp_defaults, docs/privacy.md) from the dataset's size bucket, ε, δ and the "
        "adapter kind; the chosen values are printed, flags you give always win, and a warning says when "
        "the data is too small for the budget to buy much.",
    )
    g.add_argument("--dataset-id", help="name of the private dataset whose budget this run spends")
    g.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help="the dataset's total ε: on its first run, this becomes its budget; later, the same or a "
        "smaller value (a stricter target for this run), or none to use the recorded budget",
    )
    g.add_argument(
        "--delta",
        type=float,
        default=None,
        help="δ: on a dataset's first run, it becomes part of its budget (default: a power of ten at most "
        "1/(10·bucket), so below 1/(10·N) for N records; δ ≥ 1/N is refused); later runs must use the "
        "recorded δ (omit it)",
    )
    g.add_argument(
        "--noise-multiplier",
        type=float,
        default=None,
        help="use this σ (0.3 to 100, the range the accountant is trusted over) instead of calibrating it; "
        "the dataset's budget must still hold",
    )
    g.add_argument(
        "--inherit",
        action="append",
        default=[],
        metavar="DATASET_ID",
        help="compose with DATASET_ID's history: its runs count towards this dataset's budget and appear "
        "in the receipt's cumulative history (needed when this run's records overlap that dataset's; "
        "repeatable; recorded)",
    )
    g.add_argument(
        "--new-budget",
        action="store_true",
        help="this run's records overlap another dataset's, and they get a separate budget anyway "
        "(recorded on this machine, with a warning: those records are then protected by two budgets, "
        "not one)",
    )
    g.add_argument(
        "--max-grad-norm",
        type=float,
        default=1.0,
        help="per-sample clipping norm C, in (0, 1e6] (default 1.0)",
    )
    g.add_argument(
        "--physical-batch-size",
        type=int,
        default=32,
        help="records per forward/backward; bounds memory (default 32)",
    )
    g.add_argument("--keys-dir", type=Path, default=None, help=client_service.KEYS_DIR_HELP)
    g.add_argument(
        "--no-dp", action="store_true", help="train WITHOUT differential privacy (not recommended)"
    )
    g.add_argument("--insecure-noise-seed", type=int, default=None, help=argparse.SUPPRESS)


def cmd_train(args: argparse.Namespace) -> int:
    from offsite.cli.progress import step_bar
    from offsite.tune import tune

    _say_what_is_not_private(args)
    limits = _apply_server_limits(args)
    opts = _tune_options(args)
    opts.validate()  # before anything is loaded or reserved (tune checks again)
    chosen_defaults: dict = {}
    with placement_from(args), step_bar("training adapter" + ("" if opts.dp else " (NO DP)")) as bar:
        result = tune(
            args.bundle,
            args.data,
            args.out,
            opts,
            on_step=bar,
            on_eval=lambda epoch, loss: err_console.print(f"epoch {epoch}: eval loss {loss:.4f}"),
            on_plan=_show_plan,
            on_total=bar.set_total,
            on_warning=warn,
            on_defaults=lambda d: _show_defaults(d, opts.dp_defaults_for, chosen_defaults),
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
                "server_limits": limits,
            }
        )
    else:
        _print_trained(args, result)
    return 0


def _say_what_is_not_private(args: argparse.Namespace) -> None:
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


def _apply_server_limits(args: argparse.Namespace) -> dict | None:
    """With --server: the job's maximum and the owner's grant are limits too; the target becomes the
    smallest of them (and the grant's δ)."""
    if args.server is None:
        return None
    limits = client_service.server_limits(args)
    args.epsilon, args.delta = limits["epsilon"], limits["delta"]
    err_console.print(
        f"target ε = {limits['epsilon']:g} at δ = {limits['delta']:g}, the smallest of: "
        + ", ".join(f"{name} {value:g}" for name, value in limits["limits"].items())
    )
    return limits


def _tune_options(args: argparse.Namespace):
    from offsite.tune import TuneOptions

    # Hyperparameters not given: under DP the DP defaults choose them once the data's size bucket is
    # known; without DP TuneOptions' own defaults apply.
    given = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size}
    keys = client_service.keys_dir(args)
    return TuneOptions(
        **{name: value for name, value in given.items() if value is not None},
        dp_defaults_for=() if args.no_dp else tuple(name for name, value in given.items() if value is None),
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
        inherit=tuple(args.inherit),
        new_budget=args.new_budget,
        noise_seed=args.insecure_noise_seed,
        keys_dir=keys,
        budget_dir=keys,  # one directory holds all of this data owner's state
        bundle_owner_key=client_service.enrolled_owner_key(keys),
    )


def _show_plan(plan) -> None:
    err_console.print(
        f"DP plan: σ={plan.noise_multiplier:.4f}, q={plan.sample_rate:.4g} "
        f"(= {plan.nominal_batch}/{plan.size_bucket}, size bucket {plan.size_bucket}), "
        f"steps={plan.steps}, C={plan.max_grad_norm:g}, δ={plan.delta:g}"
    )
    if plan.noise_multiplier > 10:
        warn(
            f"the budget left for this dataset only allows σ={plan.noise_multiplier:.1f}: the noise will "
            "swamp the gradient and the adapter will learn almost nothing"
        )


def _show_defaults(d, used_for: tuple[str, ...], chosen: dict) -> None:
    chosen.update(d.to_json())
    picked = ", ".join(f"--{n.replace('_', '-')}" for n in used_for)
    err_console.print(f"{d.summary()}; used for {picked} (flags you give win)")
    if d.warning:
        warn(d.warning)


def _print_trained(args: argparse.Namespace, result) -> None:
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


def cmd_budget(args: argparse.Namespace) -> int:
    if args.server is not None:
        return client_service.cmd_server_budget(args)
    from offsite.privacy import accounting, history

    client_dir = client_service.keys_dir(args)
    ids = [history.validate_dataset_id(d) for d in args.dataset_ids] or history.dataset_ids(client_dir)
    delta = None if args.delta is None else accounting.validate_delta(args.delta, "--delta")
    rows = []
    for dataset_id in ids:
        h = history.read(dataset_id, client_dir)
        budget = h.budget
        at = delta if delta is not None else (budget.delta if budget else None)
        eps = history.spent_epsilon(dataset_id, at, client_dir) if at is not None else None
        rows.append(
            {
                "dataset_id": dataset_id,
                "budget": None if budget is None else {"epsilon": budget.epsilon, "delta": budget.delta},
                "budget_changes": h.budget_changes,
                "inherits": history.composes_with(dataset_id, client_dir),
                "runs": len({e["run_id"] for e in h.entries}),
                "steps": sum(e["steps"] for e in h.entries),
                "delta": at,
                "epsilon": None if eps is None else eps.to_dict(),
            }
        )
    wanted = set(ids)
    overlaps = [o.to_dict() for o in history.overlaps(client_dir) if wanted & {o.a, o.b}]
    if args.json:
        print_json({"datasets": rows, "overlaps": overlaps})
        return 0
    if not rows:
        console.print("no DP runs recorded on this machine")
        return 0
    console.print(
        table(
            "privacy budget per dataset (ε composed over all recorded runs, never added)",
            ["dataset", "budget ε", "δ", "spent ε (PRV upper)", "ε (RDP)", "runs", "steps", "inherits"],
            [
                (
                    r["dataset_id"],
                    "not set" if r["budget"] is None else f"{r['budget']['epsilon']:g}",
                    "—" if r["delta"] is None else f"{r['delta']:g}",
                    "—" if r["epsilon"] is None else f"{r['epsilon']['prv_upper']:.3f}",
                    "—" if r["epsilon"] is None else f"{r['epsilon']['rdp']:.3f}",
                    r["runs"],
                    r["steps"],
                    ", ".join(r["inherits"]) or "—",
                )
                for r in rows
            ],
        )
    )
    if overlaps:
        console.print(
            table(
                "datasets that share records",
                ["datasets", "shared records", "treated as"],
                [(" & ".join(o["datasets"]), o["shared_records"], o["relation"]) for o in overlaps],
            )
        )
    return 0


def cmd_set_budget(args: argparse.Namespace) -> int:
    from offsite.privacy import history

    dataset_id = history.validate_dataset_id(args.dataset_id)
    budget, spent = history.set_budget(dataset_id, args.epsilon, args.delta, client_service.keys_dir(args))
    info = {
        "dataset_id": dataset_id,
        "budget": {"epsilon": budget.epsilon, "delta": budget.delta},
        "spent": spent.to_dict(),
    }
    if args.json:
        print_json(info)
        return 0
    console.print(
        f"budget of {dataset_id} set to ε={budget.epsilon:g} at δ={budget.delta:g} (recorded with its time); "
        f"spent so far: ε={spent.prv_upper:.3f} (PRV upper)"
    )
    if spent.prv_upper >= budget.epsilon:
        warn(f"{dataset_id} has already spent its whole new budget: further DP runs on it will be refused")
    return 0
