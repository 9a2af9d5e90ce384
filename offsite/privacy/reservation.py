"""Admitting a DP run against its dataset's budget: checks, overlaps, and the reservation of the whole run.

**Reservation.** ``reserve`` checks the request against the recorded budget (``offsite.privacy.history``),
plans the run against the recorded history and records its whole phase, all under the histories' one
lock and before the run starts: two runs cannot plan against the same prior, and a crash never leaves
spent budget unrecorded. An interrupted run stays counted in full; nothing from it was released, so
this over-counts, never under-counts. ``before_record`` runs after every check and before anything is
written (``offsite.tune`` commits its step-0 training state there), so a crash between the two leaves a
training state whose reservation ``confirm_reservation`` completes on resume, and never a reservation
without a state to resume under.

**Budgets.** The run's target is the recorded budget's ε (or a smaller ``epsilon``) at its δ; a larger
ε or another δ is refused with a pointer to ``offsite client set-budget``; the first run on a dataset
records its (ε, δ). The composed total is checked here, whatever planned the run, and so is the total
of every dataset that inherits this one (their compositions include this run).

**Overlap.** A run whose records overlap another dataset's recorded records (``offsite.privacy.records``),
where neither composes with the other and no separate budget was declared between them, is refused
unless it passes ``inherit`` (compose with that dataset's history) or ``new_budget`` (a separate budget,
recorded, with a warning to the caller).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from offsite.errors import BudgetError, OffsiteError
from offsite.privacy import accounting, records
from offsite.privacy.history import (
    FIRST_RUN,
    Budget,
    DatasetHistory,
    budgets_dir,
    closure,
    composed,
    dataset_ids,
    locked,
    read,
    read_all,
    records_path,
    same_phase,
    upsert,
    utc_now,
    validate_dataset_id,
    validate_run_id,
    write,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Request:
    """What a run asks of its dataset's budget (its options, and the records it was given)."""

    epsilon: float | None  # None: the recorded budget's ε
    delta: float | None  # None: the recorded budget's δ (first run: the planner's default)
    records: Sequence[bytes]  # canonical form of every record (``offsite.data.Record.canonical``)
    inherit: Sequence[str] = ()
    new_budget: bool = False


@dataclass(frozen=True)
class Target:
    """What a plan must respect: ``prior`` composed with the run stays within ``epsilon`` at ``delta``."""

    prior: list[dict[str, Any]]
    epsilon: float
    delta: float | None  # None only on a dataset's first run: the planner chooses δ


@dataclass(frozen=True)
class Planned(Generic[T]):
    entry: Mapping[str, Any]  # the whole run's mechanism phase
    delta: float  # the δ the plan uses
    result: T


