"""What a dataset has spent according to the owner's ledger: one rule, used by the server that enforces
grants and by the auditor who checks them.

A data owner's receipt carries the *cumulative* history of its dataset: every DP phase run on it so far,
with run ids (including runs of datasets it inherits). One history may hold several phases with the
same (run id, σ, q): a run whose σ changes and later changes back (σ A, then B, then A again) has two
real A phases, and both were spent. Successive receipts of one dataset repeat the earlier runs, and a
run's phases can grow between receipts (their steps are recorded ahead of execution).

So the ledger's history of a (client, dataset) is built per (run id, σ, q) key: **within** one history
the steps of the phases with that key are summed (they are distinct phases); **across** histories the
largest of those per-history sums is taken (later receipts repeat earlier ones). Nothing is counted
twice, no receipt's total steps for a key are ever reduced (the ledger holds, for each key, at least
what any single accepted receipt stated for it), and ε is the composition of that union at the grant's
δ (PRV upper bound), never a sum of ε values.

A new receipt must state every key the ledger already holds for its dataset, with at least as many
steps in total (its phases of that key summed): a receipt that omits one was made by a machine whose local accounting did not count that run,
so its own ε understates what the dataset has spent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from offsite.errors import FormatError
from offsite.privacy import accounting

#: How the server names the accountant of the ε it records (the PRV upper bound, never an estimate).
SPENT_ACCOUNTANT = "opacus-prv-upper"

PhaseKey = tuple[str, float, float]


def _key(entry: Mapping[str, Any], where: str) -> PhaseKey:
    run_id = entry.get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise FormatError(
            f"{where} has no run id: the ledger could not tell this phase from another run's, so it is refused"
        )
    return run_id, float(entry["noise_multiplier"]), float(entry["sample_rate"])


def _per_key(history: Sequence[Mapping[str, Any]], where: str) -> dict[PhaseKey, int]:
    """Steps per (run id, σ, q) within one history: phases with the same key are distinct, so summed."""
    steps: dict[PhaseKey, int] = {}
    for i, entry in enumerate(history):
        key = _key(entry, f"{where} entry {i}")
        steps[key] = steps.get(key, 0) + int(entry["steps"])
    return steps


def union(histories: Iterable[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One phase per (run id, σ, q): the largest over ``histories`` of each history's summed steps for that
    key, in first-seen order."""
    steps: dict[PhaseKey, int] = {}
    for h, history in enumerate(histories):
        for key, n in _per_key(history, f"history {h}").items():
            steps[key] = max(steps.get(key, 0), n)
    return [
        {
            "run_id": run_id,
            "mechanism": accounting.MECHANISM,
            "noise_multiplier": sigma,
            "sample_rate": q,
            "steps": n,
        }
        for (run_id, sigma, q), n in steps.items()
    ]


def omission(held: Sequence[Mapping[str, Any]], cumulative: Sequence[Mapping[str, Any]]) -> str | None:
    """None if ``cumulative`` (a new receipt's history) states every key of ``held`` (the ledger's union)
    with at least its steps (the receipt's phases of one key summed); else what it leaves out."""
    stated = _per_key(cumulative, "cumulative_history")
    held_steps = _per_key(held, "the ledger's history")
    for key, n in held_steps.items():
        if n <= 0:
            continue
        run_id, sigma, q = key
        if key not in stated:
            return (
                f"its cumulative history omits run {run_id} (σ={sigma:g}, q={q:g}, {n} steps), "
                "which the ledger already holds for this dataset"
            )
        if stated[key] < n:
            return (
                f"its cumulative history states {stated[key]} steps for run {run_id} (σ={sigma:g}, q={q:g}); "
                f"the ledger already holds {n}"
            )
    return None


def spent(history: Sequence[Mapping[str, Any]], delta: float) -> float:
    """ε of ``history`` composed at ``delta``: the PRV upper bound the server enforces grants with."""
    return accounting.epsilon_prv(history, delta, accounting.DEFAULT_EPS_ERROR)
