"""Privacy accounting: published anchors, Google's dp_accounting as an independent cross-check,
composition across runs, noise calibration, and the per-dataset budget history."""

from __future__ import annotations

import json
import os

import pytest

from offsite.errors import BudgetError, FormatError, OffsiteError
from offsite.privacy import accounting, history
from offsite.privacy.accounting import calibrate_noise, epsilon, epsilon_prv, epsilon_rdp, make_entry
from offsite.privacy.fingerprint import dataset_fingerprint

DELTA = 1e-5


def _dp_accounting_eps(history_: list[dict], delta: float) -> tuple[float, float]:
    """(RDP ε, PLD ε) of a history from Google's dp_accounting (a dev dependency, tests only)."""
    import dp_accounting as dpa
    from dp_accounting import pld, rdp

    event = dpa.ComposedDpEvent(
        [
            dpa.SelfComposedDpEvent(
                dpa.PoissonSampledDpEvent(e["sample_rate"], dpa.GaussianDpEvent(e["noise_multiplier"])),
                e["steps"],
            )
            for e in history_
        ]
    )
    r = rdp.RdpAccountant()
    r.compose(event)
    p = pld.PLDAccountant(value_discretization_interval=1e-3)
    p.compose(event)
    return r.get_epsilon(delta), p.get_epsilon(delta)


def test_published_anchor_rdp():
    # Opacus' accountant tests: σ=1.5, q=0.04, 2250 steps, δ=1e-5 → RDP ε = 7.3291.
    assert epsilon_rdp([make_entry(1.5, 0.04, 2250)], DELTA) == pytest.approx(7.3291, abs=5e-4)


def test_published_anchor_prv():
    # ... and PRV (2249 steps) ε = 6.7774 (the upper bound with Opacus' default eps_error 0.01).
    eps = epsilon([make_entry(1.5, 0.04, 2249)], DELTA)
    assert eps.prv_eps_error == 0.01
    assert eps.prv_upper == pytest.approx(6.7774, abs=5e-4)
    assert eps.prv_upper < eps.rdp  # PRV is tighter than RDP


def test_cross_check_with_dp_accounting():
    h = [make_entry(1.5, 0.04, 2249)]
    rdp_google, pld_google = _dp_accounting_eps(h, DELTA)
    assert epsilon_rdp(h, DELTA) == pytest.approx(rdp_google, rel=1e-3)
    prv = epsilon_prv(h, DELTA)
    # PRV upper bound vs PLD (both numerical, both tight): the upper bound sits above the PLD value,
    # by no more than twice the stated eps_error.
    assert pld_google - 1e-3 <= prv <= pld_google + 2 * accounting.DEFAULT_EPS_ERROR


def test_composition_of_runs_is_not_a_sum():
    run1, run2 = make_entry(1.0, 0.02, 300), make_entry(1.3, 0.01, 400)
    e1, e2 = epsilon_prv([run1], DELTA), epsilon_prv([run2], DELTA)
    both = epsilon([run1, run2], DELTA)
    assert max(e1, e2) < both.prv_upper < e1 + e2
    assert epsilon_rdp([run1, run2], DELTA) < epsilon_rdp([run1], DELTA) + epsilon_rdp([run2], DELTA)
    # Heterogeneous composition agrees with Google's accountants.
    rdp_google, pld_google = _dp_accounting_eps([run1, run2], DELTA)
    assert both.rdp == pytest.approx(rdp_google, rel=1e-3)
    assert pld_google - 1e-3 <= both.prv_upper <= pld_google + 2 * accounting.DEFAULT_EPS_ERROR


def test_empty_history_spends_nothing():
    assert epsilon([], DELTA).prv_upper == 0.0
    assert epsilon([make_entry(1.0, 0.1, 0)], DELTA).rdp == 0.0


def test_calibrate_noise_meets_target_and_is_minimal():
    q, steps, target = 0.02, 100, 2.0
    sigma = calibrate_noise([], q, steps, target, DELTA)
    assert epsilon_prv([make_entry(sigma, q, steps)], DELTA) <= target
    # Slightly less noise overshoots: σ is (within the search tolerance) the smallest that fits.
    assert epsilon_prv([make_entry(sigma * (1 - 1e-3), q, steps)], DELTA) > target


def test_calibrate_noise_accounts_for_prior_runs():
    q, steps, target = 0.02, 100, 2.0
    prior = [make_entry(1.2, 0.02, 100)]
    fresh = calibrate_noise([], q, steps, target, DELTA)
    sigma = calibrate_noise(prior, q, steps, target, DELTA)
    assert sigma > fresh  # what was spent before leaves less room
    assert epsilon_prv([*prior, make_entry(sigma, q, steps)], DELTA) <= target
    assert epsilon_prv([*prior, make_entry(sigma * (1 - 1e-3), q, steps)], DELTA) > target


