"""The declared public API: small, resolvable, and cheap to import (no torch until it is used)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = ["offsite", "offsite.formats", "offsite.models", "offsite.training", "offsite.privacy",
            "offsite.evaluation", "offsite.cli", "offsite.demo"]  # fmt: skip


def test_importing_offsite_and_its_packages_does_not_load_torch():
    code = (
        "import sys\n"
        f"for name in {PACKAGES!r}:\n"
        "    __import__(name)\n"
        "import offsite.formats.schema\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'opacus', 'peft', 'safetensors') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_the_command_line_builds_its_parser_without_torch():
    # `offsite --help` and every usage error answer at once: the commands load torch, transformers,
    # scipy and grpc only when they run.
    code = (
        "import sys\n"
        "from offsite.cli.main import build_parser\n"
        "build_parser()\n"
        "heavy = ('torch', 'transformers', 'opacus', 'peft', 'safetensors', 'scipy', 'grpc')\n"
        "print(','.join(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_the_check_above_can_fail():
    code = "import sys, offsite; offsite.Bundle; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_declared_name_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__, f"{package} declares no public API"
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
        assert name in dir(module)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018
