"""`offsite demo`: the whole flow on a small model the project builds itself."""

from __future__ import annotations

import argparse
from pathlib import Path

from offsite.cli.placement import add_placement_arguments, placement_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run prepare -> private tuning -> plug-in -> five-setting table",
        description="Build (or reuse from the cache) a small demo model owner and a private "
        "downstream task, then run the whole offsite-tuning flow and print the five settings. The "
        "private adapter is trained with DP (ε = 8) using the DP defaults of `offsite client train`; "
        "the non-private reference rows (full fine-tuning, the emulator and the plug-in trained "
        "without DP) use the settings benchmarks/sweep_reference.py chose on a validation split, "
        "and their scores are cached by content after the first run. Each row says which settings "
        "it used.",
    )
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (what CI runs)")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning seed")
    p.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep the bundle, adapters and merged models in this directory (trains the reference "
        "rows instead of reusing cached scores, so that their models are there too)",
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

    from offsite.demo.run import run_demo
    from offsite.formats.signing import UnverifiedBundleWarning

    # The demo's bundle is made in this very process and handed over on disk, unsigned: no warning for that.
    with warnings.catch_warnings(), placement_from(args):  # every model of the demo runs on --device
        warnings.simplefilter("ignore", UnverifiedBundleWarning)
        return run_demo(
            quick=args.quick,
            seed=args.seed,
            as_json=args.json,
            keep=args.keep,
            recompute_reference=args.recompute_reference,
        )
