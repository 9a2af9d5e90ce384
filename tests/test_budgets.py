"""Budgets fixed per dataset as a pair (ε, δ), explicit changes, version 1 histories, and the same records
under another dataset id: keyed record hashes, --inherit and --new-budget."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from offsite.data import LM, MC, read_records
from offsite.errors import BudgetError, FormatError, OffsiteError
from offsite.privacy import history, records, reservation
from offsite.privacy.accounting import epsilon_prv, make_entry

DELTA = 1e-5


def _fixed(entry, delta=DELTA):
    """A plan that does not calibrate: it proposes ``entry`` at ``delta`` (or at the dataset's δ)."""

    def plan(target: reservation.Target) -> reservation.Planned:
        return reservation.Planned(entry, target.delta if target.delta is not None else delta, target)

    return plan


def _reserve(d, dataset_id, run_id, recs, *, epsilon=None, delta=None, entry=None, **kw):
    request = reservation.Request(epsilon=epsilon, delta=delta, records=recs, **kw)
    return reservation.reserve(dataset_id, run_id, request, _fixed(entry or SMALL), d)


RECS = [f'{{"text":"record {i}"}}'.encode() for i in range(20)]
SMALL = make_entry(2.0, 0.01, 10)  # ε well below 1 at δ = 1e-5


# -- the budget pair --------------------------------------------------------------------------------------


def test_first_run_fixes_the_pair_and_later_runs_keep_to_it(tmp_path):
    d = tmp_path / "client"
    target = _reserve(d, "ds", "r1", RECS, epsilon=4.0)  # δ not given: the planner's default
    assert (target.epsilon, target.delta) == (4.0, None)
    assert history.read("ds", d).budget == history.Budget(4.0, DELTA)
    # Omitted ε and δ: the recorded ones. A smaller ε is a stricter target for that run.
    assert (_reserve(d, "ds", "r2", RECS).epsilon, _reserve(d, "ds", "r3", RECS).delta) == (4.0, DELTA)
    assert _reserve(d, "ds", "r4", RECS, epsilon=3.0, delta=DELTA).epsilon == 3.0
    # A larger ε, or another δ (larger or smaller), is refused with the way to change the budget.
    for ask in (dict(epsilon=4.5), dict(delta=1e-4), dict(delta=1e-6)):
        with pytest.raises(BudgetError, match="offsite client set-budget ds --epsilon E --delta D"):
            _reserve(d, "ds", "r5", RECS, **ask)
    assert len(history.load_history("ds", d)) == 4


def test_the_budget_holds_whatever_the_plan_says(tmp_path):
    """The history checks the composed total itself, at the dataset's δ (a --noise-multiplier run too)."""
    d = tmp_path / "client"
    _reserve(d, "ds", "r1", RECS, epsilon=2.0)
    big = make_entry(1.0, 0.1, 2000)
    assert epsilon_prv([SMALL, big], DELTA) > 2.0
    with pytest.raises(BudgetError, match="above its budget"):
        _reserve(d, "ds", "r2", RECS, entry=big)
    assert [e["run_id"] for e in history.load_history("ds", d)] == ["r1"]


def test_a_plan_at_another_delta_is_refused(tmp_path):
    d = tmp_path / "client"
    _reserve(d, "ds", "r1", RECS, epsilon=2.0)

    def elsewhere(target):
        return reservation.Planned(make_entry(1.0, 0.1, 1), target.delta * 10, None)

    with pytest.raises(BudgetError, match="not dataset ds's"):
        reservation.reserve("ds", "r2", reservation.Request(None, None, RECS), elsewhere, d)


def test_set_budget_is_the_one_way_to_change_it_and_is_recorded(tmp_path):
    d = tmp_path / "client"
    _reserve(d, "ds", "r1", RECS, epsilon=4.0)
    with pytest.raises(OffsiteError, match="--epsilon"):
        history.set_budget("ds", float("nan"), DELTA, d)
    with pytest.raises(FormatError, match="--delta"):
        history.set_budget("ds", 5.0, 1.5, d)
    budget, spent = history.set_budget("ds", 6.0, 1e-6, d)
    assert budget == history.Budget(6.0, 1e-6) and spent.prv_upper > 0
    assert _reserve(d, "ds", "r2", RECS, epsilon=6.0).delta == 1e-6
    block = history.budget_for_receipt("ds", d)
    assert set(block) == {"epsilon", "delta", "changes", "inherits"}
    assert (block["epsilon"], block["delta"], block["inherits"]) == (6.0, 1e-6, [])
    assert [(c["epsilon"], c["delta"], c["how"]) for c in block["changes"]] == [
        (4.0, DELTA, "first-run"),
        (6.0, 1e-6, "set-budget"),
    ]
    assert all(len(c["at"]) == 20 and c["at"].endswith("Z") for c in block["changes"])  # YYYY-MM-DDTHH:MM:SSZ


def test_a_dataset_without_a_budget_needs_epsilon_or_set_budget(tmp_path):
    d = tmp_path / "client"
    with pytest.raises(BudgetError, match="no budget yet.*--epsilon"):
        _reserve(d, "ds", "r1", RECS)
    assert not history.histories_exist(d)
    history.set_budget("ds", 3.0, DELTA, d)  # a budget before the first run
    assert _reserve(d, "ds", "r1", RECS).epsilon == 3.0
    assert history.budget_for_receipt("ds", d)["changes"][0]["how"] == "set-budget"


def test_version_1_histories_are_read_and_need_a_budget(tmp_path):
    d = tmp_path / "client"
    path = history.history_path("old", d)
    path.parent.mkdir(parents=True)
    v1 = {
        "format": "offsite-budget-history",
        "format_version": 1,
        "dataset_id": "old",
        "entries": [
            {
                "run_id": "r0",
                **make_entry(1.0, 0.1, 50),
                "created_at": "2025-01-01T00:00:00.000001Z",
                "updated_at": "2025-01-01T00:00:00.000001Z",
            }
        ],
    }
    path.write_text(json.dumps(v1))
    assert [e["steps"] for e in history.load_history("old", d)] == [50]  # its runs count
    with pytest.raises(BudgetError, match="no budget.*older version.*set-budget old"):
        _reserve(d, "old", "r1", RECS, epsilon=8.0)
    history.set_budget("old", 8.0, DELTA, d)
    doc = json.loads(path.read_text())
    assert doc["format_version"] == 2 and doc["entries"][0]["run_id"] == "r0"
    _reserve(d, "old", "r1", RECS)
    assert history.spent_epsilon("old", None, d).prv_upper == pytest.approx(
        epsilon_prv([make_entry(1.0, 0.1, 50), SMALL], DELTA)
    )
    path.write_text(json.dumps({**v1, "format_version": 3}))
    with pytest.raises(FormatError, match="format version 3"):
        history.read("old", d)


# -- records under another dataset id ------------------------------------------------------------------


def test_the_same_records_under_another_id_are_refused_unless_told(tmp_path):
    d = tmp_path / "client"
    _reserve(d, "a", "ra", RECS, epsilon=4.0)
    shuffled = list(reversed(RECS[:5])) + [b'{"text":"new"}']
    with pytest.raises(BudgetError, match=r"also in a \(5 of this run's 6 .*--inherit a.*--new-budget"):
        _reserve(d, "b", "rb", shuffled, epsilon=4.0)
    assert not history.history_path("b", d).exists()
    with pytest.raises(OffsiteError, match="no budget history for dataset nope"):
        _reserve(d, "b", "rb", shuffled, epsilon=4.0, inherit=("nope",))
    _reserve(d, "b", "rb", shuffled, epsilon=4.0, inherit=("a",))
    # b composes with a: a's runs count towards b, with their run ids.
    assert [e["run_id"] for e in history.cumulative_history("b", d)] == ["rb", "ra"]
    assert history.budget_for_receipt("b", d)["inherits"] == ["a"]
    assert history.cumulative_history("a", d)[0]["run_id"] == "ra"  # not the other way round
    # An unrelated dataset with no shared record needs nothing.
    _reserve(d, "c", "rc", [b"unrelated"], epsilon=4.0)
    [overlap] = history.overlaps(d)
    assert (overlap.a, overlap.b, overlap.shared_records, overlap.relation) == ("a", "b", 5, "b inherits a")


def test_new_budget_is_recorded_with_a_warning_and_shown(tmp_path):
    d = tmp_path / "client"
    _reserve(d, "a", "ra", RECS, epsilon=4.0)
    warnings = []
    request = reservation.Request(epsilon=4.0, delta=None, records=RECS[:3], new_budget=True)
    reservation.reserve("b", "rb", request, _fixed(SMALL), d, on_warning=warnings.append)
    assert len(warnings) == 1 and "3 records" in warnings[0] and "dataset a" in warnings[0]
    assert history.read("b", d).new_budget_despite[0]["dataset_id"] == "a"
    assert (
        history.cumulative_history("b", d)[0]["run_id"] == "rb"
        and len(history.cumulative_history("b", d)) == 1
    )
    # Declared once: later runs on either dataset with the same overlap go ahead.
    _reserve(d, "b", "rb2", RECS[:3])
    _reserve(d, "a", "ra2", RECS)
    assert [o.relation for o in history.overlaps(d)] == ["separate budgets (declared by b)"]


def test_a_run_must_keep_the_budgets_of_datasets_that_inherit_it(tmp_path):
    d = tmp_path / "client"
    _reserve(d, "a", "ra", RECS, epsilon=50.0)
    _reserve(d, "b", "rb", RECS, epsilon=2.0, inherit=("a",))
    # A run on a that a's own budget allows would take b (which composes with a) over its 2.0.
    with pytest.raises(BudgetError, match="dataset b's total"):
        _reserve(d, "a", "ra2", RECS, entry=make_entry(1.0, 0.1, 400))
    assert [e["run_id"] for e in history.load_history("a", d)] == ["ra"]


def test_record_hashes_are_keyed_sorted_compact_and_private(tmp_path):
    d = tmp_path / "client"
    _reserve(d, "a", "ra", RECS + RECS[:4], epsilon=4.0)  # duplicates are stored once
    path = history.records_path("a", d)
    data = path.read_bytes()
    assert data.startswith(records.MAGIC) and len(data) == len(records.MAGIC) + 32 * len(RECS)
    assert os.stat(path).st_mode & 0o777 == 0o600
    key_path = history.budgets_dir(d) / records.KEY_FILE
    assert os.stat(key_path).st_mode & 0o777 == 0o600 and len(key_path.read_bytes()) == 32
    stored = records.read_set(path)
    assert [h.tobytes() for h in stored] == sorted(h.tobytes() for h in stored)
    # Keyed: without the key the hashes are not the records' plain sha256, and another key gives others.
    import hashlib

    assert hashlib.sha256(RECS[0]).digest() not in data
    assert records.count_shared(stored, records.hash_records(RECS, bytes(32))) == 0
    assert records.count_shared(stored, records.hash_records(RECS[:7], key_path.read_bytes())) == 7
    # A damaged (unsorted) file is refused, not silently used.
    swapped = stored.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    path.write_bytes(records.MAGIC + swapped.tobytes())
    with pytest.raises(FormatError, match="damaged"):
        _reserve(d, "b", "rb", [b"x"], epsilon=1.0)
    # Missing key with hashes present: refused (they could no longer be compared).
    records.write_set(path, stored)
    key_path.unlink()
    with pytest.raises(OffsiteError, match="record_key.bin is missing"):
        _reserve(d, "b", "rb", [b"x"], epsilon=1.0)


def test_many_records_are_compared_quickly():
    key = bytes(range(32))
    big = records.hash_records((f"r{i}".encode() for i in range(200_000)), key)
    small = records.hash_records((f"r{i}".encode() for i in range(199_000, 201_000)), key)
    assert len(big) == 200_000 and records.count_shared(big, small) == 1_000
    assert records.union(big, small).shape == (201_000,) and isinstance(big, np.ndarray)


# -- one record, one identity whatever the file format -------------------------------------------------


def test_a_record_has_the_same_canonical_form_in_jsonl_csv_and_text(tmp_path):
    rows = [
        {"question": "Is the cat red?", "choices": ["yes", "no"], "answer": 1, "id": 7},
        {"question": "Is the dog, blue?", "choices": ["a", "b", "c"], "answer": 0, "id": 8},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "answer", "question", "choices"])  # other column order, other types
        for r in rows:
            w.writerow([str(r["id"] + 100), str(r["answer"]), r["question"], json.dumps(r["choices"])])
    jsonl = [r.canonical for r in read_records(tmp_path / "d.jsonl", MC)]
    assert jsonl == [r.canonical for r in read_records(tmp_path / "d.csv", MC)]
    assert json.loads(jsonl[0]) == {"question": "Is the cat red?", "choices": ["yes", "no"], "answer": 1}
    (tmp_path / "t.txt").write_text("hello world\n")
    (tmp_path / "t.jsonl").write_text('{"text": "hello world", "source": "x"}\n')
    assert (
        read_records(tmp_path / "t.txt", LM)[0].canonical
        == read_records(tmp_path / "t.jsonl", LM)[0].canonical
    )