def test_budget_already_spent():
    prior = [make_entry(0.8, 0.02, 100)]
    spent = epsilon_prv(prior, DELTA)
    with pytest.raises(BudgetError, match="already spent") as info:
        calibrate_noise(prior, 0.02, 100, spent * 0.9, DELTA)
    assert f"{spent:.4f}" in str(info.value) and "δ=1e-05" in str(info.value)


def test_sigma_out_of_range():
    with pytest.raises(BudgetError, match="too small") as info:
        calibrate_noise([], 0.02, 100, 1e-4, DELTA)
    assert "reaches ε from" in str(info.value)
    with pytest.raises(BudgetError, match="too large"):
        calibrate_noise([], 0.02, 100, 1e4, DELTA)


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        (
            {
                "mechanism": "poisson-subsampled-gaussian",
                "noise_multiplier": -1.0,
                "sample_rate": 0.1,
                "steps": 1,
            },
            "noise_multiplier",
        ),
        (
            {
                "mechanism": "poisson-subsampled-gaussian",
                "noise_multiplier": 1.0,
                "sample_rate": 1.5,
                "steps": 1,
            },
            "sample_rate",
        ),
        (
            {
                "mechanism": "poisson-subsampled-gaussian",
                "noise_multiplier": 1.0,
                "sample_rate": 0.1,
                "steps": 1.5,
            },
            "steps",
        ),
        (
            {
                "mechanism": "poisson-subsampled-gaussian",
                "noise_multiplier": 1.0,
                "sample_rate": True,
                "steps": 1,
            },
            "sample_rate",
        ),
        ({"mechanism": "laplace", "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1}, "mechanism"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1}, "mechanism"),
    ],
)
def test_bad_entries_name_the_field(entry, field):
    with pytest.raises(FormatError, match=rf"\.{field}"):
        epsilon_rdp([entry], DELTA)


def test_a_sigma_below_the_floor_is_refused_and_accountant_arithmetic_errors_are_accounting_errors():
    """σ = 5e-324 makes Opacus' compute_rdp divide by zero: entries refuse it by name; and should an
    accountant still hit an arithmetic error, it comes out as an AccountingError, never a traceback."""
    tiny = {"mechanism": accounting.MECHANISM, "noise_multiplier": 5e-324, "sample_rate": 0.1, "steps": 1}
    for account in (epsilon_rdp, epsilon_prv, accounting.epsilon_pld):
        with pytest.raises(FormatError, match=r"history\[0\]\.noise_multiplier: σ = 5e-324 is below 0\.001"):
            account([tiny], DELTA)
    assert epsilon_rdp([make_entry(accounting.SIGMA_FLOOR, 0.1, 1)], DELTA) > 1e5  # the floor itself is valid
    key = ((1e-300, 0.1, 1),)  # past the validation, straight into the accountants
    for account in (
        lambda: accounting._rdp_grouped(key, DELTA),
        lambda: accounting._prv_upper_grouped(key, DELTA, 0.01),
        lambda: accounting._pld_grouped(key, DELTA),
        lambda: accounting._rdp_integer_orders_grouped(key, DELTA),
    ):
        with pytest.raises(accounting.AccountingError, match="ZeroDivisionError|could not compute"):
            account()


# ---------------------------------------------------------------------------------------- history


def test_history_record_resume_and_phases(tmp_path):
    d = tmp_path / "client"
    assert history.load_history("ds1", d) == []
    history.record("ds1", "run-a", make_entry(1.0, 0.02, 50), d)
    history.record("ds1", "run-a", make_entry(1.0, 0.02, 120), d)  # resumed: same entry grows
    entries = history.load_history("ds1", d)
    assert [(e["run_id"], e["steps"]) for e in entries] == [("run-a", 120)]
    # Resuming from an older checkpoint never lowers what was spent.
    history.record("ds1", "run-a", make_entry(1.0, 0.02, 80), d)
    assert history.load_history("ds1", d)[0]["steps"] == 120
    # A second phase of the same run (other σ) and another run are new entries.
    history.record("ds1", "run-a", make_entry(1.5, 0.02, 30), d)
    history.record("ds1", "run-b", make_entry(1.0, 0.02, 10), d)
    entries = history.load_history("ds1", d)
    assert [(e["run_id"], e["noise_multiplier"], e["steps"]) for e in entries] == [
        ("run-a", 1.0, 120),
        ("run-a", 1.5, 30),
        ("run-b", 1.0, 10),
    ]
    assert all("created_at" in e and "updated_at" in e for e in entries)
    spent = history.spent_epsilon("ds1", DELTA, d)
    assert spent.prv_upper == pytest.approx(epsilon_prv(entries, DELTA))
    # Datasets are separate files.
    assert history.load_history("ds2", d) == []


