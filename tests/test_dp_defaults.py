"""DP defaults: a pure rule of (size bucket, ε, δ, adapter kind), used by `client train` when flags are absent."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import WORDS, make_tiny_checkpoint

from offsite import crypto
from offsite.errors import DataError
from offsite.models.adapters import BLOCKS, LORA
from offsite.prepare import PrepareOptions, prepare
from offsite.privacy.accounting import calibrate_noise
from offsite.training.dp import size_bucket
from offsite.training.dp_defaults import (
    DEFAULTED,
    NOISY_STEP,
    DPDefaults,
    defaults_table,
    dp_defaults,
)
from offsite.tune import TuneOptions, tune

DOCS = Path(__file__).parent.parent / "docs" / "privacy.md"


def test_size_bucket_is_the_power_of_two_at_or_above_n():
    assert [size_bucket(n) for n in (1, 2, 3, 4, 5, 480, 512, 513, 2880, 4096)] == [
        1,
        2,
        4,
        4,
        8,
        512,
        512,
        1024,
        4096,
        4096,
    ]
    with pytest.raises(DataError):
        size_bucket(0)


def test_the_rule_is_a_pure_function_of_its_inputs_and_checks_them():
    assert dp_defaults(512, 8.0, 1e-4, BLOCKS) == dp_defaults(512, 8.0, 1e-4, BLOCKS)
    for bad in (0, 3, 480, -4):
        with pytest.raises(ValueError, match="power of two"):
            dp_defaults(bad, 8.0, 1e-4, BLOCKS)
    with pytest.raises(ValueError, match="adapter kind"):
        dp_defaults(512, 8.0, 1e-4, "prefix")


@pytest.mark.parametrize("kind", [BLOCKS, LORA])
def test_every_dataset_in_a_bucket_can_run_the_plan(kind):
    for exp in range(0, 25):
        bucket = 1 << exp
        # ε does not change batch, epochs or lr (only σ and the warning): None skips the accountant.
        d = dp_defaults(bucket, None, 1e-5, kind)
        # A bucket holds N in (bucket/2, bucket]: a batch of at most bucket/2 (or the one record of
        # bucket 1) always fits, as the plan requires.
        assert 1 <= d.batch_size <= max(1, bucket // 2)
        assert d.epochs >= 1 and d.lr > 0
        assert d.steps == math.ceil(d.epochs * bucket / d.batch_size)
        assert d.noise_multiplier is None and d.warning is None


def test_small_data_gets_larger_relative_batches_and_more_epochs():
    """Li et al. 2022 and Mehta et al. 2022: large batches relative to the data; small data needs more
    passes to take enough steps."""
    buckets = [1 << e for e in range(6, 18)]
    rules = [dp_defaults(b, None, 1e-5, BLOCKS) for b in buckets]
    fractions = [d.batch_size / d.bucket for d in rules]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] > fractions[-1]
    epochs = [d.epochs for d in rules]
    assert epochs == sorted(epochs, reverse=True) and epochs[0] > epochs[-1]
    assert all(d.batch_size <= b // 2 for d, b in zip(rules, buckets, strict=True))


def test_without_epsilon_the_rule_still_chooses_and_says_so():
    # --noise-multiplier without --epsilon: the same batch, epochs and lr; no σ of its own, no warning.
    d = dp_defaults(512, None, 1e-4, LORA)
    assert (d.batch_size, d.epochs, d.lr) == (128, 16, 3e-3)
    assert d.summary() == (
        "DP defaults for a dataset of at most 512 records at a given σ, δ=0.0001 (lora adapter): "
        "batch 128, 16 epochs, lr 0.003"
    )


def test_warns_when_the_data_is_too_small_for_the_budget():
    big = dp_defaults(4096, 8.0, 1e-5, BLOCKS)
    assert big.warning is None and big.noise_multiplier / big.batch_size <= NOISY_STEP
    assert dp_defaults(512, 8.0, 1e-4, BLOCKS).warning is None
    small = dp_defaults(64, 1.0, 1e-3, BLOCKS)
    assert small.noise_multiplier / small.batch_size > NOISY_STEP
    assert small.warning and "at most 64 records" in small.warning and "ε=1" in small.warning
    # The same data buys less with a smaller budget.
    assert dp_defaults(512, 0.25, 1e-4, BLOCKS).warning
    # σ is the accountant's for the plan the rule implies: q = batch/bucket, its steps, ε at δ.
    assert big.noise_multiplier == calibrate_noise([], big.batch_size / 4096, big.steps, 8.0, 1e-5)


def test_the_table_in_docs_is_what_the_rule_gives():
    """docs/privacy.md shows the rule's output; it must be regenerated when the rule changes."""
    assert defaults_table() in DOCS.read_text(encoding="utf-8")


