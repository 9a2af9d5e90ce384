"""The demo's reference rows: deterministic, so caching them by content returns what training would."""

from __future__ import annotations

import json

import torch
from tiny import make_tiny_checkpoint

from offsite import device
from offsite.demo.reference import ROWS, _read_cached, cache_key, reference_rows
from offsite.demo.settings import EMULATOR_NODP, FULL_FT, PLUGIN_NODP, Reference
from offsite.device import Placement
from offsite.prepare import PrepareOptions, prepare

REFS = {
    FULL_FT: Reference(lr=1e-4, epochs=1, batch_size=8),
    EMULATOR_NODP: Reference(lr=1e-3, epochs=2, batch_size=8),
    PLUGIN_NODP: Reference(lr=1e-3, epochs=1, batch_size=8),
}


def test_reference_rows_are_reused_only_for_identical_inputs(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "m", "llama", layers=6)
    prepare(src, tmp_path / "bundle", PrepareOptions())
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"prompt": "the cat", "completion": " sat"}) + "\n" for _ in range(16))
    )
    evals = tmp_path / "eval.jsonl"
    evals.write_text(
        "".join(
            json.dumps({"question": "the cat", "choices": ["sat", "dog"], "answer": i % 2}) + "\n"
            for i in range(4)
        )
    )
    cache = tmp_path / "cache"

    def rows(work: str, refresh: bool = False, refs=REFS, data=train):
        (tmp_path / work).mkdir()
        return reference_rows(src, tmp_path / "bundle", data, evals, 0, tmp_path / work, cache, refresh, refs)

    first, cached = rows("w1")
    assert not cached and set(first) == set(ROWS)
    # The emulator and plug-in rows have different settings here: two adapters, each row its own.
    assert (tmp_path / "w1" / "adapter-nodp").is_dir() and (tmp_path / "w1" / "adapter-nodp-1").is_dir()
    assert (
        first[EMULATOR_NODP].hyperparameters["epochs"] == 2
        and first[PLUGIN_NODP].hyperparameters["epochs"] == 1
    )
    assert first[FULL_FT].hyperparameters["lr"] == 1e-4 and first[PLUGIN_NODP].hyperparameters["dp"] is False

    again, cached = rows("w2")
    assert cached and not any((tmp_path / "w2").iterdir())  # nothing trained
    assert {k: (r.metrics, r.hyperparameters) for k, r in again.items()} == {
        k: (r.metrics, r.hyperparameters) for k, r in first.items()
    }
    # Training again gives the same numbers: what makes the cache honest.
    fresh, cached = rows("w3", refresh=True)
    assert not cached and {k: r.metrics for k, r in fresh.items()} == {k: r.metrics for k, r in first.items()}

    # Any changed input is another key: other settings, other data, another seed.
    key = cache_key(src, tmp_path / "bundle", train, evals, 0, REFS)
    assert [entry.stem for entry in cache.iterdir()] == [key]
    other = tmp_path / "train2.jsonl"
    other.write_text(train.read_text().replace("sat", "dog"))
    changed = [
        cache_key(src, tmp_path / "bundle", train, evals, 0, {**REFS, FULL_FT: Reference(3e-4, 1, 8)}),
        cache_key(src, tmp_path / "bundle", other, evals, 0, REFS),
        cache_key(src, tmp_path / "bundle", train, evals, 1, REFS),
    ]
    with device.use(Placement(frozen_dtype=torch.bfloat16)):  # another precision (or --device)
        changed.append(cache_key(src, tmp_path / "bundle", train, evals, 0, REFS))
    assert key not in changed and len(set(changed)) == 4

    # A damaged cache entry is not trusted (it is recomputed).
    (cache / f"{key}.json").write_text("{}")
    assert _read_cached(cache / f"{key}.json") is None


def test_the_demo_checks_can_fail():
    from offsite.cli.demo_run import _checks

    def passed(zs, emu_ft, plug, full_ft):
        return [ok for _, ok, _ in _checks(zs, emu_ft, plug, full_ft)]

    assert passed(47.4, 78.0, 96.9, 99.3) == [True, True, True]
    # Against a tuned full fine-tuning row a plug-in that gains 63% of its gain fails the third check.
    assert passed(47.4, 78.0, 80.0, 99.3) == [True, True, False]
    assert passed(47.4, 95.5, 96.9, 99.3) == [True, False, True]  # the emulator alone nearly as good
    assert passed(47.4, 40.0, 50.0, 99.3) == [False, True, False]
