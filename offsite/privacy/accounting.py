"""Privacy accounting for DP-SGD: ε of a mechanism history, and noise calibration against a budget.

A *mechanism history* is a list of JSON-able entries, one per phase of training::

    {"mechanism": "poisson-subsampled-gaussian", "noise_multiplier": σ, "sample_rate": q, "steps": n}

Every ε here is computed by *composing* a whole history with an accountant, never by adding the ε
of separate runs: ε values do not add up meaningfully (adding is loose and, at a fixed δ, not even the
right quantity), while composing the mechanisms is both valid and tight. To account for several runs on
one dataset, concatenate their histories.

Two accountants from Opacus are used:

* PRV (Gopi et al. 2021), numerical and tight; we report its *upper* bound together with the
  ``eps_error`` it was computed with, so that anyone can re-derive and compare it;
* RDP, looser but analytic; a cross-check that needs no numerical discretisation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from offsite.errors import BudgetError, FormatError

MECHANISM = "poisson-subsampled-gaussian"
NEIGHBOURING_RELATION = "add/remove one record"

#: Opacus' own default; small enough to be negligible next to typical budgets, large enough to be fast.
DEFAULT_EPS_ERROR = 0.01

#: The σ range ``calibrate_noise`` searches. Below 0.3 the privacy loss distribution is so wide that the
#: PRV accountant becomes slow and numerically fragile (Opacus #601/#604), and such σ give ε in the
#: hundreds, which is no privacy worth certifying; above 100 training no longer learns anything.
SIGMA_MIN = 0.3
SIGMA_MAX = 100.0

#: Relative precision of the σ search. The returned σ always satisfies the target (it is the upper end
#: of the final bracket), and σ·(1 - SIGMA_RTOL) is known to exceed it.
SIGMA_RTOL = 1e-4

_BRACKET = 1.25

#: Bounds on the work an accountant may be asked to do, so that a long or hostile history (a receipt
#: from someone else) is refused instead of stalling the process or exhausting its memory. PRV
#: discretises the privacy loss on a grid whose size grows with the square root of the total steps and
#: with ε; every distinct (σ, q) phase costs one discretisation and one FFT over that grid (about
#: 200 bytes and 0.5 µs per grid point here). An honest history stays far below: the demo's is one
#: phase on ~60,000 points; ε = 8 reaches the per-grid limit only after about 190,000 steps.
MAX_DISTINCT_PHASES = 64
MAX_PRV_POINTS = 1 << 22
MAX_PRV_WORK = 1 << 24  # distinct phases × grid points

ENTRY_KEYS = ("mechanism", "noise_multiplier", "sample_rate", "steps")


class AccountingError(BudgetError):
    """An accountant could not produce a trustworthy ε for a history."""


@dataclass(frozen=True)
class Epsilon:
    """ε of one history at one δ, from both accountants."""

    prv_upper: float
    prv_eps_error: float
    rdp: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- entries


def make_entry(noise_multiplier: float, sample_rate: float, steps: int) -> dict[str, Any]:
    """A validated mechanism entry for a phase of Poisson-subsampled Gaussian DP-SGD."""
    return validate_entry(
        {
            "mechanism": MECHANISM,
            "noise_multiplier": noise_multiplier,
            "sample_rate": sample_rate,
            "steps": steps,
        }
    )


def _is_number(x: Any) -> bool:
    # bool is an int subclass: `true` in a receipt must not pass as a sample rate of 1.
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_entry(entry: Any, where: str = "entry") -> dict[str, Any]:
    """Check one mechanism entry (untrusted input); return a normalised copy.

    Extra keys (``run_id``, timestamps) are kept. A FormatError names the offending field.
    """
    if not isinstance(entry, Mapping):
        raise FormatError(f"{where}: must be a JSON object, got {type(entry).__name__}")
    for key in ENTRY_KEYS:
        if key not in entry:
            raise FormatError(f"{where}.{key}: missing")
    if entry["mechanism"] != MECHANISM:
        raise FormatError(f"{where}.mechanism: must be {MECHANISM!r}, got {entry['mechanism']!r}")
    sigma, q, steps = entry["noise_multiplier"], entry["sample_rate"], entry["steps"]
    if not _is_number(sigma) or not math.isfinite(sigma) or sigma <= 0:
        raise FormatError(f"{where}.noise_multiplier: must be a finite number > 0, got {sigma!r}")
    if not _is_number(q) or not math.isfinite(q) or not 0 < q <= 1:
        raise FormatError(f"{where}.sample_rate: must be a number with 0 < q <= 1, got {q!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise FormatError(f"{where}.steps: must be an integer >= 0, got {steps!r}")
    out = dict(entry)
    out["noise_multiplier"] = float(sigma)
    out["sample_rate"] = float(q)
    return out


def validate_history(history: Any, where: str = "history") -> list[dict[str, Any]]:
    """Check a whole mechanism history (a JSON list of entries)."""
    if not isinstance(history, list):
        raise FormatError(f"{where}: must be a list of mechanism entries, got {type(history).__name__}")
    return [validate_entry(e, f"{where}[{i}]") for i, e in enumerate(history)]


def validate_delta(delta: Any, where: str = "delta") -> float:
    if not _is_number(delta) or not math.isfinite(delta) or not 0 < delta < 1:
        raise FormatError(f"{where}: must be a number with 0 < δ < 1, got {delta!r}")
    return float(delta)


Key = tuple[tuple[float, float, int], ...]


def _key(history: Iterable[Mapping[str, Any]]) -> Key:
    """(σ, q, steps) triples, dropping empty phases, as a hashable cache key."""
    return tuple(
        (float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
        for e in history
        if e["steps"] > 0
    )


def group_phases(key: Key) -> Key:
    """Merge phases with the same (σ, q) into one phase with the summed steps, in a canonical order.

    Composition is commutative, and k phases of n_1..n_k steps of one mechanism are one phase of
    n_1 + ... + n_k steps: exactly for RDP (it adds per step), and for PRV the same composed density
    (Opacus discretises on a domain that depends only on the distinct mechanisms and the total steps;
    tests check the two agree). Grouping turns a history of thousands of resumed or repeated phases
    into a few, which is what keeps the accountants fast on long histories.
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in key:
        if n > 0:
            steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    return tuple(sorted((sigma, q, n) for (sigma, q), n in steps.items()))


