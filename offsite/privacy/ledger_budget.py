"""What a dataset has spent according to the owner's ledger: one rule, used by the server that enforces
grants and by the auditor who checks them.

A data owner's receipt carries the *cumulative* history of its dataset: every DP phase run on it so far,
with run ids (including runs of datasets it inherits). Successive receipts of one dataset repeat the
earlier runs, and a run's entry can grow between receipts (its steps are recorded ahead of execution).
So the ledger's history of a (client, dataset) is the **union** of its accepted receipts' cumulative
histories: one phase per (run id, σ, q), with the largest step count any receipt states for it. Nothing
is counted twice, nothing a receipt ever stated is dropped, and ε is the composition of that union at
the grant's δ (PRV upper bound), never a sum of ε values.

A new receipt must state every phase the ledger already holds for its dataset, with at least as many
steps: a receipt that omits one was made by a machine whose local accounting did not count that run,
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


def union(histories: Iterable[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One phase per (run id, σ, q) with the largest step count any history states, in first-seen order."""
    steps: dict[PhaseKey, int] = {}
    for h, history in enumerate(histories):
        for i, entry in enumerate(history):
            key = _key(entry, f"history {h} entry {i}")
            steps[key] = max(steps.get(key, 0), int(entry["steps"]))
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
    """None if ``cumulative`` (a new receipt's history) states every phase of ``held`` (the ledger's union)
    with at least its steps; else what it leaves out."""
    stated: dict[PhaseKey, int] = {}
    for i, entry in enumerate(cumulative):
        key = _key(entry, f"cumulative_history[{i}]")
        stated[key] = max(stated.get(key, 0), int(entry["steps"]))
    for entry in held:
        key = _key(entry, "the ledger's history")
        if entry["steps"] <= 0:
            continue
        run_id, sigma, q = key
        if key not in stated:
            return (
                f"its cumulative history omits run {run_id} (σ={sigma:g}, q={q:g}, {entry['steps']} steps), "
                "which the ledger already holds for this dataset"
            )
        if stated[key] < entry["steps"]:
            return (
                f"its cumulative history states {stated[key]} steps for run {run_id} (σ={sigma:g}, q={q:g}); "
                f"the ledger already holds {entry['steps']}"
            )
    return None


def spent(history: Sequence[Mapping[str, Any]], delta: float) -> float:
    """ε of ``history`` composed at ``delta``: the PRV upper bound the server enforces grants with."""
    return accounting.epsilon_prv(history, delta, accounting.DEFAULT_EPS_ERROR)
