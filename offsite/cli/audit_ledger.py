"""`offsite audit ledger STATE_OR_EXPORT [--owner-pubkey KEY] [--checkpoints DIR] [--json] [--html REPORT]`.

The command around ``offsite.privacy.ledger_audit.audit_ledger`` (what is checked, in which order) and
``offsite.privacy.ledger_report.render_html``. ``print_report`` is the terminal view, also for other
front ends (the demo) that audit a ledger and show the verdict. Exit status 1 on any violation (so the
command can gate a pipeline), 1 with ``--json`` when the input cannot be read at all (the error in the
JSON object), 2 otherwise for such an error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from offsite.cli.ui import console, print_json, warn

_STYLE = {
    "ok": "[green]ok[/green]",
    "fail": "[bold red]FAIL[/bold red]",
    "FAIL": "[bold red]FAIL[/bold red]",
    "unverified": "[yellow]unverified[/yellow]",
}


def register(cmds: argparse._SubParsersAction) -> None:
    p = cmds.add_parser(
        "ledger",
        help="verify an owner's privacy ledger and recompute every dataset's ε",
        description="Audit the model owner's ledger without trusting the owner: STATE_OR_EXPORT is its state "
        "directory (read-only) or a file from `offsite owner export-ledger`. Checks, in order: the owner "
        "key (pinned with --owner-pubkey, else read from the input and reported as not pinned); an export's "
        "signature over the whole file; the hash chain and every entry's signature, naming the first bad "
        "entry and how (edited, deleted, reordered, inserted, forged receipt, replaced export signature); "
        "the data owners' checkpoints (--checkpoints: truncated or forked); the recorded clients against "
        "their enrolment entries. Then every dataset's ε is recomputed from the receipts' histories with "
        "Opacus' PRV and Google's dp-accounting PLD: no stated ε may be below the tighter one beyond the "
        "stated tolerance, no grant may be exceeded; and unsafe settings are flagged (δ ≥ q, seeded "
        "noise, sampling other than Poisson, an ε from an accountant that can underestimate). Prints a "
        "table per client; --html writes a self-contained report with a plot of cumulative ε over time "
        "against each grant. Exits 1 on any violation.",
    )
    p.add_argument(
        "source", type=Path, metavar="STATE_OR_EXPORT", help="owner state directory or export file"
    )
    p.add_argument(
        "--owner-pubkey",
        type=Path,
        default=None,
        metavar="KEY",
        help="the owner's public signing key (PEM, e.g. owner_signing_key.pub.pem from an enrolment package); "
        "without it the key recorded in the input is used and the report says it was not pinned",
    )
    p.add_argument(
        "--checkpoints",
        type=Path,
        default=None,
        metavar="DIR",
        help="a directory of ledger checkpoints data owners kept (their KEYS/checkpoints, searched recursively)",
    )
    p.add_argument("--json", action="store_true", help="print the report (or the error) as one JSON object")
    p.add_argument(
        "--html", type=Path, default=None, metavar="REPORT", help="write an HTML report (a new file)"
    )
    p.set_defaults(func=cmd_audit_ledger)


def print_report(report) -> None:
    """The report on the terminal: the checks, a table per client, the verdict."""
    t = Table(title=f"ledger {escape(report.source)} ({report.source_kind})", title_justify="left")
    for column in ("check", "status", "stated", "recomputed", "detail"):
        t.add_column(column, overflow="fold")
    for c in report.checks:
        t.add_row(
            escape(c.name),
            _STYLE.get(c.status, c.status),
            escape(c.stated),
            escape(c.recomputed),
            escape(c.detail),
        )
    console.print(t)
    for client in report.clients.values():
        title = f"client {escape(client.client_id)}"
        if client.revoked_at_entry is not None:
            title += f" (revoked at entry {client.revoked_at_entry})"
        if client.non_private:
            title += f", {client.non_private} non-private adapter(s)"
        ct = Table(title=title, title_justify="left")
        for i, column in enumerate(
            (
                "dataset",
                "grant ε",
                "δ",
                "spent ε PRV",
                "spent ε PLD",
                "stated",
                "remaining",
                "accepted",
                "verdict",
            )
        ):
            ct.add_column(column, justify="left" if i in (0, 8) else "right")
        for d in client.datasets.values():
            ct.add_row(
                escape(d.dataset_id),
                "none" if d.grant_epsilon is None else f"{d.grant_epsilon:g}",
                "—" if d.grant_delta is None else f"{d.grant_delta:g}",
                "—" if d.spent_prv is None else f"{d.spent_prv:.4f}",
                "—" if d.spent_pld is None else f"{d.spent_pld:.4f}",
                "—" if d.stated is None else f"{d.stated:.4f}",
                "—" if d.remaining is None else f"{d.remaining:.4f}",
                str(d.accepted),
                _STYLE.get(d.verdict, d.verdict),
            )
        console.print(ct)
        for d in client.datasets.values():
            for problem in d.problems:
                console.print(f"  [red]{escape(d.dataset_id)}[/red]: {escape(problem)}")
    if report.first_bad is not None:
        where = "the export" if report.first_bad.index is None else f"entry {report.first_bad.index}"
        console.print(f"[bold red]first bad entry[/bold red]: {where}: {report.first_bad.kind}")
    if not report.owner_key_pinned:
        warn("the owner key was not pinned (--owner-pubkey): it was read from the ledger's own records")
    style = "green" if report.ok else "bold red"
    console.print(f"[{style}]{escape(report.verdict)}[/{style}]")


def cmd_audit_ledger(args: argparse.Namespace) -> int:
    from offsite import crypto
    from offsite.errors import FormatError, OffsiteError
    from offsite.fileio import write_new_file
    from offsite.privacy.ledger_audit import audit_ledger
    from offsite.privacy.ledger_report import render_html

    try:
        try:
            key = None
            if args.owner_pubkey is not None:
                if not args.owner_pubkey.is_file():
                    raise FormatError(
                        f"--owner-pubkey {args.owner_pubkey} does not exist or is not a regular file"
                    )
                key = crypto.load_public_key(args.owner_pubkey)
            report = audit_ledger(args.source, owner_pubkey=key, checkpoints=args.checkpoints)
            html = write_new_file(args.html, render_html(report).encode("utf-8")) if args.html else None
        except OSError as e:
            raise FormatError(f"cannot read {e.filename or 'a file'}: {e.strerror or e}") from e
    except OffsiteError as e:
        if args.json:
            print_json({"ok": False, "source": str(args.source), "error": str(e), "checks": []})
            return 1
        raise
    if args.json:
        print_json(report.to_dict() | {"html": str(html) if html else None})
    else:
        print_report(report)
        if html:
            console.print(f"HTML report: {html}")
    return 0 if report.ok else 1