def check_size(key: Key) -> None:
    """Refuse, before any accounting, a history with more distinct mechanisms than the accountants
    are allowed to work through (see ``MAX_DISTINCT_PHASES``)."""
    grouped = group_phases(key)
    if len(grouped) > MAX_DISTINCT_PHASES:
        raise AccountingError(
            f"the history has {len(grouped)} distinct (σ, q) phases, more than the {MAX_DISTINCT_PHASES} "
            "this accountant composes; it is refused rather than accounted for slowly"
        )


# ------------------------------------------------------------------------------------------ accountants


def _prv_upper(key: Key, delta: float, eps_error: float) -> float:
    return _prv_upper_grouped(group_phases(key), delta, eps_error)


def _rdp(key: Key, delta: float) -> float:
    return _rdp_grouped(group_phases(key), delta)


#: Opacus' RDPAccountant.DEFAULT_ALPHAS (a test checks they agree).
RDP_ORDERS = tuple(1 + x / 10.0 for x in range(1, 100)) + tuple(range(12, 64))


@lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, q: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one step of (σ, q) at ``orders``: the slow part of every RDP and PRV computation
    (up to 0.3 s at fractional orders), done once per mechanism per process."""
    from opacus.accountants.analysis.rdp import compute_rdp

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders))
    rdp.setflags(write=False)
    return rdp


def _rdp_epsilon(key: Key, delta: float, orders: tuple[float, ...] = RDP_ORDERS) -> float:
    """What Opacus' RDPAccountant(history=key).get_epsilon(delta) computes (compute_rdp scales one
    step by the number of steps, so n · per-step is the same number), with per-step RDP cached."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(n * _rdp_per_step(sigma, q, orders) for sigma, q, n in key)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # "optimal order is the largest/smallest alpha": the bound is still valid, only looser.
        warnings.simplefilter("ignore")
        eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


