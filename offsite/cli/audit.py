"""`offsite audit`: check what others claim, from the files alone.

``offsite audit ledger`` (``offsite.cli.audit_ledger``) verifies an owner's whole privacy ledger.
``offsite audit receipt RECEIPT --adapter DIR [--pubkey KEY] [--json]`` verifies a privacy receipt
(format version 1 or 2, and says which): its signature first (a bad one ends the audit), who signed
it, that it covers this adapter, that its noise was not seeded, and both ε values recomputed with two
accountants from the mechanism histories it carries. Exit status 1 if any check fails.

``offsite audit canaries BUNDLE (--receipt RECEIPT | settings) [--no-dp] [--json]`` tests the DP
implementation empirically with the one-run canary audit (``offsite.canary_audit``): exit status 1 if
its ε lower bound exceeds the accountant's ε, 2 if it cannot run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from offsite.cli import audit_ledger
from offsite.cli.ui import checks_table, console, err_console, print_json, warn


def register(subparsers: argparse._SubParsersAction) -> None:
    audit = subparsers.add_parser(
        "audit",
        help="verify privacy receipts and an owner's privacy ledger",
        description="Independent checks of what a data owner claims about its private training.",
    )
    cmds = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    p = cmds.add_parser(
        "receipt",
        help="verify a privacy receipt against its adapter",
        description="Check RECEIPT (receipt.json, with receipt.sig beside it; format version 1 or 2, the "
        "report says which). First the Ed25519 signature over the receipt's exact bytes: if it fails, the "
        "audit stops there. Then the signer's identity (with --pubkey), the sha256 of "
        "DIR/adapter.safetensors, the noise source (seeded test-only noise fails), for version 2 the "
        "sampling rate on the published grid, δ against the size bucket and cumulative ε against the "
        "dataset's budget, and ε of this run and cumulative ε recomputed from the recorded mechanism "
        "histories with the PRV and RDP accountants. Receipts over 1 MiB or with more than 10,000 history "
        "entries are refused before any accounting. Exits 1 if any check fails or the receipt cannot be "
        "read; with --json every outcome, errors included, is one JSON object on stdout.",
    )
    p.add_argument("receipt", type=Path, metavar="RECEIPT", help="path to receipt.json")
    p.add_argument("--adapter", type=Path, required=True, metavar="DIR", help="adapter directory it covers")
    p.add_argument(
        "--pubkey",
        type=Path,
        default=None,
        metavar="KEY",
        help="the data owner's public key (PEM); without it the signer's identity is unverified",
    )
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.set_defaults(func=cmd_audit_receipt)
    register_canaries(cmds)
    audit_ledger.register(cmds)


def cmd_audit_receipt(args: argparse.Namespace) -> int:
    from offsite import crypto
    from offsite.errors import FormatError, OffsiteError
    from offsite.privacy.receipt_audit import verify_receipt

    try:
        try:
            public_key = None
            if args.pubkey is not None:
                if not args.pubkey.is_file():  # a FIFO would block the read, a directory would crash it
                    raise FormatError(f"public key {args.pubkey} does not exist or is not a regular file")
                public_key = crypto.load_public_key(args.pubkey)
            report = verify_receipt(args.adapter, public_key=public_key, receipt_path=args.receipt)
        except OSError as e:  # an unreadable file: a clear error, not a traceback
            raise FormatError(f"cannot read {e.filename or 'a file'}: {e.strerror or e}") from e
    except OffsiteError as e:
        if args.json:
            # Keep stdout machine-readable even when the receipt cannot be read or parsed at all.
            print_json(
                {
                    "ok": False,
                    "receipt": str(args.receipt),
                    "adapter": str(args.adapter),
                    "format_version": None,
                    "error": str(e),
                    "checks": [],
                }
            )
            return 1
        raise
    if args.json:
        print_json(report.to_dict())
        return 0 if report.ok else 1

    t = checks_table(f"privacy receipt {args.receipt}", report.checks)
    console.print(t)
    console.print(
        f"receipt format version {report.format_version}"
        if report.format_version
        else "receipt format version: not read (the audit stopped before parsing it)"
    )
    receipt = report.receipt
    if receipt is not None:
        signer = receipt["signer"]["public_key_fingerprint"]
        console.print(
            f"ε at δ={receipt['delta']:g} for {receipt['mechanism']}, neighbours: "
            f"{receipt['neighbouring_relation']}; signer sha256:{signer}"
        )
    if report.stopped:
        console.print(f"[bold red]audit stopped[/bold red]: {escape(report.stopped)}")
    if public_key is None and not report.stopped:
        warn(
            "signer's identity is unverified: no --pubkey given, so the signature was checked against the key "
            "embedded in the receipt; pass the data owner's public key to know who signed it"
        )
    if report.ok:
        console.print(
            "[green]receipt verified[/green]" + ("" if public_key is not None else " (signer unverified)")
        )
        return 0
    failed = ", ".join(c.name for c in report.checks if c.status == "fail")
    console.print(f"[bold red]receipt verification failed[/bold red]: {escape(failed)}")
    return 1


# -- offsite audit canaries -------------------------------------------------------------------------


def register_canaries(cmds: argparse._SubParsersAction) -> None:
    from offsite.privacy.canaries import (
        DEFAULT_CANARIES,
        DEFAULT_CANARY_WORDS,
        DEFAULT_LR,
        DEFAULT_PHYSICAL_BATCH,
    )

    p = cmds.add_parser(
        "canaries",
        help="test the DP implementation empirically (one-run canary audit)",
        description="Train BUNDLE's adapter once, through the same DP-SGD code as `offsite client train`, "
        "on an audit set of M random canary records (each included with probability 1/2) plus filler "
        "records (--data: public records the auditor supplies; default: random ones), never on private "
        "data. Then guess which canaries were included from how much training lowered their loss, and "
        "turn the number of correct guesses into a lower bound on ε at 95% confidence (Steinke, Nasr and "
        "Jagielski 2023). The settings (σ, q, steps, C, δ) come from a receipt (--receipt; the audit set "
        "then fills its size bucket, so q means what it meant there) or are given explicitly. The audit "
        "FAILS (exit 1) if the lower bound exceeds the accountant's ε for those settings (PRV upper "
        "bound): the implementation leaks more than it claims. A pass cannot prove the claim (see "
        "docs/privacy.md). --no-dp runs the same audit with σ = 0, to show what it detects when nothing "
        "is private. Exit 2 if the audit cannot run; with --json every outcome is one JSON object.",
    )
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle directory (emulator and adapter)")
    src = p.add_argument_group("the settings audited: --receipt, or all of the explicit ones")
    src.add_argument("--receipt", type=Path, default=None, metavar="RECEIPT", help="receipt.json (version 2)")
    src.add_argument("--noise-multiplier", type=float, default=None, metavar="SIGMA", help="σ")
    src.add_argument(
        "--sample-rate", type=float, default=None, metavar="Q", help="q, the Poisson sampling rate"
    )
    src.add_argument("--steps", type=int, default=None, help="DP-SGD steps")
    src.add_argument(
        "--max-grad-norm", type=float, default=None, metavar="C", help="clipping norm C (default 1.0)"
    )
    src.add_argument("--delta", type=float, default=None, help="δ the accountant's ε and the bound are at")
    src.add_argument(
        "--size-bucket",
        type=int,
        default=None,
        help="explicit settings: the size bucket (nominal batch = q × bucket); default: the audit set's own",
    )
    src.add_argument(
        "--no-dp", action="store_true", help="σ = 0, everything else unchanged: shows the audit's power"
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="public filler records (JSONL, CSV or text; never private data)",
    )
    p.add_argument(
        "--canaries",
        type=int,
        default=DEFAULT_CANARIES,
        metavar="M",
        help=f"canaries (default {DEFAULT_CANARIES})",
    )
    p.add_argument(
        "--canary-words",
        type=int,
        default=DEFAULT_CANARY_WORDS,
        help=f"words per canary, drawn uniformly from the tokenizer's words (default {DEFAULT_CANARY_WORDS})",
    )
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"learning rate (default {DEFAULT_LR:g})")
    p.add_argument(
        "--physical-batch-size",
        type=int,
        default=DEFAULT_PHYSICAL_BATCH,
        help=f"records per forward pass (default {DEFAULT_PHYSICAL_BATCH})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="canaries' words and inclusion (default: drawn with Python's secrets module; reported). Sampling "
        "and noise always come from a ChaCha20 stream keyed afresh from os.urandom",
    )
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    from offsite.cli.placement import add_placement_arguments

    add_placement_arguments(p, frozen="the emulator's middle blocks, embeddings and head", checkpointing=True)
    p.set_defaults(func=cmd_audit_canaries)


def _canary_settings(args: argparse.Namespace):
    from offsite.canary_audit import settings_from_flags, settings_from_receipt
    from offsite.errors import OffsiteError

    explicit = {
        "--noise-multiplier": args.noise_multiplier,
        "--sample-rate": args.sample_rate,
        "--steps": args.steps,
        "--max-grad-norm": args.max_grad_norm,
        "--delta": args.delta,
        "--size-bucket": args.size_bucket,
    }
    if args.receipt is not None:
        given = [flag for flag, value in explicit.items() if value is not None]
        if given:
            raise OffsiteError(f"{', '.join(given)}: the settings come from --receipt; give one or the other")
        settings = settings_from_receipt(args.receipt)
        return settings.without_dp() if args.no_dp else settings
    needed = ["--sample-rate", "--steps", "--delta"] + ([] if args.no_dp else ["--noise-multiplier"])
    missing = [flag for flag in needed if explicit[flag] is None]
    if missing:
        raise OffsiteError(f"give --receipt, or the settings explicitly: missing {', '.join(missing)}")
    if args.no_dp and args.noise_multiplier is not None:
        raise OffsiteError("--noise-multiplier: --no-dp audits σ = 0")
    return settings_from_flags(
        noise_multiplier=None if args.no_dp else args.noise_multiplier,
        sample_rate=args.sample_rate,
        steps=args.steps,
        max_grad_norm=1.0 if args.max_grad_norm is None else args.max_grad_norm,
        delta=args.delta,
        bucket=args.size_bucket,
    )


def cmd_audit_canaries(args: argparse.Namespace) -> int:
    from offsite.canary_audit import AuditOptions, run_canary_audit
    from offsite.cli.placement import placement_from
    from offsite.cli.progress import step_bar
    from offsite.errors import FormatError, OffsiteError

    try:
        try:
            settings = _canary_settings(args)
            opts = AuditOptions(
                canaries=args.canaries,
                canary_words=args.canary_words,
                lr=args.lr,
                physical_batch_size=args.physical_batch_size,
                seed=args.seed,
                data=args.data,
            )
            opts.validate()
            if not settings.dp:
                err_console.print(
                    "[bold]--no-dp[/bold]: σ = 0, so nothing is private; this run shows what the audit detects"
                )
            with (
                placement_from(args),
                step_bar("training with canaries" + ("" if settings.dp else " (NO DP)")) as bar,
            ):
                result = run_canary_audit(
                    args.bundle, settings, opts, on_total=bar.set_total, on_step=bar, on_warning=warn
                )
        except OSError as e:
            raise FormatError(f"cannot read {e.filename or 'a file'}: {e.strerror or e}") from e
    except OffsiteError as e:
        if args.json:
            print_json({"ok": False, "verdict": "error", "error": str(e), "bundle": str(args.bundle)})
            return 2
        raise
    report = result.to_dict()
    report["bundle"] = str(args.bundle)
    if args.json:
        print_json(report)
        return 1 if result.failed else 0
    _print_canary_report(result)
    return 1 if result.failed else 0


def _print_canary_report(result) -> None:
    from offsite.privacy.canaries import REPORTED_FPR

    s, b = result.settings, result.bound
    best = b.best
    console.print(
        f"settings ({escape(s.source)}): σ={s.noise_multiplier:.4g}, q={s.sample_rate:.4g} "
        f"(= {s.nominal_batch}/{s.size_bucket}), steps={s.steps}, C={s.max_grad_norm:g}, δ={s.delta:g}"
        + ("" if s.dp else " [bold](NO DP)[/bold]")
    )
    console.print(
        f"audit set: {result.records} records = {result.filler} filler ({escape(result.filler_source)}) + "
        f"{result.included} of {result.canaries} canaries; seed {result.seed}; training {result.train_seconds:.1f} s"
    )
    t = Table(title="canary audit", title_justify="left")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_column("detail", overflow="fold")
    t.add_row(
        f"ε lower bound ({b.confidence:.0%})",
        f"{b.epsilon:.3f}",
        f"best of {len(b.results)} guess sets (Bonferroni): {best.correct} of {best.k_plus + best.k_minus} "
        f"correct (k₊={best.k_plus}, k₋={best.k_minus})",
    )
    t.add_row(
        "most this audit could show",
        f"{b.max_epsilon:.3f}",
        f"every guess right, {result.canaries} canaries"
        + ("" if result.could_fail or not s.dp else ": cannot fail"),
    )
    t.add_row(
        "accountant ε (PRV upper)",
        "∞" if result.accountant_epsilon is None else f"{result.accountant_epsilon:.3f}",
        "no noise: no bound"
        if not s.dp
        else (f"receipt states {s.stated_epsilon:.3f}" if s.stated_epsilon else ""),
    )
    t.add_row("AUROC", "n/a" if result.auroc is None else f"{result.auroc:.3f}", "0.5 = no signal")
    t.add_row(
        f"TPR at FPR {REPORTED_FPR:.0%}",
        "n/a" if result.tpr_at_fpr is None else f"{result.tpr_at_fpr:.3f}",
        "",
    )
    console.print(t)
    if not s.dp:
        console.print(
            f"[bold]no DP[/bold]: the audit shows ε ≥ {b.epsilon:.3f} when nothing is private: what it can "
            "detect on this bundle at these settings"
        )
    elif result.failed:
        console.print(
            f"[bold red]FAIL[/bold red]: the lower bound {b.epsilon:.3f} exceeds the accountant's ε "
            f"{result.accountant_epsilon:.3f}: this implementation leaks more than these settings claim "
            f"(a false alarm has probability at most {1 - b.confidence:.0%})"
        )
    else:
        console.print(
            f"[green]pass[/green]: the lower bound {b.epsilon:.3f} is within the accountant's ε "
            f"{result.accountant_epsilon:.3f} (a pass does not prove the claim: docs/privacy.md"
            + ("" if result.could_fail else "; and this audit could not have failed it")
            + ")"
        )
