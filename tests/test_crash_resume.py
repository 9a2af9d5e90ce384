"""A DP run killed at any write resumes under the reservation it made, with applied steps = recorded steps.

The run: a tiny LLaMA emulator with a LoRA adapter, 16 records, 2 DP steps, a checkpoint after every
step, through ``offsite.tune.tune`` as `offsite client train` runs it. A dry run lists its write points
(``crash.py``). Then, for each point k, a fresh copy of the data owner's state runs the same command in a
real child process that SIGKILLs itself just before write k; the disk is checked; and the same command
is run again, to completion. Kill points before an fsync are skipped: a killed process leaves the disk
exactly as a kill before the next write would (fsync matters for power loss, which a kill cannot show).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load as load_tensors
from tiny import WORDS, make_tiny_checkpoint

from offsite import crypto
from offsite.prepare import PrepareOptions, prepare
from offsite.privacy.receipt import verify_receipt

STATE, OUT, HISTORY = "work/.adapter.train-state", "work/adapter", "client/budgets/ds.json"
ADAPTER_FILES = {"adapter.json", "adapter.safetensors", "receipt.json", "receipt.sig"}


class ForkServer:
    def __init__(self, log: Path):
        self._log = open(log, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "crash_server.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    def run(self, request: dict) -> int:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died; see {self._log.name}")
        return json.loads(line)["exit"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self._log.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    src = make_tiny_checkpoint(root / "model", "llama", layers=4)
    prepare(src, root / "bundle", PrepareOptions(adapter_bottom=1, adapter_top=1, lora_rank=2))
    rng = random.Random(1)
    records = [
        {"prompt": " ".join(rng.choices(WORDS, k=3)), "completion": rng.choice(WORDS)} for _ in range(16)
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    crypto.init_client_keys(root / "template" / "client")
    server = ForkServer(root / "server.log")
    yield root, server
    server.close()


def _run(
    setup, world: Path, kill_at: int | None, tag: str, warm: bool = False
) -> tuple[int, dict | None, list[str]]:
    root, server = setup
    request = {
        "warm": warm,
        "root": str(world),
        "kill_at": kill_at,
        "log": str(root / f"{tag}.points"),
        "result": str(root / f"{tag}.json"),
        "bundle": str(root / "bundle"),
        "data": str(root / "train.jsonl"),
        "out": str(world / OUT),
        "options": {
            "epochs": 1,
            "batch_size": 8,
            "lr": 1e-2,
            "eval_fraction": 0.0,
            "dataset_id": "ds",
            "epsilon": 50.0,
            "noise_multiplier": 1.0,
            "checkpoint_every": 1,
            "keys_dir": str(world / "client"),
            "budget_dir": str(world / "client"),
        },
    }
    code = server.run(request)
    result = root / f"{tag}.json"
    points = (root / f"{tag}.points").read_text().splitlines() if (root / f"{tag}.points").exists() else []
    return code, (json.loads(result.read_text()) if result.exists() else None), points


def _fresh_world(setup, name: str) -> Path:
    world = setup[0] / name
    shutil.copytree(setup[0] / "template", world)
    return world


def _committed_state(world: Path) -> tuple[str, int] | None:
    """(run id, step) of the committed training state, after checking on disk, independently of the
    code under test, that the optimizer steps applied to the stored tensors equal the recorded step."""
    pointer_path = world / STATE / "state.json"
    if not pointer_path.is_file():
        return None
    pointer = json.loads(pointer_path.read_text())
    data = (world / STATE / pointer["tensors"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == pointer["tensors_sha256"]
    tensors = load_tensors(data)
    step = pointer["meta"]["step"]
    applied = {int(t.item()) for name, t in tensors.items() if name.startswith("opt.step.")}
    assert applied == ({step} if step else set()), (
        f"state records step {step}, tensors have {applied} applied"
    )
    return pointer["meta"]["identity"]["run_id"], step


def _entries(world: Path) -> list[dict]:
    path = world / HISTORY
    return json.loads(path.read_text())["entries"] if path.exists() else []


def _published(world: Path) -> bool:
    out = world / OUT
    if not out.exists():
        return False
    assert {p.name for p in out.iterdir()} == ADAPTER_FILES  # all or nothing
    return True


def _check_finished(world: Path, result: dict, resumed: tuple[str, int] | None, where: str) -> None:
    assert result["ok"], f"{where}: {result.get('error')}"
    steps = result["steps"]
    if resumed is not None:
        assert (result["run_id"], result["resumed_from"]) == resumed, where
    # Every state this run restored and saved had exactly its recorded steps applied, and it ended
    # with all planned steps applied (a run resumed at its last step saves nothing more).
    assert all(s == a for s, a in result["loads"] + result["saves"]), f"{where}: {result}"
    last = (result["saves"] or result["loads"])[-1][0]
    assert last == steps, f"{where}: ended at step {last} of {steps}"
    # One reservation for the run, covering all its steps; the receipt composes exactly it.
    entries = _entries(world)
    assert [(e["run_id"], e["steps"]) for e in entries] == [(result["run_id"], steps)], where
    assert [e["run_id"] for e in result["receipt"]["cumulative_history"]] == [result["run_id"]], where
    public = crypto.load_public_key(crypto.KeyPaths.in_dir(world / "client").public_key)
    assert verify_receipt(world / OUT, public_key=public).ok, where
    assert not (world / STATE).exists(), where


def test_killed_at_every_write_resumes_with_applied_steps_equal_to_recorded(setup):
    assert _run(setup, _fresh_world(setup, "warm"), None, "warm", warm=True)[0] == 0
    dry = _fresh_world(setup, "dry")
    code, result, points = _run(setup, dry, None, "dry")
    assert code == 0 and result["ok"], result
    _check_finished(dry, result, None, "uninterrupted run")
    assert result["loads"] == [[0, 0]] and [s for s, _ in result["saves"]] == [0, 1, 2]
    # The write points include the reservation, every checkpoint, the adapter and the clean-up.
    for expected in ("budgets/ds.json", "budgets/ds.records", "state.json", "receipt.sig", "rmtree"):
        assert any(expected in p for p in points), expected
    # Points that cannot change what a later process sees are not kill points of their own: an fsync
    # (see above) and a mkdir that fails (the directory exists, or its parent does not yet).
    kill_points = [k for k, p in enumerate(points, 1) if " fsync " not in p and "(no-op)" not in p]
    assert len(kill_points) >= 25

    for k in kill_points:
        where = f"killed before write {points[k - 1]}"
        world = _fresh_world(setup, f"k{k}")
        code, _, _ = _run(setup, world, k, f"k{k}")
        assert code == -9, where
        # On disk: a committed state is consistent; a reservation always has a state to resume
        # under, or the adapter it paid for is published.
        committed = _committed_state(world)
        entries = _entries(world)
        published = _published(world)
        assert len(entries) <= 1, where
        if entries:
            assert committed is not None or published, f"{where}: a reservation with nothing to resume"
            if committed is not None:
                assert entries[0]["run_id"] == committed[0], where
        # The same command again.
        code, result, _ = _run(setup, world, None, f"r{k}")
        assert code == 0, where
        if published:  # the run had finished: its leftover state is cleared, the output kept
            assert not result["ok"] and "already exists" in result["error"], where
            assert not (world / STATE).exists() and len(_entries(world)) == 1, where
        else:
            _check_finished(world, result, committed, where)
