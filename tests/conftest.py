import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# As `offsite` itself does (offsite/cli/main.py): OpenMP threads that spin while they wait make each
# training step many times slower on a machine whose cores are busy with other work. It must be set
# before torch loads its OpenMP runtime; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory, monkeypatch):
    """Owner and client state directories never touch the real user's home."""
    root = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("OFFSITE_OWNER_DIR", str(root / "owner"))
    monkeypatch.setenv("OFFSITE_CLIENT_DIR", str(root / "client"))


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """An owner with its PKI and published jobs, enrolled data owners, a DP adapter (tests/world.py)."""
    from world import build_world

    return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="session")
def made(tmp_path_factory):
    """A real tiny model, its bundle and an untrained adapter (tests/hostile.py), built once; copy
    before spoiling."""
    from hostile import build_bundle_and_adapter

    return build_bundle_and_adapter(tmp_path_factory.mktemp("made"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where there is a CUDA device; elsewhere they are skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
