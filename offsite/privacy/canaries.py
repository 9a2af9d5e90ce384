"""The statistics of the one-run privacy audit (Steinke, Nasr and Jagielski, NeurIPS 2023).

The game: m canary records, each included in the training set independently with probability ½. After
training, an auditor who sees the model (and the canaries, which are public) guesses "in" for some
canaries, "out" for others, and abstains on the rest: r guesses in all, v of them correct. If the
training is (ε, δ)-DP with respect to adding or removing one record, the paper's main result for
approximate DP (computed as in the code of its appendix) bounds how likely many correct guesses are:

    P[V ≥ v] ≤ β + 2·m·δ·α,  where  β = P[Binomial(r, p) ≥ v],  p = e^ε / (1 + e^ε),
                                    α = max_{1 ≤ i ≤ v} P[v - i ≤ Binomial(r, p) < v] / i.

(With δ = 0 this is the statement that each guess is right with probability at most p, as for ε-DP
randomised response, whatever the guesser does.) The right-hand side is the **p-value** of the
hypothesis "the training is (ε, δ)-DP" given v correct out of r. The **ε lower bound** at confidence
1 - a is the largest ε whose p-value is below a: an (ε', δ)-DP mechanism is also (ε'', δ)-DP for every
ε'' ≥ ε', so if the true ε' were below the bound, the test at the bound would have rejected a true
hypothesis, which happens with probability at most a. The search (``epsilon_lower_bound``) returns an ε
whose p-value it has computed to be below a (or 0), so the bound is valid even where the p-value is not
monotone in ε.

Which guesses: canaries are ranked by a score (higher = more likely included); the k₊ highest are
guessed "in", the k₋ lowest "out". The guesses depend only on the scores (a function of the trained
model and the public canaries) and on k₊, k₋ fixed in advance, as the theorem requires. We try a fixed
set of (k₊, k₋) chosen from m alone (``hypotheses``): r in {10, 20, 50, 100, 200, 500, 1000, …} up to m,
and r = m, each one-sided (k₊ = r, k₋ = 0) and balanced (k₊ = ⌈r/2⌉, k₋ = ⌊r/2⌋). Each is tested at
significance a / K (Bonferroni over the K pairs), and the reported bound is the largest of the K bounds:
the chance that any of them exceeds the true ε is at most K · a / K = a.

Also reported, with no confidence attached: the AUROC of the scores (Mann–Whitney, ties count ½) and
the TPR at FPR ≤ 1% (the largest fraction of included canaries scoring at or above a threshold that at
most 1% of excluded canaries reach; no interpolation between thresholds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom, rankdata

#: The confidence of the reported lower bound.
CONFIDENCE = 0.95
#: Numbers of guesses tried (those up to m, and m itself).
GUESS_COUNTS = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000)
#: The ε search stops when its bracket is this narrow; the returned end is the valid (lower) one.
EPSILON_TOLERANCE = 1e-4
#: ε beyond which the search does not look (p = e^ε/(1+e^ε) is 1 - 2e-22 there).
EPSILON_SEARCH_MAX = 50.0
#: The FPR at which the TPR is reported.
REPORTED_FPR = 0.01

#: Defaults of the audit run (``offsite.canary_audit``; measured in docs/privacy.md), kept here so that the
#: command line can show them without loading the model code.
DEFAULT_CANARIES = 1000
DEFAULT_CANARY_WORDS = 12
DEFAULT_LR = 1e-2
DEFAULT_PHYSICAL_BATCH = 64


def guess_accuracy(epsilon: float) -> float:
    """p = e^ε / (1 + e^ε): how often a guess may be right under ε-DP (randomised response)."""
    return 1.0 / (1.0 + math.exp(-epsilon))


def _check_counts(m: int, r: int, v: int) -> None:
    if not (isinstance(m, int) and isinstance(r, int) and isinstance(v, int)):
        raise ValueError(f"m, r and v must be whole numbers, got {m!r}, {r!r}, {v!r}")
    if not 0 <= v <= r <= m or m < 1:
        raise ValueError(f"need 0 ≤ v ≤ r ≤ m and m ≥ 1, got m={m}, r={r}, v={v}")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[at least v of r guesses correct] for an (ε, δ)-DP training on m canaries."""
    _check_counts(m, r, v)
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"ε must be finite and ≥ 0, got {epsilon!r}")
    if not 0 <= delta < 1:
        raise ValueError(f"δ must be in [0, 1), got {delta!r}")
    p = guess_accuracy(epsilon)
    tail = float(binom.sf(v - 1, r, p))  # P[Binomial(r, p) ≥ v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    below = binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[B = v-1], P[B = v-2], …, P[B = 0]
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, significance: float) -> float:
    """The largest ε (to ``EPSILON_TOLERANCE``) rejected at ``significance`` by v correct of r guesses.

    The returned value is always one whose p-value was computed to be below ``significance`` (or 0: no
    ε is rejected), so it is a valid bound whether or not the p-value is monotone in ε.
    """
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance!r}")
    _check_counts(m, r, v)

    def rejected(eps: float) -> bool:
        return p_value(m, r, v, eps, delta) < significance

    lo, hi = 0.0, 1.0  # invariant: lo is 0 or rejected
    while rejected(hi):
        lo, hi = hi, 2 * hi
        if hi > EPSILON_SEARCH_MAX:
            return lo
    while hi - lo > EPSILON_TOLERANCE:
        mid = (lo + hi) / 2
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class Hypothesis:
    """Guess "in" for the k_plus highest scores and "out" for the k_minus lowest; abstain otherwise."""

    k_plus: int
    k_minus: int

    @property
    def guesses(self) -> int:
        return self.k_plus + self.k_minus