# -- the hook in tune / client train -----------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpdef")
    src = make_tiny_checkpoint(root / "model", "llama", layers=6)
    prepare(src, root / "bundle", PrepareOptions())
    rng = random.Random(0)

    def data(n: int) -> Path:
        path = root / f"train-{n}.jsonl"
        path.write_text(
            "".join(
                json.dumps(
                    {
                        "prompt": " ".join(rng.choices(WORDS, k=4)),
                        "completion": " " + " ".join(rng.choices(WORDS, k=2)),
                    }
                )
                + "\n"
                for _ in range(n)
            )
        )
        return path

    crypto.init_client_keys(root / "keys")
    return root, src, data


def test_tune_fills_in_only_what_was_not_given_from_the_bucket(setup, tmp_path):
    root, _, data = setup
    seen: list[DPDefaults] = []
    opts = TuneOptions(
        epochs=1,
        eval_fraction=0.0,
        dataset_id="ds",
        epsilon=8.0,
        keys_dir=root / "keys",
        budget_dir=tmp_path / "budget",
        dp_defaults_for=("batch_size", "lr"),  # --epochs 1 was given
    )
    result = tune(root / "bundle", data(40), tmp_path / "a", opts, on_defaults=seen.append)
    (d,) = seen
    # 40 records: bucket 64; δ defaults as the plan's default for the bucket.
    assert d == dp_defaults(64, 8.0, 1e-3, BLOCKS)
    hyper = json.loads((tmp_path / "a" / "adapter.json").read_text())["hyperparameters"]
    assert (hyper["batch_size"], hyper["lr"], hyper["epochs"]) == (d.batch_size, d.lr, 1)
    assert result.plan.nominal_batch == d.batch_size
    # Another size in the same bucket gets the same defaults: the rule never sees N.
    seen.clear()
    opts.budget_dir = tmp_path / "budget2"
    tune(root / "bundle", data(60), tmp_path / "b", opts, on_defaults=seen.append)
    assert seen == [d]


def test_without_dp_the_defaults_are_not_used(setup, tmp_path):
    root, _, data = setup
    seen = []
    opts = TuneOptions(eval_fraction=0.0, dp=False, dp_defaults_for=DEFAULTED)
    tune(root / "bundle", data(20), tmp_path / "a", opts, on_defaults=seen.append)
    hyper = json.loads((tmp_path / "a" / "adapter.json").read_text())["hyperparameters"]
    assert seen == [] and (hyper["epochs"], hyper["lr"], hyper["batch_size"]) == (3, 1e-3, 16)


def _cli(*args, env):
    proc = subprocess.run(
        [sys.executable, "-m", "offsite.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_client_train_prints_the_chosen_defaults_and_flags_win(setup, tmp_path):
    root, _, data = setup
    env = dict(os.environ, OFFSITE_CLIENT_DIR=str(tmp_path / "client"), COLUMNS="200")
    _cli("client", "keys", "init", env=env)
    train = data(40)
    proc = _cli(
        "client",
        "train",
        root / "bundle",
        "--data",
        train,
        "--out",
        tmp_path / "a",
        "--dataset-id",
        "d1",
        "--epsilon",
        "1",
        "--eval-fraction",
        "0",
        "--epochs",
        "2",
        "--json",
        env=env,
    )
    out = json.loads(proc.stdout)
    said = " ".join(proc.stderr.split())  # the terminal may wrap lines
    rule = dp_defaults(64, 1.0, 1e-3, BLOCKS)
    assert out["dp_defaults"] == rule.to_json()
    assert re.search(rf"DP defaults .*batch {rule.batch_size}, {rule.epochs} epochs, lr {rule.lr:g}", said)
    assert "used for --lr, --batch-size (flags you give win)" in said
    hyper = json.loads((tmp_path / "a" / "adapter.json").read_text())["hyperparameters"]
    assert (hyper["epochs"], hyper["batch_size"], hyper["lr"]) == (2, rule.batch_size, rule.lr)
    assert out["plan"]["nominal_batch"] == rule.batch_size
    assert rule.warning and f"warning: {rule.warning}" in said
