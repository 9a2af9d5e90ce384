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
from offsite.cli.ui import console, fail, show_warnings_plainly
from offsite.errors import OffsiteError

ROLES = (owner, serve, client, evaluate, audit, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offsite",
        description=(
            "Privacy-preserving offsite-tuning. The model owner ships an emulator and adapters "
            "(`offsite owner`), data owners fine-tune the adapters privately (`offsite client`), "
            "the owner plugs them back in (`offsite owner plug`), `offsite eval` compares the five "
            "settings and `offsite audit` checks privacy receipts. `offsite demo` runs it all."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for role in ROLES:
        role.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    show_warnings_plainly()
    try:
        return int(args.func(args) or 0)
    except OffsiteError as e:
        fail(str(e))
        return 2
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
