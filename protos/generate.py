"""Regenerate ``offsite.wire.v1`` from ``protos/offsite/v1/offsite.proto``: ``python -m offsite.wire.generate``.

The proto is compiled under the virtual path ``offsite/wire/v1/offsite.proto`` so that the generated
modules import each other as ``offsite.wire.v1`` (where they are installed) while the proto package
stays ``offsite.v1``. The output depends only on the proto and the pinned ``grpcio-tools`` version
(``pyproject.toml``), so ``tests/test_wire.py`` can regenerate into a temporary directory and compare.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTO_DIR = ROOT / "offsite" / "v1"
PROTO_NAME = "offsite.proto"
VIRTUAL_DIR = "offsite/wire/v1"
OUT_DIR = ROOT / "v1"
GENERATED = ("offsite_pb2.py", "offsite_pb2.pyi", "offsite_pb2_grpc.py")


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Compile the proto; write the generated files into ``out_dir``; return their paths."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{VIRTUAL_DIR}={PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"{VIRTUAL_DIR}/{PROTO_NAME}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_DIR / PROTO_NAME}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            shutil.copyfile(Path(tmp) / VIRTUAL_DIR / name, out_dir / name)
            written.append(out_dir / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output directory (default {OUT_DIR})")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