def prv_domain(key: Key, eps_error: float, delta_error: float):
    """The grid Opacus' PRV accountant discretises ``key`` on (``PRVAccountant._get_domain`` with
    ``compute_safe_domain_size``, Gopi et al. remark 5.6), computed with cached per-step RDP."""
    from opacus.accountants.analysis.prv import Domain

    total = sum(n for _, _, n in key)
    bound = _rdp_epsilon(key, delta_error / 4)
    for sigma, q, _ in key:
        bound = max(bound, _rdp_epsilon(((sigma, q, 1),), delta_error / (8 * total)))
    half_width = max(bound, eps_error) + 3
    mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    return Domain.create_aligned(-half_width, half_width, mesh)


@lru_cache(maxsize=1)
def _bounded_prv_accountant() -> type:
    """Opacus' PRV accountant on the same grid, refusing before discretising beyond the work limits."""
    from opacus.accountants import PRVAccountant

    class BoundedPRVAccountant(PRVAccountant):
        def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error):
            key = tuple(
                (p.noise_multiplier, p.sample_rate, n)
                for p, n in zip(prvs, num_self_compositions, strict=True)
            )
            domain = prv_domain(key, eps_error, delta_error)
            if domain.size > MAX_PRV_POINTS or domain.size * len(prvs) > MAX_PRV_WORK:
                raise AccountingError(
                    f"the PRV accountant would discretise {len(prvs)} phase(s) on {domain.size:,} grid points "
                    f"(limits: {MAX_PRV_POINTS:,} points, {MAX_PRV_WORK:,} phases × points): ε is too large "
                    "or the history too long for numerical accounting within the limits"
                )
            return domain

    return BoundedPRVAccountant


@lru_cache(maxsize=512)
def _prv_upper_grouped(key: Key, delta: float, eps_error: float) -> float:
    if not key:
        return 0.0
    check_size(key)
    acc = _bounded_prv_accountant()()
    acc.history = list(key)
    try:
        # numpy warns about log(0) for q = 1 and over/underflow in the tails; they are handled by the
        # accountant's truncation and would only alarm the user.
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            eps = float(acc.get_epsilon(delta, eps_error=eps_error))
    except (RuntimeError, ValueError, OverflowError, FloatingPointError, MemoryError) as e:
        # Opacus #601/#604: at very large ε the discretised privacy loss runs off its domain.
        raise AccountingError(
            f"the PRV accountant could not compute ε at δ={delta:g} for history {_describe(key)} ({e}); "
            "ε is too large for numerical accounting: use more noise or fewer steps"
        ) from e
    if not math.isfinite(eps):
        raise AccountingError(
            f"the PRV accountant returned ε={eps} for history {_describe(key)} at δ={delta:g}"
        )
    # Opacus #585: tiny budgets can come out slightly negative from discretisation; ε ≥ 0 always holds.
    return max(eps, 0.0)


@lru_cache(maxsize=512)
def _rdp_grouped(key: Key, delta: float) -> float:
    if not key:
        return 0.0
    check_size(key)
    eps = _rdp_epsilon(key, delta)
    if not math.isfinite(eps) or eps < 0:
        raise AccountingError(
            f"the RDP accountant returned ε={eps} for history {_describe(key)} at δ={delta:g}"
        )
    return eps


_INTEGER_ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256)


