"""The options that say where a command's models run (``--device``, ``--frozen-dtype``,
``--gradient-checkpointing``), and the shard size of the checkpoints it writes (``--max-shard-size``).

Each command that runs a model adds them with ``add_placement_arguments`` and runs its work inside
``placement_from(args)``, which resolves them (``offsite.device.Placement``), says on stderr which
device it chose and makes the placement current for the library calls inside.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Iterator

from offsite.cli.ui import err_console

#: The keys of offsite.device.FROZEN_DTYPES, spelled out so that --help needs no torch (a test keeps them equal).
FROZEN_DTYPES = ("fp32", "bf16", "fp16")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i)?)?b?\s*$", re.IGNORECASE)


def add_placement_arguments(
    p: argparse.ArgumentParser, *, frozen: str | None = None, checkpointing: bool = False
) -> None:
    """``--device`` always; ``--frozen-dtype`` when ``frozen`` says what the frozen parts are here;
    ``--gradient-checkpointing`` for commands that train an emulator."""
    g = p.add_argument_group("where the model runs")
    g.add_argument(
        "--device",
        default="auto",
        help="auto (default: a CUDA GPU if there is one, else Apple's MPS, else the CPU; the choice is "
        "printed), cpu, cuda, cuda:N or mps",
    )
    if frozen:
        g.add_argument(
            "--frozen-dtype",
            choices=FROZEN_DTYPES,
            default="fp32",
            help=f"precision of the frozen parts ({frozen}); whatever trains, the optimizer state, "
            "per-sample norms, clipping and noise stay fp32 (default fp32). bf16 runs on CUDA GPUs "
            "with bf16 support, MPS and the CPU; fp16 on CUDA and MPS (refused on the CPU: slower than "
            "fp32 there, and its range can overflow)",
        )
    if checkpointing:
        g.add_argument(
            "--gradient-checkpointing",
            action="store_true",
            help="recompute the frozen middle blocks' activations in the backward pass instead of "
            "keeping them: less memory, about one more forward pass of the middle per step",
        )


def add_shard_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-shard-size",
        type=parse_size,
        default="2GB",
        help="largest weight file written (default 2GB; e.g. 500MB, 10GiB): larger checkpoints are "
        "split into shards listed in model.safetensors.index.json",
    )


def parse_size(text: str) -> int:
    """``2GB`` -> 2·10⁹ bytes, ``10GiB`` -> 10·2³⁰ bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB, 10GiB)")
    power = " kmgt".index(m.group(2).lower()) if m.group(2) else 0
    size = int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)
    if size < 1:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return size


@contextlib.contextmanager
def placement_from(args: argparse.Namespace) -> Iterator[object]:
    """Resolve the command's placement options, say what was chosen, and make it current."""
    from offsite import device

    placement = device.Placement.resolve(
        args.device, getattr(args, "frozen_dtype", "fp32"), getattr(args, "gradient_checkpointing", False)
    )
    err_console.print(placement.describe())
    with device.use(placement):
        yield placement
