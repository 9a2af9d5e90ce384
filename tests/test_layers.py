"""The layer contract (pyproject.toml, [tool.importlinter]) holds, and can fail.

``server/``, ``client/`` and ``protos/`` install as ``offsite.server`` / ``offsite.client`` /
``offsite.wire`` through ``package-dir``, which import-linter cannot follow, so the check runs on a
mirror of the source tree laid out as installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
SIDES_AND_FRONT_ENDS = {"client", "server", "cli"}


def _mirror(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "offsite", dest / "offsite", ignore=ignore)
    for source, name in (("client", "client"), ("server", "server"), ("protos", "wire")):
        shutil.copytree(ROOT / source, dest / "offsite" / name, ignore=ignore)
    return dest


def _lint(tree: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(exe), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_layers_are_kept(tmp_path):
    result = _lint(_mirror(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_core_module_importing_a_side_breaks_the_contract(tmp_path):
    tree = _mirror(tmp_path)
    with open(tree / "offsite" / "fileio.py", "a") as f:
        f.write("\nimport offsite.server  # noqa\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "offsite.fileio -> offsite.server" in result.stdout


def test_the_wire_package_importing_the_core_breaks_the_contract(tmp_path):
    tree = _mirror(tmp_path)
    with open(tree / "offsite" / "wire" / "transport.py", "a") as f:
        f.write("\nimport offsite.errors  # noqa\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "offsite.wire.transport -> offsite.errors" in result.stdout


def test_a_core_module_importing_the_wire_package_breaks_the_contract(tmp_path):
    tree = _mirror(tmp_path)
    with open(tree / "offsite" / "fileio.py", "a") as f:
        f.write("\nimport offsite.wire.transport  # noqa\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "offsite.fileio -> offsite.wire" in result.stdout


@pytest.mark.parametrize("contract,key", [("core", "source_modules"), ("wire", "forbidden_modules")])
def test_every_core_module_is_under_contract(contract, key):
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    listed = next(c for c in config["contracts"] if c["id"] == contract)[key]
    listed = {m.removeprefix("offsite.") for m in listed} - SIDES_AND_FRONT_ENDS
    present = {
        p.stem if p.is_file() else p.name
        for p in (ROOT / "offsite").iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert present - SIDES_AND_FRONT_ENDS == listed