def _rdp_integer_orders(key: Key, delta: float) -> float:
    return _rdp_integer_orders_grouped(group_phases(key), delta)


@lru_cache(maxsize=512)
def _rdp_integer_orders_grouped(key: Key, delta: float) -> float:
    """RDP at integer orders only: a valid (slightly looser) bound that is ~100x faster than
    Opacus' default fractional orders. Only used to bracket the PRV search."""
    if not key:
        return 0.0
    return _rdp_epsilon(key, delta, _INTEGER_ORDERS)


def _describe(key: Sequence[tuple[float, float, int]]) -> str:
    if len(key) > 4:
        return f"[{len(key)} phases]"
    return "[" + ", ".join(f"(σ={s:g}, q={q:g}, steps={n})" for s, q, n in key) + "]"


def epsilon_prv(
    history: Sequence[Mapping[str, Any]], delta: float, eps_error: float = DEFAULT_EPS_ERROR
) -> float:
    """Upper bound on ε at ``delta`` of the composed ``history``, from Opacus' PRV accountant.

    The bound is the numerical estimate plus ``eps_error`` (and uses δ - δ/1000, Opacus' default
    ``delta_error``), so it is a guarantee, not an estimate.
    """
    history = validate_history(list(history))
    delta = validate_delta(delta)
    if not 0 < eps_error <= 10:
        raise ValueError(f"eps_error must be in (0, 10], got {eps_error}")
    return _prv_upper(_key(history), delta, float(eps_error))


def epsilon_rdp(history: Sequence[Mapping[str, Any]], delta: float) -> float:
    """ε at ``delta`` of the composed ``history``, from Opacus' RDP accountant (default orders)."""
    history = validate_history(list(history))
    return _rdp(_key(history), validate_delta(delta))


def _check_work(key: Key, delta: float) -> None:
    """Refuse a history whose numerical accounting would exceed the work limits (the same grid bound as
    the PRV accountant's, so no accountant here can be stalled by a hostile history)."""
    check_size(key)
    if not key:
        return
    domain = prv_domain(key, DEFAULT_EPS_ERROR, delta / 1000)
    if domain.size > MAX_PRV_POINTS or domain.size * len(key) > MAX_PRV_WORK:
        raise AccountingError(
            f"history {_describe(key)} would need {domain.size:,} grid points at δ={delta:g} (limits: "
            f"{MAX_PRV_POINTS:,} points, {MAX_PRV_WORK:,} phases × points): refused rather than accounted slowly"
        )


#: Google's dp-accounting PLD accountant: its value discretisation interval. Its pessimistic estimate
#: (the library's default) is an upper bound on ε; a coarser interval only adds pessimism (1e-3 is within
#: 1e-3 of 1e-4 on the published vectors, at a tenth of the time).
PLD_DISCRETISATION = 1e-3
PLD_ACCOUNTANT = "dp_accounting.pld.PLDAccountant: pessimistic estimate, value discretisation 1e-3"


@lru_cache(maxsize=512)
def _pld_grouped(key: Key, delta: float) -> float:
    if not key:
        return 0.0
    _check_work(key, delta)
    import dp_accounting as dpa  # imported on use: it takes seconds, and only audits need it
    from dp_accounting import pld

    event = dpa.ComposedDpEvent(
        [
            dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), n)
            for sigma, q, n in key
        ]
    )
    accountant = pld.PLDAccountant(
        dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=PLD_DISCRETISATION
    )
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            accountant.compose(event)
            eps = float(accountant.get_epsilon(delta))
    except (RuntimeError, ValueError, OverflowError, FloatingPointError, MemoryError) as e:
        raise AccountingError(
            f"the PLD accountant could not compute ε at δ={delta:g} for history {_describe(key)} ({e})"
        ) from e
    if not math.isfinite(eps):
        raise AccountingError(
            f"the PLD accountant returned ε={eps} for history {_describe(key)} at δ={delta:g}"
        )
    return max(eps, 0.0)