# -- the command line -------------------------------------------------------------------------------


def test_cli_set_budget_and_budget_show_budgets_and_overlaps(tmp_path, monkeypatch, capsys):
    from offsite.cli.main import main

    d = tmp_path / "client"
    monkeypatch.setenv("OFFSITE_CLIENT_DIR", str(d))
    monkeypatch.setenv("COLUMNS", "200")
    _reserve(d, "a", "ra", RECS, epsilon=4.0)
    _reserve(d, "b", "rb", RECS[:2], epsilon=4.0, new_budget=True)
    _reserve(d, "c", "rc", RECS[5:8], epsilon=4.0, inherit=("a",))
    assert main(["client", "set-budget", "a", "--epsilon", "6", "--delta", "1e-6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["budget"] == {"epsilon": 6.0, "delta": 1e-6}
    assert main(["client", "set-budget", "a", "--epsilon", "inf", "--delta", "1e-6"]) == 2
    assert "--epsilon" in capsys.readouterr().err
    assert main(["client", "budget", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    rows = {r["dataset_id"]: r for r in shown["datasets"]}
    assert rows["a"]["budget"] == {"epsilon": 6.0, "delta": 1e-6} and rows["a"]["delta"] == 1e-6
    assert [c["how"] for c in rows["a"]["budget_changes"]] == ["first-run", "set-budget"]
    assert rows["c"]["inherits"] == ["a"] and rows["c"]["runs"] == 1
    assert rows["c"]["epsilon"]["prv_upper"] > history.spent_epsilon("a", DELTA, d).prv_upper - 1e-12
    assert {(tuple(o["datasets"]), o["shared_records"], o["relation"]) for o in shown["overlaps"]} == {
        (("a", "b"), 2, "separate budgets (declared by b)"),
        (("a", "c"), 3, "c inherits a"),
    }
    assert main(["client", "budget"]) == 0
    out = capsys.readouterr().out
    assert "datasets that share records" in out and "c inherits a" in out