def reserve(
    dataset_id: str,
    run_id: str,
    request: Request,
    plan: Callable[[Target], Planned[T]],
    client_dir: str | os.PathLike,
    *,
    before_record: Callable[[T], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> T:
    """Check the request, plan the run and record its whole phase, all under one lock.

    Nothing is written unless every check passes. ``before_record(result)`` runs after the checks and
    before anything is written (see the module docstring).
    """
    validate_run_id(run_id)
    with locked(client_dir):
        planned = _admit(dataset_id, run_id, request, plan, client_dir, before_record, on_warning)
    return planned.result


def confirm_reservation(
    dataset_id: str,
    run_id: str,
    request: Request,
    planned: Planned[Any],
    client_dir: str | os.PathLike,
    *,
    on_warning: Callable[[str], None] | None = None,
) -> None:
    """On resume: make sure the interrupted run's reservation is recorded.

    It is, unless the run was killed after committing its step-0 state and before writing the history;
    then the reservation is made now, under the same checks as ``reserve`` (the budget must still allow
    the run's plan, or the run is refused).
    """
    validate_run_id(run_id)
    with locked(client_dir):
        mine = [e for e in read(dataset_id, client_dir).entries if e["run_id"] == run_id]
        if any(same_phase(e, planned.entry) and e["steps"] >= planned.entry["steps"] for e in mine):
            return

        def fixed(target: Target) -> Planned[Any]:
            if target.delta is not None and target.delta != planned.delta:
                raise BudgetError(
                    f"the interrupted run was planned at δ={planned.delta:g} but dataset {dataset_id}'s "
                    f"budget is now at δ={target.delta:g}; remove its training state to start a new run"
                )
            return planned

        _admit(dataset_id, run_id, request, fixed, client_dir, None, on_warning)


def _admit(
    dataset_id: str,
    run_id: str,
    request: Request,
    plan: Callable[[Target], Planned[T]],
    client_dir: str | os.PathLike,
    before_record: Callable[[T], None] | None,
    on_warning: Callable[[str], None] | None,
) -> Planned[T]:
    """The body of a reservation; the caller holds the lock."""
    all_histories = read_all(client_dir)
    history = all_histories.get(dataset_id) or DatasetHistory(dataset_id)
    all_histories[dataset_id] = history
    new_inherits = _check_inherit(dataset_id, request.inherit, history, all_histories)
    epsilon, delta = _resolve_budget(history, request)
    graph = {d: list(h.inherited_ids) for d, h in all_histories.items()}
    graph[dataset_id] = [*history.inherited_ids, *new_inherits]

    run_hashes, own_hashes, separate = _check_overlap(dataset_id, request, graph, all_histories, client_dir)

    composing = closure(dataset_id, graph)
    planned = plan(Target(composed(composing, all_histories), epsilon, delta))
    entry = accounting.validate_entry(dict(planned.entry), "planned entry")
    budget = history.budget or Budget(epsilon, planned.delta)
    if delta is not None and planned.delta != delta:
        raise BudgetError(f"the plan uses δ={planned.delta:g}, not dataset {dataset_id}'s δ={delta:g}")
    _check_within(dataset_id, composed(composing, all_histories), entry, epsilon, budget.delta)
    for other, h in all_histories.items():  # datasets that inherit this one count this run too
        if other != dataset_id and h.budget is not None and dataset_id in closure(other, graph):
            _check_within(other, composed(closure(other, graph), all_histories), entry, *_pair(h.budget))

    if before_record is not None:
        before_record(planned.result)
    # Hashes before the history: a crash between the two leaves hashes without a run (more
    # refusals later, never fewer), not a run whose records are unknown.
    records.write_set(records_path(dataset_id, client_dir), records.union(own_hashes, run_hashes))
    now = utc_now()
    if history.budget is None:
        history.budget_changes.append(
            {"epsilon": budget.epsilon, "delta": budget.delta, "at": now, "how": FIRST_RUN}
        )
    history.inherits += [{"dataset_id": d, "at": now} for d in new_inherits]
    history.new_budget_despite += [
        {"dataset_id": d, "shared_records": n, "at": now} for d, n in separate.items()
    ]
    upsert(history.entries, run_id, entry)
    write(history, client_dir)
    if on_warning is not None:
        for d, n in separate.items():
            on_warning(
                f"{n} records of this run are also in dataset {d}; --new-budget gives them a separate "
                f"budget under {dataset_id} (recorded in its history). Those records are then protected "
                "by each budget separately, not by one: their total privacy loss is the composition of both."
            )
    return planned


def _pair(budget: Budget) -> tuple[float, float]:
    return budget.epsilon, budget.delta


def _check_inherit(
    dataset_id: str,
    inherit: Sequence[str],
    history: DatasetHistory,
    all_histories: Mapping[str, DatasetHistory],
) -> list[str]:
    new = []
    for parent in inherit:
        validate_dataset_id(parent)
        if parent == dataset_id:
            raise OffsiteError(f"--inherit {parent}: a dataset cannot inherit itself")
        if parent not in all_histories:
            raise OffsiteError(f"--inherit {parent}: no budget history for dataset {parent} on this machine")
        if parent not in history.inherited_ids and parent not in new:
            new.append(parent)
    return new


def _resolve_budget(history: DatasetHistory, request: Request) -> tuple[float, float | None]:
    """(ε the run must stay within, δ to compose at) from the recorded budget and the request."""
    d, budget = history.dataset_id, history.budget
    change = f"`offsite client set-budget {d} --epsilon E --delta D`"
    if budget is None:
        if history.entries:
            raise BudgetError(
                f"dataset {d} has recorded runs but no budget (its history was written by an older "
                f"version of offsite); set one with {change}: the runs recorded so far count against it"
            )
        if request.epsilon is None:
            raise BudgetError(
                f"dataset {d} has no budget yet: its first DP run must pass --epsilon (and --delta, "
                f"or take the default), which become its budget; or set one with {change}"
            )
        return request.epsilon, request.delta
    if request.delta is not None and request.delta != budget.delta:
        raise BudgetError(
            f"dataset {d}'s budget is (ε={budget.epsilon:g}, δ={budget.delta:g}) and --delta "
            f"{request.delta:g} differs: every run on a dataset composes at its one δ. Omit --delta, or "
            f"change the budget explicitly with {change}"
        )
    if request.epsilon is not None and request.epsilon > budget.epsilon:
        raise BudgetError(
            f"--epsilon {request.epsilon:g} is above dataset {d}'s budget ε={budget.epsilon:g} "
            f"(δ={budget.delta:g}). Pass the same or a smaller --epsilon (or none), or raise the budget "
            f"explicitly with {change}"
        )
    return (budget.epsilon if request.epsilon is None else request.epsilon), budget.delta


def _check_overlap(
    dataset_id: str,
    request: Request,
    graph: Mapping[str, Sequence[str]],
    all_histories: Mapping[str, DatasetHistory],
    client_dir: str | os.PathLike,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(this run's record hashes, the dataset's recorded ones, overlaps declared separate by this run).

    Refuses if the run's records overlap a dataset it is not linked with (neither composes with the
    other, and neither declared a separate budget against the other) and ``new_budget`` is not set.
    """
    others = {
        d: records_path(d, client_dir)
        for d in dataset_ids(client_dir)
        if d != dataset_id and records_path(d, client_dir).exists()
    }
    own_path = records_path(dataset_id, client_dir)
    key = records.require_key(budgets_dir(client_dir), have_hashes=bool(others) or own_path.exists())
    run_hashes = records.hash_records(request.records, key)
    mine = all_histories[dataset_id]
    unresolved = {}
    for other, path in others.items():
        shared = records.count_shared(run_hashes, records.read_set(path))
        if not shared:
            continue
        theirs = all_histories.get(other)
        linked = (
            other in closure(dataset_id, graph)
            or dataset_id in closure(other, graph)
            or other in mine.declared_separate
            or (theirs is not None and dataset_id in theirs.declared_separate)
        )
        if not linked:
            unresolved[other] = shared
    if unresolved and not request.new_budget:
        listed = ", ".join(
            f"{d} ({n} of this run's {len(run_hashes)} distinct records)" for d, n in unresolved.items()
        )
        first = next(iter(unresolved))
        raise BudgetError(
            f"records given to this run on dataset {dataset_id} are also in {listed}: under another "
            "dataset id they would get a fresh budget. Say how to treat them: --inherit "
            f"{first} (that dataset's runs count towards this dataset's budget) or --new-budget (a "
            "separate budget anyway, recorded on this machine)"
        )
    return run_hashes, records.read_set(own_path), unresolved


def _check_within(
    dataset_id: str, prior: list[dict[str, Any]], entry: Mapping[str, Any], epsilon: float, delta: float
) -> None:
    total = accounting.epsilon_prv([*prior, entry], delta)
    if total > epsilon * (1 + 1e-9):
        raise BudgetError(
            f"this run would bring dataset {dataset_id}'s total to ε={total:.3f} at δ={delta:g}, "
            f"above its budget ε={epsilon:g}"
        )
