"""The ``offsite`` command: one entry point, subcommands by role.

Each role lives in its own module exposing ``register(subparsers)``; a subcommand sets
``func`` (taking the parsed ``args``) with ``parser.set_defaults(func=...)``.
"""

from __future__ import annotations

import argparse
import os
import sys

# Library chatter (load reports, per-file progress bars) would drown the command's own output.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# On a shared 2-core machine, spinning OpenMP workers make each step many times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from offsite.cli import audit, client, demo, evaluate, owner, serve
from offsite.cli.ui import console, fail, print_json, show_warnings_plainly
from offsite.errors import OffsiteError

ROLES = (owner, serve, client, evaluate, audit, demo)

#: Exit status of a refused command (an ``OffsiteError`` or a usage error), as argparse uses for usage.
EXIT_REFUSED = 2


class UsageError(Exception):
    """A command line argparse refused (raised instead of exiting, so ``main`` can report it)."""

    def __init__(self, message: str, usage: str):
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message}", self.format_usage())


def error_json(message: str, kind: str) -> dict:
    """How every command reports a refusal under ``--json`` (commands with richer reports add keys)."""
    return {"ok": False, "error": message, "error_type": kind}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="offsite",
        description=(
            "Privacy-preserving offsite-tuning. The model owner ships an emulator and adapters "
            "(`offsite owner`), data owners fine-tune the adapters privately (`offsite client`), "
            "the owner plugs them back in (`offsite owner plug`), `offsite eval` compares the five "
            "settings and `offsite audit` checks privacy receipts. `offsite demo` runs it all."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for role in ROLES:
        role.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:  # under --json a machine reads even this as one JSON object on stdout
        if "--json" in argv:
            print_json(error_json(str(e), "UsageError"))
        else:
            sys.stderr.write(f"{e.usage}{e}\n")
        return EXIT_REFUSED
    import transformers

    transformers.utils.logging.disable_progress_bar()
    show_warnings_plainly()
    try:
        return int(args.func(args) or 0)
    except OffsiteError as e:
        if getattr(args, "json", False):
            print_json(error_json(str(e), type(e).__name__))
        else:
            fail(str(e))
        return EXIT_REFUSED
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
