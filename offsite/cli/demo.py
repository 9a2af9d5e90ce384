"""`offsite demo`: the whole flow on a small model the project builds itself."""

from __future__ import annotations

import argparse
from pathlib import Path

from offsite.cli.placement import add_placement_arguments, placement_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole mission over the wire, the five-setting table and a ledger audit",
        description="Build (or reuse from the cache) a small demo model owner and a private "
        "downstream task, then run the mission over the wire: the owner's state with its own PKI "
        "(`owner init`), the bundle (`owner prepare`, with distillation), a gRPC server with mutual TLS "
        "on 127.0.0.1 (a free port), one data owner that enrols, lists the jobs, fetches the signed "
        "bundle, trains with DP (ε = 8, the DP defaults of `offsite client train`, within the job's "
        "maximum and the owner's grant) and submits the adapter and its receipt; the server verifies "
        "and accepts it and the owner plugs it in (`owner plug --submission`). Then the five settings, "
        "and `offsite audit ledger` on the demo's own server state (owner key and the data owner's "
        "receipt key pinned, its checkpoints). The non-private reference rows (full fine-tuning, the emulator and the plug-in "
        "trained without DP) use the settings benchmarks/sweep_reference.py chose on a validation "
        "split, and their scores are cached by content after the first run. Each row says which "
        "settings it used. Exits 1 if a check or the audit fails.",
    )
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (what CI runs)")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning seed")
    p.add_argument(
        "--keep",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the whole work directory here (new or empty): the owner's state in DIR/owner, the data "
        "owner's credentials in DIR/client-1/keys (checkpoints in DIR/client-1/keys/checkpoints), what it "
        "handed the auditor in DIR/auditor, the bundle, adapters and merged models (trains the reference "
        "rows instead of reusing cached scores, so that their models are there too). Afterwards: "
        "`offsite audit ledger DIR/owner --html report.html`",
    )
    p.add_argument(
        "--recompute-reference",
        action="store_true",
        help="train the non-private reference rows again instead of reusing their cached scores",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_placement_arguments(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    import warnings

    from offsite.cli.demo_run import run_demo
    from offsite.formats.signing import UnverifiedBundleWarning

    # The owner's own bundle (unsigned on its disk) is scored in this very process for the emulator rows and
    # the reference rows: no warning for that. The data owner trains on the bundle it fetched, signed.
    with warnings.catch_warnings(), placement_from(args):  # every model of the demo runs on --device
        warnings.simplefilter("ignore", UnverifiedBundleWarning)
        return run_demo(
            quick=args.quick,
            seed=args.seed,
            as_json=args.json,
            keep=args.keep,
            recompute_reference=args.recompute_reference,
        )
