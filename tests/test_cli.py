"""The `offsite` command as a user runs it: every role, real subprocesses, JSON where machines read."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from tiny import WORDS, make_dp_setup, make_tiny_checkpoint, write_lm_records


def run(*args, env, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "offsite.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"offsite {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e.update(
        OFFSITE_CLIENT_DIR=str(tmp_path / "client"), OFFSITE_OWNER_DIR=str(tmp_path / "owner"), COLUMNS="200"
    )
    return e


class Ran:
    """What a command printed and returned, as from a subprocess."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout = returncode, stdout
        self.stderr = " ".join(stderr.split())  # however the terminal wrapped it


@pytest.fixture
def in_process(tmp_path, capsys, monkeypatch):
    """Run `offsite` in this process (the flow below runs a dozen commands; a subprocess each would load
    torch a dozen times). test_help_for_every_role runs the installed entry point in subprocesses."""
    from offsite.cli.main import main

    monkeypatch.setenv("OFFSITE_CLIENT_DIR", str(tmp_path / "client"))
    monkeypatch.setenv("OFFSITE_OWNER_DIR", str(tmp_path / "owner"))

    def run(*args, check: bool = True) -> Ran:
        capsys.readouterr()
        code = main([str(a) for a in args])
        ran = Ran(code, *capsys.readouterr())
        if check and code != 0:
            raise AssertionError(f"offsite {' '.join(map(str, args))} failed ({code}):\n{ran.stderr}")
        return ran

    return run


def test_help_for_every_role(env):
    for args in (
        ["--help"],
        ["owner", "prepare", "--help"],
        ["owner", "plug", "--help"],
        ["client", "train", "--help"],
        ["client", "keys", "init", "--help"],
        ["client", "budget", "--help"],
        ["eval", "--help"],
        ["audit", "receipt", "--help"],
        ["demo", "--help"],
    ):
        assert run(*args, env=env).stdout.strip()
    assert "--epsilon" in run("client", "train", "--help", env=env).stdout


def test_whole_flow_from_the_command_line(tmp_path, in_process):
    run = in_process
    model = make_tiny_checkpoint(tmp_path / "model", "gpt2", layers=6)
    rng = random.Random(0)
    public = tmp_path / "public.txt"
    public.write_text("".join(" ".join(rng.choices(WORDS, k=8)) + "\n" for _ in range(40)))
    train = write_lm_records(tmp_path / "train.jsonl", 80, seed=1)
    task = tmp_path / "task.jsonl"
    task.write_text(
        "".join(
            json.dumps(
                {"question": " ".join(rng.choices(WORDS, k=4)), "choices": ["red", "blue"], "answer": i % 2}
            )
            + "\n"
            for i in range(10)
        )
    )

    keys = json.loads(run("client", "keys", "init", "--json").stdout)
    prep = json.loads(
        run(
            "owner",
            "prepare",
            model,
            "--out",
            tmp_path / "bundle",
            "--lora-rank",
            "4",
            "--distill-data",
            public,
            "--distill-steps",
            "4",
            "--frozen-dtype",
            "bf16",  # the teacher and the student's frozen parts; the distilled blocks train in fp32
            "--json",
        ).stdout
    )
    assert prep["layer_map"] == [0, 1, 2, 4, 5] and prep["distillation"]["steps"] == 4

    trained = run(
        "client",
        "train",
        tmp_path / "bundle",
        "--data",
        train,
        "--out",
        tmp_path / "adapter",
        "--dataset-id",
        "clinic-1",
        "--epsilon",
        "6",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--json",
    )
    out = json.loads(trained.stdout)
    assert "chosen by --device auto" in trained.stderr  # and which device it chose
    assert (
        out["epsilon"]["cumulative"]["prv_upper"] <= 6 and out["plan"]["steps"] == 8
    )  # 72 records: bucket 128, q = 16/128, ⌈1 / q⌉ steps
    assert (tmp_path / "adapter" / "receipt.sig").is_file()
    budget = json.loads(run("client", "budget", "--delta", out["delta"], "--json").stdout)
    assert [d["dataset_id"] for d in budget["datasets"]] == ["clinic-1"]
    assert (
        abs(budget["datasets"][0]["epsilon"]["prv_upper"] - out["epsilon"]["cumulative"]["prv_upper"]) < 1e-6
    )

    pub = keys["public_key"]  # the data owner hands this file to its auditor
    audit = json.loads(
        run(
            "audit",
            "receipt",
            tmp_path / "adapter" / "receipt.json",
            "--adapter",
            tmp_path / "adapter",
            "--pubkey",
            pub,
            "--json",
        ).stdout
    )
    assert audit["ok"] is True

    plug = json.loads(
        run("owner", "plug", model, tmp_path / "adapter", "--out", tmp_path / "merged", "--json").stdout
    )
    assert plug["kind"] == "lora" and plug["layers"] == [0, 1, 4, 5]

    report = json.loads(
        run(
            "eval",
            "--task",
            task,
            "--type",
            "mc",
            "--model",
            model,
            "--bundle",
            tmp_path / "bundle",
            "--adapter",
            tmp_path / "adapter",
            "--merged",
            tmp_path / "merged",
            "--json",
        ).stdout
    )
    settings = report["settings"]
    assert settings["full fine-tuned"] is None
    assert all(
        0 <= settings[s]["acc"] <= 1
        for s in ("full zero-shot", "emulator zero-shot", "emulator fine-tuned", "plug-in")
    )

    # A total budget below what the dataset already spent is refused: clear message, exit code 2.
    again = run(
        "client",
        "train",
        tmp_path / "bundle",
        "--data",
        train,
        "--out",
        tmp_path / "adapter2",
        "--dataset-id",
        "clinic-1",
        "--epsilon",
        "5",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        check=False,
    )
    assert again.returncode == 2 and "already spent" in again.stderr and "Traceback" not in again.stderr
    assert not (tmp_path / "adapter2").exists()

    # --no-dp must be asked for, and says so loudly.
    nodp = run(
        "client",
        "train",
        tmp_path / "bundle",
        "--data",
        train,
        "--out",
        tmp_path / "adapter3",
        "--no-dp",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--frozen-dtype",
        "bf16",
        "--gradient-checkpointing",
    )
    assert (
        "DIFFERENTIAL PRIVACY IS OFF" in nodp.stderr and not (tmp_path / "adapter3" / "receipt.json").exists()
    )
    placed = " ".join(nodp.stderr.split())
    assert (
        "device cpu" in placed and "frozen parts in bfloat16" in placed and "gradient checkpointing" in placed
    )
    refused = run("client", "train", tmp_path / "bundle", "--data", train, "--out", tmp_path / "a4", "--no-dp",
                  "--device", "cpu", "--frozen-dtype", "fp16", check=False)  # fmt: skip
    assert (
        refused.returncode == 2 and "refused on the CPU" in refused.stderr and not (tmp_path / "a4").exists()
    )


