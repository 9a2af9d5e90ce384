"""Privacy budgets and spending histories per dataset, on the data owner's machine.

One JSON file per dataset id, ``<client_dir>/budgets/<dataset_id>.json`` (mode 0600), declared by
``HistoryFile`` below (format ``offsite-budget-history``, version 2)::

    {"format": "offsite-budget-history", "format_version": 2, "dataset_id": "clinic",
     "budget_changes": [{"epsilon": 8.0, "delta": 1e-05, "at": "2025-01-01T10:00:00Z", "how": "first-run"},
                        {"epsilon": 10.0, "delta": 1e-05, "at": "...", "how": "set-budget"}],
     "inherits": [{"dataset_id": "clinic-2024", "at": "..."}],
     "new_budget_despite": [{"dataset_id": "other", "shared_records": 12, "at": "..."}],
     "entries": [{"run_id": "...", "mechanism": "poisson-subsampled-gaussian", "noise_multiplier": 1.1,
                  "sample_rate": 0.01, "steps": 500, "created_at": "...", "updated_at": "..."}]}

and, beside it, ``<dataset_id>.records``: keyed hashes of every record its runs were given
(``offsite.privacy.records``). Nothing here is ever published; receipts carry the composed mechanism
history and the budget (``budget_for_receipt``).

**A budget is a pair (ε, δ) fixed per dataset.** The first DP run on a dataset records its ε and its
effective δ (the default if none was given) as the budget. Later runs compose at that δ, may ask for
the same or a smaller ε (a stricter target for that run), and are refused if they ask for a larger ε
or another δ; ``set_budget`` (``offsite client set-budget``) is the one way to change it, and every
change is kept with its time.

**Composition, never addition.** ε spent on a dataset is the PRV upper bound of the composition of
its entries (mechanism phases) and those of every dataset it inherits, transitively.

Runs are admitted (budget checks, overlaps, the whole run recorded before it starts) by
``offsite.privacy.reservation``; this module holds the record itself. One lock guards every file here
(``locked``): a reservation reads several datasets.

**Version 1 files** (no budget) are read: their runs count, and the dataset has no budget until
``set_budget`` gives it one; a DP run on it is refused until then. They are rewritten as version 2
on the next change.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from offsite.errors import BudgetError, FormatError, OffsiteError
from offsite.fileio import canonical_json, exclusive_lock, fsync_directory, write_bytes_atomic
from offsite.formats.schema import Schema, parse, validate
from offsite.privacy import accounting, records

FORMAT = "offsite-budget-history"
FORMAT_VERSION = 2
BUDGETS_DIR = "budgets"
LOCK_FILE = ".lock"
FIRST_RUN, SET_BUDGET = "first-run", "set-budget"

# Ids come from untrusted places (bundles, command lines, receipts): no separators, no "..", no
# leading dot (hidden files, "." and ".."), bounded length, so an id can only ever name one file here.
_DATASET_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_RUN_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_TIME = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$"

DatasetId = Annotated[str, Field(pattern=f"^{_DATASET_ID.pattern}$")]
Time = Annotated[str, Field(pattern=_TIME)]


# ------------------------------------------------------------------------------------------ the format


class BudgetChange(Schema):
    epsilon: Annotated[float, Field(gt=0)]
    delta: Annotated[float, Field(gt=0, lt=1)]
    at: Time
    how: Literal["first-run", "set-budget"]


class Inherit(Schema):
    dataset_id: DatasetId
    at: Time


class NewBudgetDespite(Schema):
    dataset_id: DatasetId
    shared_records: Annotated[int, Field(ge=0)]
    at: Time


class Entry(Schema):
    run_id: Annotated[str, Field(pattern=f"^{_RUN_ID.pattern}$")]
    mechanism: Literal["poisson-subsampled-gaussian"]
    noise_multiplier: Annotated[float, Field(ge=accounting.SIGMA_FLOOR)]
    sample_rate: Annotated[float, Field(gt=0, le=1)]
    steps: Annotated[int, Field(ge=0)]
    created_at: Time
    updated_at: Time


class HistoryFile(Schema):
    """``budgets/<dataset_id>.json``, format version 2."""

    format: Literal["offsite-budget-history"]
    format_version: Literal[2]
    dataset_id: DatasetId
    budget_changes: list[BudgetChange]
    inherits: list[Inherit]
    new_budget_despite: list[NewBudgetDespite]
    entries: list[Entry]


class HistoryFileV1(Schema):
    """Version 1: entries only, no budget."""

    format: Literal["offsite-budget-history"]
    format_version: Literal[1]
    dataset_id: DatasetId
    entries: list[Entry]


class _Version(Schema):
    model_config = {**Schema.model_config, "extra": "ignore"}
    format: Literal["offsite-budget-history"]
    format_version: int


# ------------------------------------------------------------------------------------------ ids, paths


def validate_dataset_id(dataset_id: Any) -> str:
    """Return ``dataset_id`` if it is a safe id (``[A-Za-z0-9._-]{1,128}``, no leading dot)."""
    if not isinstance(dataset_id, str) or not _DATASET_ID.fullmatch(dataset_id):
        raise OffsiteError(
            f"invalid dataset id {dataset_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ - "
            "(not starting with a dot)"
        )
    return dataset_id


def validate_run_id(run_id: Any) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise OffsiteError(f"invalid run id {run_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ : -")
    return run_id


def budgets_dir(client_dir: str | os.PathLike) -> Path:
    return Path(client_dir) / BUDGETS_DIR


def history_path(dataset_id: str, client_dir: str | os.PathLike) -> Path:
    """``<client_dir>/budgets/<dataset_id>.json``."""
    return budgets_dir(client_dir) / f"{validate_dataset_id(dataset_id)}.json"


def records_path(dataset_id: str, client_dir: str | os.PathLike) -> Path:
    return budgets_dir(client_dir) / f"{validate_dataset_id(dataset_id)}{records.SUFFIX}"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------ in memory


@dataclass(frozen=True)
class Budget:
    """The (ε, δ) pair in force for a dataset."""

    epsilon: float
    delta: float


@dataclass
class DatasetHistory:
    """One dataset's history as read (``version`` is None when nothing was ever recorded)."""

    dataset_id: str
    version: int | None = None
    budget_changes: list[dict[str, Any]] = field(default_factory=list)
    inherits: list[dict[str, Any]] = field(default_factory=list)
    new_budget_despite: list[dict[str, Any]] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def budget(self) -> Budget | None:
        if not self.budget_changes:
            return None
        last = self.budget_changes[-1]
        return Budget(last["epsilon"], last["delta"])

    @property
    def inherited_ids(self) -> list[str]:
        return [i["dataset_id"] for i in self.inherits]

    @property
    def declared_separate(self) -> list[str]:
        return [i["dataset_id"] for i in self.new_budget_despite]