def hypotheses(m: int) -> list[Hypothesis]:
    """The (k₊, k₋) pairs tried for m canaries; a function of m alone, fixed before any score is seen."""
    if m < 1:
        raise ValueError("need at least one canary")
    counts = sorted({r for r in GUESS_COUNTS if r < m} | {m})
    out: list[Hypothesis] = []
    for r in counts:
        for h in (Hypothesis(r, 0), Hypothesis((r + 1) // 2, r // 2)):
            if h not in out:
                out.append(h)
    return out


def _as_arrays(scores: Sequence[float], included: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    if s.ndim != 1 or s.shape != inc.shape or s.size == 0:
        raise ValueError("scores and included must be non-empty sequences of the same length")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s, inc


def correct_guesses(scores: Sequence[float], included: Sequence[bool], h: Hypothesis) -> int:
    """How many of ``h``'s guesses are right. Ties in score are broken by position (stable order),
    which depends on the canaries' order only, never on which were included."""
    s, inc = _as_arrays(scores, included)
    if h.guesses > s.size:
        raise ValueError(f"{h.guesses} guesses for {s.size} canaries")
    order = np.argsort(-s, kind="stable")  # highest score first
    guessed_in = order[: h.k_plus]
    guessed_out = order[s.size - h.k_minus :] if h.k_minus else order[:0]
    return int(inc[guessed_in].sum() + (~inc[guessed_out]).sum())


@dataclass(frozen=True)
class HypothesisResult:
    k_plus: int
    k_minus: int
    correct: int
    epsilon: float  # lower bound at the Bonferroni-corrected significance

    def to_dict(self) -> dict:
        return {
            "k_plus": self.k_plus,
            "k_minus": self.k_minus,
            "correct": self.correct,
            "epsilon": self.epsilon,
        }


@dataclass(frozen=True)
class OneRunBound:
    epsilon: float
    """The ε lower bound at ``confidence``: the largest of the per-hypothesis bounds."""
    confidence: float
    delta: float
    canaries: int
    significance_each: float
    results: tuple[HypothesisResult, ...]
    max_epsilon: float
    """The bound if every guess of some hypothesis were right: the most this audit could show."""

    @property
    def best(self) -> HypothesisResult:
        return max(self.results, key=lambda h: (h.epsilon, -h.k_plus - h.k_minus))

    def to_dict(self) -> dict:
        return {
            "epsilon": self.epsilon,
            "confidence": self.confidence,
            "delta": self.delta,
            "canaries": self.canaries,
            "significance_each": self.significance_each,
            "max_epsilon": self.max_epsilon,
            "best": self.best.to_dict(),
            "hypotheses": [h.to_dict() for h in self.results],
        }


def one_run_lower_bound(
    scores: Sequence[float], included: Sequence[bool], delta: float, confidence: float = CONFIDENCE
) -> OneRunBound:
    """The ε lower bound at ``confidence`` from one run's canary scores (higher = more likely in)."""
    s, inc = _as_arrays(scores, included)
    m = int(s.size)
    tried = hypotheses(m)
    each = _significance_each(m, confidence)
    results = []
    for h in tried:
        v = correct_guesses(s, inc, h)
        results.append(
            HypothesisResult(h.k_plus, h.k_minus, v, epsilon_lower_bound(m, h.guesses, v, delta, each))
        )
    best = max(r.epsilon for r in results)
    return OneRunBound(
        best, confidence, float(delta), m, each, tuple(results), max_epsilon(m, delta, confidence)
    )


def _significance_each(m: int, confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return (1 - confidence) / len(hypotheses(m))


def max_epsilon(m: int, delta: float, confidence: float = CONFIDENCE) -> float:
    """The largest bound an audit of m canaries can report: every guess of some hypothesis right.

    A claim at or above it cannot fail such an audit, however much the implementation leaks. (The bound
    grows with the number of correct guesses, so all-correct is the most; the tests check that.)
    """
    each = _significance_each(m, confidence)
    return max(epsilon_lower_bound(m, h.guesses, h.guesses, delta, each) for h in hypotheses(m))


def auroc(scores: Sequence[float], included: Sequence[bool]) -> float | None:
    """P[score of an included canary > score of an excluded one] (ties ½); None without both kinds."""
    s, inc = _as_arrays(scores, included)
    n_in, n_out = int(inc.sum()), int((~inc).sum())
    if n_in == 0 or n_out == 0:
        return None
    ranks = rankdata(s)  # average ranks: a tie counts ½
    return float((ranks[inc].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def tpr_at_fpr(scores: Sequence[float], included: Sequence[bool], fpr: float = REPORTED_FPR) -> float | None:
    """The largest TPR of a rule "in if score ≥ t" whose FPR is at most ``fpr``; None without both kinds."""
    s, inc = _as_arrays(scores, included)
    ins, outs = np.sort(s[inc]), np.sort(s[~inc])
    if ins.size == 0 or outs.size == 0:
        return None
    thresholds = np.unique(s)
    fp = outs.size - np.searchsorted(outs, thresholds, side="left")  # excluded scoring ≥ t
    tp = ins.size - np.searchsorted(ins, thresholds, side="left")
    ok = fp <= fpr * outs.size
    return float(tp[ok].max() / ins.size) if ok.any() else 0.0