def epsilon_pld(history: Sequence[Mapping[str, Any]], delta: float) -> float:
    """ε at ``delta`` of the composed ``history`` from Google's dp-accounting PLD accountant: an
    accountant independent of Opacus' (another implementation and another method: privacy loss
    distributions composed by FFT). The pessimistic estimate, so an upper bound like PRV's."""
    history = validate_history(list(history))
    return _pld_grouped(group_phases(_key(history)), validate_delta(delta))


def epsilon(
    history: Sequence[Mapping[str, Any]], delta: float, eps_error: float = DEFAULT_EPS_ERROR
) -> Epsilon:
    """ε of the composed ``history`` at ``delta`` from both accountants."""
    return Epsilon(
        prv_upper=epsilon_prv(history, delta, eps_error),
        prv_eps_error=float(eps_error),
        rdp=epsilon_rdp(history, delta),
    )


# ------------------------------------------------------------------------------------------ calibration


def calibrate_noise(
    prior_history: Sequence[Mapping[str, Any]],
    sample_rate: float,
    steps: int,
    target_epsilon: float,
    delta: float,
    eps_error: float = DEFAULT_EPS_ERROR,
) -> float:
    """The smallest σ such that ``prior_history`` + (σ, q, steps) stays within ``target_epsilon``.

    ε is the PRV upper bound at ``delta``. Unlike Opacus' ``make_private_with_epsilon``, what was
    already spent on the dataset counts: the new phase is composed with ``prior_history``. The result
    is rounded *up* (it satisfies the bound); σ·(1 - SIGMA_RTOL) does not.

    Raises BudgetError when the prior history alone has spent the target, or when the σ needed lies
    outside [SIGMA_MIN, SIGMA_MAX] (the message gives the ε range reachable for this q and steps).
    """
    prior = validate_history(list(prior_history))
    make_entry(1.0, sample_rate, steps)  # validates q and steps with the same messages
    delta = validate_delta(delta)
    if not _is_number(target_epsilon) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise BudgetError(f"target ε must be a finite number > 0, got {target_epsilon!r}")
    if steps == 0:
        raise BudgetError("steps must be > 0 to calibrate noise")

    prior_key = _key(prior)
    if prior_key:
        spent = _prv_upper(prior_key, delta, eps_error)
        if spent >= target_epsilon:
            raise BudgetError(
                f"privacy budget already spent: earlier runs on this dataset used ε={spent:.4f} at δ={delta:g} "
                f"(PRV upper bound; RDP gives {_rdp(prior_key, delta):.4f}), target is ε={target_epsilon:g}"
            )

    def eps_at(sigma: float) -> float:
        return _prv_upper(prior_key + ((sigma, float(sample_rate), int(steps)),), delta, eps_error)

    def out_of_range(reason: str) -> BudgetError:
        lo_eps = eps_at(SIGMA_MAX)
        try:
            hi_eps = f"{eps_at(SIGMA_MIN):.4f}"
        except AccountingError:
            hi_eps = f"{_rdp(prior_key + ((SIGMA_MIN, float(sample_rate), int(steps)),), delta):.4f} (RDP)"
        return BudgetError(
            f"{reason}: with q={sample_rate:g} and {steps} steps (after earlier runs on this dataset), "
            f"σ in [{SIGMA_MIN:g}, {SIGMA_MAX:g}] reaches ε from {lo_eps:.4f} (σ={SIGMA_MAX:g}) to {hi_eps} "
            f"(σ={SIGMA_MIN:g}) at δ={delta:g}; target is ε={target_epsilon:g}"
        )

    # RDP bounds PRV from above and is fast, so it usually settles this without PRV, which is slow
    # at very large σ.
    max_key = prior_key + ((SIGMA_MAX, float(sample_rate), int(steps)),)
    if _rdp_integer_orders(max_key, delta) > target_epsilon and eps_at(SIGMA_MAX) > target_epsilon:
        if prior_key:
            spent = _prv_upper(prior_key, delta, eps_error)
            raise BudgetError(
                f"privacy budget already spent: earlier runs on this dataset used ε={spent:.4f} of "
                f"ε={target_epsilon:g} at δ={delta:g}; what is left is too little for even σ={SIGMA_MAX:g} "
                f"over {steps} steps at q={sample_rate:g}"
            )
        raise out_of_range(f"target ε is too small: even σ={SIGMA_MAX:g} exceeds it")

    def gap(sigma: float) -> float:
        """ε(σ) - target; > 0 means σ is too small."""
        try:
            return eps_at(sigma) - target_epsilon
        except AccountingError:
            return math.inf  # PRV gives up only far beyond any budget worth calibrating to

    # Bracket the answer cheaply first: RDP is analytic (milliseconds) and looser than PRV, so the σ it
    # calibrates is a little above the PRV answer. Each PRV evaluation costs 0.1-1 s, hence the care.
    hi = min(_rdp_sigma(prior_key, float(sample_rate), int(steps), target_epsilon, delta), SIGMA_MAX)
    g_hi = gap(hi)
    while g_hi > 0:
        hi = min(hi * _BRACKET, SIGMA_MAX)
        g_hi = gap(hi)
    lo, g_lo = hi, g_hi
    while g_lo <= 0:
        if lo == SIGMA_MIN:
            raise out_of_range(f"target ε is too large: σ below {SIGMA_MIN:g} would be needed")
        hi, g_hi = lo, g_lo
        lo = max(lo / _BRACKET, SIGMA_MIN)
        g_lo = gap(lo)

    # Invariant: gap(lo) > 0 >= gap(hi). ε is smooth in log σ, so take secant steps there from the two
    # latest evaluations, then probe a hair across each new point: the pair (point, probe) gives an
    # almost exact local slope (a Newton step) and the probe closes the bracket as soon as the point
    # is within SIGMA_RTOL of the root. A few rounds instead of the ~12 of a bisection; fall back to
    # bisection whenever a step would leave the bracket.
    step = SIGMA_RTOL * 0.9
    recent = [(lo, g_lo), (hi, g_hi)]
    while hi / lo - 1 > SIGMA_RTOL:
        (x1, g1), (x2, g2) = recent[-2], recent[-1]
        u_lo, u_hi = math.log(lo), math.log(hi)
        u = math.nan
        if math.isfinite(g1) and math.isfinite(g2) and g1 != g2:
            u = math.log(x2) - g2 * (math.log(x2) - math.log(x1)) / (g2 - g1)
        if not u_lo < u < u_hi:
            u = (u_lo + u_hi) / 2
        x = math.exp(u)
        g = gap(x)
        recent.append((x, g))
        if g > 0:
            lo, g_lo = x, g
        else:
            hi, g_hi = x, g
        probe = x * (1 + step) if g > 0 else x / (1 + step)
        if lo < probe < hi:
            g = gap(probe)
            recent.append((probe, g))
            if g > 0:
                lo, g_lo = probe, g
            else:
                hi, g_hi = probe, g
    return hi


def _rdp_sigma(prior_key: Key, q: float, steps: int, target: float, delta: float) -> float:
    """σ calibrated with the RDP accountant (a starting point for the PRV search, not a result)."""
    lo, hi = SIGMA_MIN, SIGMA_MAX
    if _rdp_integer_orders(prior_key + ((lo, q, steps),), delta) <= target:
        return lo
    if _rdp_integer_orders(prior_key + ((hi, q, steps),), delta) > target:
        return hi
    while hi / lo - 1 > 1e-2:
        mid = math.sqrt(lo * hi)
        if _rdp_integer_orders(prior_key + ((mid, q, steps),), delta) > target:
            lo = mid
        else:
            hi = mid
    return hi