def read(dataset_id: str, client_dir: str | os.PathLike) -> DatasetHistory:
    """The recorded history of ``dataset_id`` (empty if none); refuses damaged or unknown files."""
    path = history_path(dataset_id, client_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return DatasetHistory(dataset_id)
    what = f"budget history {path}"
    version = parse(_Version, data, what).format_version
    if version == 1:
        doc = parse(HistoryFileV1, data, what)
        history = DatasetHistory(dataset_id, 1, entries=[e.model_dump() for e in doc.entries])
    elif version == FORMAT_VERSION:
        doc = parse(HistoryFile, data, what)
        history = DatasetHistory(
            dataset_id,
            FORMAT_VERSION,
            [c.model_dump() for c in doc.budget_changes],
            [i.model_dump() for i in doc.inherits],
            [n.model_dump() for n in doc.new_budget_despite],
            [e.model_dump() for e in doc.entries],
        )
    else:
        raise FormatError(
            f"{what}: format version {version} is not one this version of offsite reads (1 or 2); "
            "it was written by a newer offsite"
        )
    if doc.dataset_id != dataset_id:
        raise FormatError(f"{what}: belongs to dataset {doc.dataset_id!r}, not {dataset_id!r}")
    return history


def write(history: DatasetHistory, client_dir: str | os.PathLike) -> None:
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dataset_id": history.dataset_id,
        "budget_changes": history.budget_changes,
        "inherits": history.inherits,
        "new_budget_despite": history.new_budget_despite,
        "entries": history.entries,
    }
    path = history_path(history.dataset_id, client_dir)
    validate(HistoryFile, doc, f"budget history {path}")  # never write what could not be read back
    write_bytes_atomic(path, canonical_json(doc), mode=0o600)