def test_every_option_of_every_command_has_a_help_text():
    import argparse

    from offsite.cli.main import build_parser

    def actions(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    yield from actions(sub, [*path, name])
            elif not isinstance(a, argparse._HelpAction):
                yield " ".join(path), a.option_strings[0] if a.option_strings else a.dest, a.help

    seen = list(actions(build_parser(), ["offsite"]))
    assert ("offsite owner finetune-full", "--lr", "AdamW learning rate (default 1e-4)") in seen
    missing = [(cmd, opt) for cmd, opt, text in seen if not (text and text.strip())]
    assert missing == []


def test_under_json_every_refusal_is_one_json_object_on_stdout(capsys, tmp_path):
    from offsite.cli.main import main

    # A usage error (argparse) and a refusal from the library (an OffsiteError), with and without --json.
    cases = [
        (["eval", "--task", str(tmp_path / "none.jsonl"), "--type", "nope"], "UsageError", "invalid choice"),
        (["eval", "--task", str(tmp_path / "none.jsonl"), "--type", "lm"], "DataError", "no such file"),
    ]
    for argv, kind, words in cases:
        assert main([*argv, "--json"]) == 2
        out, err = capsys.readouterr()
        report = json.loads(out)
        assert report["ok"] is False and report["error_type"] == kind and words in report["error"]
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and words in " ".join(err.split())  # however the terminal wraps it


def test_keys_dir_is_the_one_directory_of_a_data_owners_state(tmp_path, in_process):
    # --keys-dir on train, budget, set-budget and keys: keys, budget histories and all, in that directory;
    # nothing under $OFFSITE_CLIENT_DIR.
    root = make_dp_setup(tmp_path / "setup")
    mine = tmp_path / "elsewhere"
    in_process("client", "keys", "init", "--keys-dir", mine)
    in_process("client", "train", root / "bundle", "--data", root / "train.jsonl", "--out", tmp_path / "a",
               "--dataset-id", "d1", "--epsilon", "4", "--epochs", "1", "--keys-dir", mine)  # fmt: skip
    shown = json.loads(in_process("client", "budget", "--keys-dir", mine, "--json").stdout)
    assert [d["dataset_id"] for d in shown["datasets"]] == ["d1"]
    in_process("client", "set-budget", "d1", "--epsilon", "5", "--delta", shown["datasets"][0]["budget"]["delta"],
               "--keys-dir", mine)  # fmt: skip
    shown = json.loads(in_process("client", "budget", "--keys-dir", mine, "--json").stdout)
    assert shown["datasets"][0]["budget"]["epsilon"] == 5
    keys = json.loads(in_process("client", "keys", "show", "--keys-dir", mine, "--json").stdout)
    assert keys["public_key"].startswith(str(mine))
    assert not (tmp_path / "client").exists()  # $OFFSITE_CLIENT_DIR of this test
    assert json.loads(in_process("client", "budget", "--json").stdout)["datasets"] == []
