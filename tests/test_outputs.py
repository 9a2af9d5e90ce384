"""Outputs: one run per --out at a time, nothing a user put there is deleted, and what crashed runs
leave behind is cleaned up, never what a live run is using. Real processes throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tiny import make_tiny_checkpoint

from offsite.errors import OffsiteError
from offsite.fileio import claim_output, staged_directory
from offsite.formats.bundle import Bundle
from offsite.formats.staging import PrivateStaging, sweep_stale_staging

OFFSITE = Path(sys.executable).with_name("offsite")


def _holder(out: Path, tmp: Path, then: str = "commit") -> subprocess.Popen:
    """A process that claims ``out``, writes a file into its stage, says so, and waits for ``go``;
    then commits, or dies without cleaning up (``then="die"``)."""
    code = textwrap.dedent(
        f"""
        import os, sys, time
        from pathlib import Path
        from offsite.fileio import claim_output
        claim = claim_output({str(out)!r})
        (claim.stage / "result.txt").write_text("from the holder")
        print("claimed", flush=True)
        while not Path({str(tmp / "go")!r}).exists():
            time.sleep(0.02)
        if {then!r} == "die":
            os.kill(os.getpid(), 9)
        claim.commit()
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "claimed"
    return p


def test_a_second_claim_on_the_same_output_fails_at_once_and_the_first_wins(tmp_path):
    out = tmp_path / "out"
    holder = _holder(out, tmp_path)
    with pytest.raises(OffsiteError, match="another offsite run is writing .*out right now"):
        claim_output(out)
    (tmp_path / "go").touch()
    assert holder.wait(timeout=60) == 0
    assert (out / "result.txt").read_text() == "from the holder"
    with pytest.raises(OffsiteError, match="already exists"):
        claim_output(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "out"]  # no lock or staging left


def test_two_concurrent_prepares_one_wins_and_its_bundle_is_intact(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "m", "gpt2", layers=6)
    env = {**os.environ, "OFFSITE_OWNER_DIR": str(tmp_path / "owner")}
    cmd = [str(OFFSITE), "owner", "prepare", str(model), "--out", str(tmp_path / "b"), "--json"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(*p.communicate(timeout=300), p.returncode) for p in procs]
    results = [(rc, out, err) for out, err, rc in results]
    winners = [json.loads(out) for rc, out, _ in results if rc == 0]
    losers = [(json.loads(out), err) for rc, out, err in results if rc != 0]
    assert len(winners) == 1 and len(losers) == 1, results
    refusal, err = losers[0]  # under --json the refusal is a JSON object on stdout
    assert refusal["ok"] is False
    assert "another offsite run is writing" in refusal["error"] or "already exists" in refusal["error"]
    assert "Traceback" not in err
    assert Bundle.open(tmp_path / "b").id == winners[0]["bundle_id"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_non_empty_output_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OffsiteError, match="already exists"), staged_directory(out) as stage:
        (stage / "x").write_text("new")
    assert (out / "mine.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    (tmp_path / "file").write_text("a file")
    with pytest.raises(OffsiteError, match="already exists"):
        claim_output(tmp_path / "file")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OffsiteError, match="is a symlink"):
        claim_output(tmp_path / "link")


def test_an_empty_directory_the_user_made_is_used(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with staged_directory(out) as stage:
        (stage / "x").write_text("new")
    assert (out / "x").read_text() == "new"


def test_something_written_into_the_output_mid_run_is_kept_and_the_run_fails(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OffsiteError, match="created by something else"), staged_directory(out) as stage:
        (stage / "x").write_text("new")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_run_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), staged_directory(tmp_path / "out") as stage:
        (stage / "half").write_text("half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_crashed_runs_staging_is_cleaned_by_the_next_claim_but_a_live_one_is_not(tmp_path):
    dead = _holder(tmp_path / "dead", tmp_path / "dead-signal", then="die")
    (tmp_path / "dead-signal").mkdir()
    (tmp_path / "dead-signal" / "go").touch()
    assert dead.wait(timeout=60) == -signal.SIGKILL
    assert (tmp_path / ".dead.offsite-partial" / "result.txt").exists()
    live = _holder(tmp_path / "live", tmp_path / "live-signal")
    # Another run in the same directory sweeps the dead run's leftovers, not the live run's.
    with staged_directory(tmp_path / "other") as stage:
        (stage / "x").write_text("x")
    assert not (tmp_path / ".dead.offsite-partial").exists()
    assert not (tmp_path / ".dead.offsite-lock").exists()
    assert (tmp_path / ".live.offsite-partial" / "result.txt").exists()
    # The dead run's output name is free again, the live one is not.
    with staged_directory(tmp_path / "dead") as stage:
        (stage / "y").write_text("y")
    with pytest.raises(OffsiteError, match="another offsite run is writing"):
        claim_output(tmp_path / "live")
    (tmp_path / "live-signal").mkdir()
    (tmp_path / "live-signal" / "go").touch()
    assert live.wait(timeout=60) == 0
    assert (tmp_path / "live" / "result.txt").exists() and (tmp_path / "dead" / "y").exists()


def test_a_crashed_runs_staging_is_reused_for_the_same_output(tmp_path):
    dead = _holder(tmp_path / "out", tmp_path, then="die")
    (tmp_path / "go").touch()
    dead.wait(timeout=60)
    with staged_directory(tmp_path / "out") as stage:
        assert list(stage.iterdir()) == []  # the dead run's partial output is gone
        (stage / "z").write_text("z")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["z"]


def test_overwrite_replaces_an_existing_output(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "old").write_text("old")
    with staged_directory(out, overwrite=True) as stage:
        (stage / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_trash_a_crash_left_is_swept_and_unwritable_outputs_are_clear_errors(tmp_path):
    (tmp_path / ".cache.offsite-trash-0123abcd" / "deep").mkdir(parents=True)
    (tmp_path / ".evil.offsite-lock").symlink_to("/nonexistent")  # not ours: skipped, not fatal
    with staged_directory(tmp_path / "other") as stage:
        (stage / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".evil.offsite-lock", "other"]
    with pytest.raises(OffsiteError, match="cannot write .*: File name too long"):
        claim_output(tmp_path / ("n" * 250))


def test_private_staging_of_a_dead_process_is_swept_and_a_live_one_kept(tmp_path):
    code = "from offsite.formats.staging import PrivateStaging; import os; s = PrivateStaging('t'); print(s.path, flush=True); os.kill(os.getpid(), 9)"
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    dead = Path(p.stdout.strip())
    assert dead.is_dir() and dead.parent == tmp_path
    with PrivateStaging("live", root=tmp_path) as live:
        assert live.path.stat().st_mode & 0o777 == 0o700
        old = time.time() - 3600
        for d in (dead, live.path):
            os.utime(d, (old, old))
        assert sweep_stale_staging(tmp_path) == 1
        assert not dead.exists() and live.path.exists()
    assert not live.path.exists()