def load_history(dataset_id: str, client_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """This dataset's own recorded entries (empty if nothing was ever recorded)."""
    return read(dataset_id, client_dir).entries


def mechanism_history(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Entries reduced to what accounting and receipts need (run id kept, timestamps dropped)."""
    keep = ("run_id", *accounting.ENTRY_KEYS)
    return [{k: e[k] for k in keep if k in e} for e in entries]


def dataset_ids(client_dir: str | os.PathLike) -> list[str]:
    """Every dataset id with a recorded history on this machine."""
    directory = budgets_dir(client_dir)
    if not directory.is_dir():
        return []
    ids = (p.stem for p in directory.glob("*.json"))
    return sorted(i for i in ids if _DATASET_ID.fullmatch(i))


def read_all(client_dir: str | os.PathLike) -> dict[str, DatasetHistory]:
    return {d: read(d, client_dir) for d in dataset_ids(client_dir)}


def closure(dataset_id: str, graph: Mapping[str, Sequence[str]]) -> list[str]:
    """``dataset_id`` and every dataset it inherits, transitively (cycles are fine)."""
    seen, todo = [dataset_id], [dataset_id]
    while todo:
        for parent in graph.get(todo.pop(), ()):
            if parent not in seen:
                seen.append(parent)
                todo.append(parent)
    return seen


def composed(ids: Sequence[str], all_histories: Mapping[str, DatasetHistory]) -> list[dict[str, Any]]:
    return [e for d in ids if d in all_histories for e in mechanism_history(all_histories[d].entries)]


def composes_with(dataset_id: str, client_dir: str | os.PathLike) -> list[str]:
    """The datasets whose histories ``dataset_id`` composes with (those it inherits, transitively)."""
    graph = {d: h.inherited_ids for d, h in read_all(client_dir).items()}
    return sorted(closure(validate_dataset_id(dataset_id), graph)[1:])


def cumulative_history(dataset_id: str, client_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every mechanism entry (with its run id) that counts towards ``dataset_id``'s budget: its own
    and those of every dataset it inherits. What a receipt's cumulative history holds."""
    all_histories = read_all(client_dir)
    graph = {d: h.inherited_ids for d, h in all_histories.items()}
    return composed(closure(validate_dataset_id(dataset_id), graph), all_histories)


def budget_for_receipt(dataset_id: str, client_dir: str | os.PathLike) -> dict[str, Any]:
    """The budget block of a receipt: the budget in force, every change (oldest first) and the
    datasets this one composes with."""
    history = read(dataset_id, client_dir)
    if history.budget is None:
        raise BudgetError(f"dataset {dataset_id} has no budget recorded")
    return {
        "epsilon": history.budget.epsilon,
        "delta": history.budget.delta,
        "changes": [
            {"epsilon": c["epsilon"], "delta": c["delta"], "at": c["at"], "how": c["how"]}
            for c in history.budget_changes
        ],
        "inherits": composes_with(dataset_id, client_dir),
    }


def spent_epsilon(
    dataset_id: str,
    delta: float | None,
    client_dir: str | os.PathLike,
    eps_error: float = accounting.DEFAULT_EPS_ERROR,
) -> accounting.Epsilon:
    """ε spent on ``dataset_id`` so far (its runs and inherited ones composed), at ``delta`` or, if
    None, at the dataset's own δ."""
    if delta is None:
        budget = read(dataset_id, client_dir).budget
        if budget is None:
            raise BudgetError(f"dataset {dataset_id} has no budget, so no δ: give one")
        delta = budget.delta
    return accounting.epsilon(cumulative_history(dataset_id, client_dir), delta, eps_error)


# ------------------------------------------------------------------------------------------ locking


def locked(client_dir: str | os.PathLike) -> contextlib.AbstractContextManager[None]:
    """Hold the lock of every history in ``client_dir``."""
    # One lock for every dataset: a reservation reads several histories (inherited ones, the record
    # hashes of all) and must not interleave with another's read-modify-write.
    return exclusive_lock(budgets_dir(client_dir) / LOCK_FILE)


# ------------------------------------------------------------------------------------------ changes


def set_budget(
    dataset_id: str, epsilon: float, delta: float, client_dir: str | os.PathLike
) -> tuple[Budget, accounting.Epsilon]:
    """Change (or set) the dataset's budget; returns it and what was spent so far at the new δ."""
    validate_dataset_id(dataset_id)
    check_epsilon(epsilon, "--epsilon")
    accounting.validate_delta(delta, "--delta")
    with locked(client_dir):
        history = read(dataset_id, client_dir)
        history.budget_changes.append(
            {"epsilon": float(epsilon), "delta": float(delta), "at": utc_now(), "how": SET_BUDGET}
        )
        write(history, client_dir)
    return Budget(float(epsilon), float(delta)), spent_epsilon(dataset_id, delta, client_dir)


def record(
    dataset_id: str,
    run_id: str,
    entry: Mapping[str, Any],
    client_dir: str | os.PathLike,
) -> list[dict[str, Any]]:
    """Record spending after the fact (library callers outside ``offsite.tune``); return the entries.

    It checks no budget and only ever raises what is recorded: if the run's latest entry has the same
    mechanism, σ and q, its steps become ``max(recorded, entry["steps"])`` (a resumed run never resets
    spent budget); otherwise a new entry is appended.
    """
    validate_run_id(run_id)
    new = accounting.validate_entry(dict(entry), "entry")
    with locked(client_dir):
        history = read(dataset_id, client_dir)
        upsert(history.entries, run_id, new)
        write(history, client_dir)
    return history.entries


def upsert(entries: list[dict[str, Any]], run_id: str, new: Mapping[str, Any]) -> None:
    now = utc_now()
    mine = [i for i, e in enumerate(entries) if e["run_id"] == run_id]
    last = entries[mine[-1]] if mine else None
    if last is not None and same_phase(last, new):
        last["steps"] = max(int(last["steps"]), int(new["steps"]))
        last["updated_at"] = now
    else:
        entries.append(
            {
                "run_id": run_id,
                **{k: new[k] for k in accounting.ENTRY_KEYS},
                "created_at": now,
                "updated_at": now,
            }
        )


def same_phase(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(a[k] == b[k] for k in ("mechanism", "noise_multiplier", "sample_rate"))


def check_epsilon(epsilon: Any, flag: str) -> float:
    number = isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool)
    if not number or not math.isfinite(epsilon) or epsilon <= 0:
        raise OffsiteError(f"{flag} must be a finite number > 0, got {epsilon!r}")
    return float(epsilon)


# ------------------------------------------------------------------------------------------ overview


@dataclass(frozen=True)
class Overlap:
    a: str
    b: str
    shared_records: int
    relation: str  # "a inherits b", "b inherits a", "separate budgets (declared by a)", "unresolved"

    def to_dict(self) -> dict[str, Any]:
        return {
            "datasets": [self.a, self.b],
            "shared_records": self.shared_records,
            "relation": self.relation,
        }


def overlaps(client_dir: str | os.PathLike) -> list[Overlap]:
    """Every pair of datasets whose recorded records overlap, with how the overlap is treated."""
    all_histories = read_all(client_dir)
    graph = {d: h.inherited_ids for d, h in all_histories.items()}
    sets = {
        d: records.read_set(records_path(d, client_dir))
        for d in all_histories
        if records_path(d, client_dir).exists()
    }
    out = []
    ids = sorted(sets)
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            shared = records.count_shared(sets[a], sets[b])
            if not shared:
                continue
            if b in closure(a, graph):
                relation = f"{a} inherits {b}"
            elif a in closure(b, graph):
                relation = f"{b} inherits {a}"
            elif b in all_histories[a].declared_separate:
                relation = f"separate budgets (declared by {a})"
            elif a in all_histories[b].declared_separate:
                relation = f"separate budgets (declared by {b})"
            else:
                relation = "unresolved"
            out.append(Overlap(a, b, shared, relation))
    return out


def histories_exist(client_dir: str | os.PathLike) -> bool:
    """Whether anything in ``client_dir`` records spent budget (histories, record hashes or their key)."""
    directory = budgets_dir(client_dir)
    return directory.is_dir() and any(
        p.suffix in (".json", records.SUFFIX) or p.name == records.KEY_FILE for p in directory.iterdir()
    )


def discard_histories(client_dir: str | os.PathLike) -> Path:
    """Move every history, record hash and the record key aside, to ``budgets.discarded-<time>-<tag>/``.

    Nothing is deleted, but nothing there is enforced any more. Returns the new location.
    """
    directory = budgets_dir(client_dir)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = directory.with_name(f"{BUDGETS_DIR}.discarded-{stamp}-{secrets.token_hex(4)}")
    with locked(client_dir):
        os.rename(directory, target)
        fsync_directory(directory.parent)
    return target
