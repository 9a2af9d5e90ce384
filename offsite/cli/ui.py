"""Terminal output shared by every subcommand: one console, tables, progress bars."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/bold red] {message}")


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {message}")


def show_warnings_plainly() -> None:
    """Library warnings (for example an unsigned bundle) as one `warning:` line, like ``warn``."""
    import warnings

    warnings.showwarning = lambda message, category, *args, **kwargs: warn(str(message))


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*[str(c) for c in row])
    return t


# How a check's or verdict's status looks on the terminal (every audit uses the same words).
STATUS_STYLE = {
    "ok": "[green]ok[/green]",
    "pass": "[green]pass[/green]",
    "fail": "[bold red]FAIL[/bold red]",
    "FAIL": "[bold red]FAIL[/bold red]",
    "unverified": "[yellow]unverified[/yellow]",
}


def styled_status(status: str) -> str:
    return STATUS_STYLE.get(status, escape(status))


def checks_table(title: str, checks: Iterable[Any]) -> Table:
    """One row per audit check (objects with name, status, stated, recomputed and detail)."""
    t = Table(title=escape(title), title_justify="left")
    for column in ("check", "status", "stated", "recomputed", "detail"):
        t.add_column(column, overflow="fold")
    for c in checks:
        t.add_row(
            escape(c.name), styled_status(c.status), escape(c.stated), escape(c.recomputed), escape(c.detail)
        )
    return t


def progress() -> Progress:
    """A progress bar on stderr, so ``--json`` output on stdout stays clean."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=err_console,
        transient=False,
    )