def test_history_file_is_atomic_and_private(tmp_path):
    d = tmp_path / "client"
    history.record("ds1", "r1", make_entry(1.0, 0.02, 5), d)
    path = d / "budgets" / "ds1.json"
    doc = json.loads(path.read_text())
    assert doc["format"] == "offsite-budget-history" and doc["dataset_id"] == "ds1"
    assert os.stat(path).st_mode & 0o777 == 0o600
    # No temporary file is left behind by the atomic write.
    assert sorted(p.name for p in path.parent.iterdir()) == [".lock", "ds1.json"]


def test_state_dirs_from_env(tmp_path, monkeypatch):
    from offsite import state

    monkeypatch.setenv("OFFSITE_CLIENT_DIR", str(tmp_path / "envdir"))
    monkeypatch.setenv("OFFSITE_OWNER_DIR", str(tmp_path / "ownerdir"))
    monkeypatch.setenv("OFFSITE_CACHE_DIR", str(tmp_path / "cachedir"))
    assert (state.client_dir(), state.owner_dir(), state.cache_dir()) == (
        tmp_path / "envdir",
        tmp_path / "ownerdir",
        tmp_path / "cachedir",
    )
    history.record("ds", "r", make_entry(1.0, 0.02, 5), state.client_dir())
    assert (tmp_path / "envdir" / "budgets" / "ds.json").is_file()


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", ".hidden", "..", "x" * 129, "a\x00b", "ds\n"])
def test_dataset_id_cannot_traverse(tmp_path, bad):
    with pytest.raises(OffsiteError, match="invalid dataset id"):
        history.record(bad, "r", make_entry(1.0, 0.02, 5), tmp_path)
    with pytest.raises(OffsiteError, match="invalid dataset id"):
        history.load_history(bad, tmp_path)


def test_history_rejects_tampered_file(tmp_path):
    history.record("ds1", "r1", make_entry(1.0, 0.02, 5), tmp_path)
    path = tmp_path / "budgets" / "ds1.json"
    doc = json.loads(path.read_text())
    doc["entries"][0]["sample_rate"] = 2.0
    path.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="sample_rate"):
        history.load_history("ds1", tmp_path)


# ---------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_under_reordering_and_sensitive_to_changes():
    salt = bytes(range(32))
    records = ["alpha", "beta", "gamma", b"\x00binary"]
    fp = dataset_fingerprint(records, salt)
    assert len(fp) == 64
    assert dataset_fingerprint(list(reversed(records)), salt) == fp
    assert dataset_fingerprint(["alpha", "beta", "gammA", b"\x00binary"], salt) != fp
    assert dataset_fingerprint(records + ["alpha"], salt) != fp  # a duplicate is a different dataset
    assert dataset_fingerprint(records[:-1], salt) != fp
    assert dataset_fingerprint(records, bytes(32)) != fp  # keyed by the owner's salt
    assert dataset_fingerprint(["alpha"], salt) == dataset_fingerprint([b"alpha"], salt)  # str is UTF-8


def test_reservations_on_one_dataset_are_serialised(tmp_path):
    """Two runs started at once: the second plans against the first's reservation, not before it."""
    import threading
    import time

    from offsite.privacy import history, reservation
    from offsite.privacy.accounting import make_entry

    seen: dict[str, list] = {}

    def start(run_id: str, delay: float) -> None:
        time.sleep(delay)

        def plan(target):
            seen[run_id] = target.prior
            time.sleep(0.3)  # planning (noise calibration) takes a while
            return reservation.Planned(make_entry(1.0, 0.1, 10), 1e-5, None)

        request = reservation.Request(epsilon=50.0 if run_id == "first" else None, delta=None, records=[b"r"])
        reservation.reserve("shared", run_id, request, plan, tmp_path)

    threads = [
        threading.Thread(target=start, args=("first", 0.0)),
        threading.Thread(target=start, args=("second", 0.1)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["first"] == []
    assert len(seen["second"]) == 1 and seen["second"][0]["steps"] == 10
    assert [e["run_id"] for e in history.load_history("shared", tmp_path)] == ["first", "second"]
