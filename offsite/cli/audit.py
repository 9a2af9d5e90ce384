"""`offsite audit`: check what others claim, from the files alone.

``offsite audit ledger`` (``offsite.cli.audit_ledger``) verifies an owner's whole privacy ledger.
``offsite audit receipt RECEIPT --adapter DIR [--pubkey KEY] [--json]`` verifies a privacy receipt
(format version 1 or 2, and says which): its signature first (a bad one ends the audit), who signed
it, that it covers this adapter, that its noise was not seeded, and both ε values recomputed with two
accountants from the mechanism histories it carries. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from offsite.cli import audit_ledger
from offsite.cli.ui import console, print_json, warn

_STYLE = {
    "ok": "[green]ok[/green]",
    "fail": "[bold red]FAIL[/bold red]",
    "unverified": "[yellow]unverified[/yellow]",
}


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

    t = Table(title=f"privacy receipt {escape(str(args.receipt))}", title_justify="left")
    t.add_column("check")
    t.add_column("status")
    t.add_column("stated", justify="right")
    t.add_column("recomputed", justify="right")
    t.add_column("detail", overflow="fold")
    for c in report.checks:
        t.add_row(
            escape(c.name),
            _STYLE.get(c.status, c.status),
            escape(c.stated),
            escape(c.recomputed),
            escape(c.detail),
        )
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
