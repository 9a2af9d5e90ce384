"""Long and hostile histories: identical phases grouped (and checked against Opacus), bounded work, and
the cached RDP that PRV's grid is built from, checked against Opacus' own computation."""

from __future__ import annotations

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

from offsite.privacy import accounting
from offsite.privacy.accounting import AccountingError, epsilon, epsilon_prv, epsilon_rdp, make_entry

DELTA = 1e-5


def _opacus_prv(history: list[tuple[float, float, int]]) -> float:
    acc = PRVAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(DELTA, eps_error=accounting.DEFAULT_EPS_ERROR))


def _opacus_rdp(history: list[tuple[float, float, int]]) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(DELTA))


def test_k_identical_phases_compose_as_one_phase_of_k_times_the_steps_in_opacus():
    # The fact grouping relies on, checked on Opacus itself (ungrouped histories straight into its
    # accountants): 3 phases of 100 steps are one phase of 300, for PRV (same grid, same composed
    # density up to FFT round-off) and RDP (exactly).
    split, whole = [(1.1, 0.02, 100)] * 3, [(1.1, 0.02, 300)]
    assert _opacus_prv(split) == pytest.approx(_opacus_prv(whole), abs=1e-7)
    assert _opacus_rdp(split) == pytest.approx(_opacus_rdp(whole), rel=1e-12)
    # ... and our accountants group before composing, so both spellings give the same numbers.
    ours_split = epsilon([make_entry(*e) for e in split], DELTA)
    assert ours_split == epsilon([make_entry(*whole[0])], DELTA)
    assert ours_split.prv_upper == pytest.approx(_opacus_prv(whole), abs=1e-12)


def test_grouping_keeps_distinct_mechanisms_apart():
    key = ((1.0, 0.02, 10), (1.0, 0.01, 5), (1.0, 0.02, 7), (2.0, 0.02, 0))
    assert accounting.group_phases(key) == ((1.0, 0.01, 5), (1.0, 0.02, 17))
    mixed = [make_entry(1.0, 0.02, 100), make_entry(1.3, 0.02, 50), make_entry(1.0, 0.02, 100)]
    assert epsilon_prv(mixed, DELTA) == pytest.approx(
        _opacus_prv([(1.0, 0.02, 200), (1.3, 0.02, 50)]), abs=1e-12
    )


@pytest.mark.parametrize(
    "key",
    [((1.0, 0.01, 100),), ((0.7, 0.125, 8), (1.3, 0.5, 3), (2.0, 0.01, 1000))],
)
def test_prv_grid_and_rdp_are_opacus_own(key):
    assert tuple(RDPAccountant.DEFAULT_ALPHAS) == accounting.RDP_ORDERS
    prvs = [PoissonSubsampledGaussianPRV(q, s) for s, q, _ in key]
    theirs = PRVAccountant()._get_domain(
        prvs=prvs, num_self_compositions=[n for *_, n in key], eps_error=0.01, delta_error=1e-8
    )
    assert accounting.prv_domain(key, 0.01, 1e-8) == theirs
    history = [make_entry(*e) for e in key]
    assert epsilon_prv(history, DELTA) == pytest.approx(_opacus_prv(list(key)), abs=1e-12)
    assert epsilon_rdp(history, DELTA) == pytest.approx(_opacus_rdp(list(key)), rel=1e-12)


def test_a_long_history_of_one_mechanism_is_accounted_as_one_phase():
    history = [make_entry(1.0, 0.01, 1)] * 3000  # 3,000 PRV discretisations before grouping
    assert epsilon(history, DELTA) == epsilon([make_entry(1.0, 0.01, 3000)], DELTA)


def test_too_many_distinct_mechanisms_are_refused_before_any_accounting(monkeypatch):
    monkeypatch.setattr(accounting, "_rdp_per_step", None)  # any accounting would fail loudly
    history = [make_entry(1.0 + i / 1000, 0.01, 1) for i in range(accounting.MAX_DISTINCT_PHASES + 1)]
    for fn in (epsilon_prv, epsilon_rdp):
        with pytest.raises(AccountingError, match="distinct"):
            fn(history, DELTA)


@pytest.mark.parametrize(
    "entry",
    [
        make_entry(1.0, 0.001, 10**8),  # the grid grows with √steps: 10^8 steps would need ~10^9 points
        make_entry(0.3, 1.0, 10_000),  # ε in the thousands widens the grid as much
    ],
)
def test_a_grid_beyond_the_work_limit_is_refused_not_allocated(entry):
    with pytest.raises(AccountingError, match="grid points"):
        epsilon_prv([entry], DELTA)
    # RDP needs no grid: it still answers.
    assert epsilon_rdp([entry], DELTA) > 0


def test_an_honest_run_stays_far_below_the_limits():
    # The demo's run: one phase of 64 steps at q = 1/16.
    domain = accounting.prv_domain(((0.8, 1 / 16, 64),), accounting.DEFAULT_EPS_ERROR, 1e-8)
    assert domain.size < accounting.MAX_PRV_POINTS // 20
