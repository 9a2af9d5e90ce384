"""Per-dataset privacy budget history on the data owner's machine.

One JSON file per dataset id, ``<client_dir>/budgets/<dataset_id>.json``::

    {
      "format": "offsite-budget-history", "format_version": 1, "dataset_id": "...",
      "entries": [
        {"run_id": "...", "mechanism": "poisson-subsampled-gaussian",
         "noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 500,
         "created_at": "...Z", "updated_at": "...Z"},
        ...
      ]
    }

Entries are mechanism phases; a run has one entry per (σ, q) phase. ε spent on a dataset is always
the *composition* of all entries (see ``accounting``), never a sum of per-run ε.

``reserve`` plans a run and records its whole phase under one lock, before the run starts; ``record``
is an upper-bound claim that only ever grows: a run resumed after an interruption updates its own
entry's steps, and a smaller step count (resuming from an older checkpoint) never lowers what was
recorded. A run that is reserved but interrupted stays counted in full: nothing from it was released,
so this over-counts, never under-counts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from offsite.errors import FormatError, OffsiteError
from offsite.fileio import canonical_json, read_json, write_bytes_atomic
from offsite.privacy import accounting

T = TypeVar("T")

FORMAT = "offsite-budget-history"
FORMAT_VERSION = 1
BUDGETS_DIR = "budgets"

# Ids come from untrusted places (bundles, command lines, receipts): no separators, no "..", no
# leading dot (hidden files, "." and ".."), bounded length, so an id can only ever name one file here.
_DATASET_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_RUN_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


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


def history_path(dataset_id: str, client_dir: str | os.PathLike) -> Path:
    """``<client_dir>/budgets/<dataset_id>.json``."""
    return Path(client_dir) / BUDGETS_DIR / f"{validate_dataset_id(dataset_id)}.json"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _load(path: Path, dataset_id: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    doc = read_json(path, "budget history")
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"budget history {path}: not an {FORMAT} v{FORMAT_VERSION} file")
    if doc.get("dataset_id") != dataset_id:
        raise FormatError(
            f"budget history {path}: belongs to dataset {doc.get('dataset_id')!r}, not {dataset_id!r}"
        )
    entries = accounting.validate_history(doc.get("entries"), f"budget history {path}: entries")
    for i, e in enumerate(entries):
        if not isinstance(e.get("run_id"), str):
            raise FormatError(f"budget history {path}: entries[{i}].run_id: missing")
    return entries


def load_history(dataset_id: str, client_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every recorded mechanism entry for ``dataset_id`` (empty if nothing was ever recorded)."""
    return _load(history_path(dataset_id, client_dir), dataset_id)


def mechanism_history(entries: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Entries reduced to what accounting and receipts need (run id kept, timestamps dropped)."""
    keep = ("run_id", *accounting.ENTRY_KEYS)
    return [{k: e[k] for k in keep if k in e} for e in entries]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Two training runs on one dataset must not lose each other's updates (read-modify-write).
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def record(
    dataset_id: str,
    run_id: str,
    entry: Mapping[str, Any],
    client_dir: str | os.PathLike,
) -> list[dict[str, Any]]:
    """Create or update ``run_id``'s entry for the phase ``entry`` describes; return the full history.

    If the run's latest entry has the same mechanism, σ and q, its steps become
    ``max(recorded, entry["steps"])`` (a resumed run never resets spent budget); otherwise (first
    record of the run, or a new phase with other σ/q) a new entry is appended.
    """
    validate_run_id(run_id)
    new = accounting.validate_entry(dict(entry), "entry")
    path = history_path(dataset_id, client_dir)
    with _locked(path):
        entries = _load(path, dataset_id)
        _upsert(entries, run_id, new)
        _write(path, dataset_id, entries)
    return entries


def reserve(
    dataset_id: str,
    run_id: str,
    plan: Callable[[list[dict[str, Any]]], tuple[Mapping[str, Any], T]],
    client_dir: str | os.PathLike,
) -> T:
    """Plan a run against the recorded history and record its whole phase, in one locked step.

    ``plan(prior_mechanism_history)`` returns ``(entry, result)``. Holding the lock from reading the
    history to writing the reservation means two runs started at once on one dataset cannot both
    plan against the same prior and overspend the budget together.
    """
    validate_run_id(run_id)
    path = history_path(dataset_id, client_dir)
    with _locked(path):
        entries = _load(path, dataset_id)
        entry, result = plan(mechanism_history(entries))
        _upsert(entries, run_id, accounting.validate_entry(dict(entry), "entry"))
        _write(path, dataset_id, entries)
    return result


def _upsert(entries: list[dict[str, Any]], run_id: str, new: Mapping[str, Any]) -> None:
    now = _now()
    mine = [i for i, e in enumerate(entries) if e["run_id"] == run_id]
    last = entries[mine[-1]] if mine else None
    if last is not None and all(last[k] == new[k] for k in ("mechanism", "noise_multiplier", "sample_rate")):
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


def _write(path: Path, dataset_id: str, entries: list[dict[str, Any]]) -> None:
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "dataset_id": dataset_id, "entries": entries}
    write_bytes_atomic(path, canonical_json(doc), mode=0o600)


def spent_epsilon(
    dataset_id: str,
    delta: float,
    client_dir: str | os.PathLike,
    eps_error: float = accounting.DEFAULT_EPS_ERROR,
) -> accounting.Epsilon:
    """ε spent on ``dataset_id`` so far at ``delta``: all recorded runs composed."""
    return accounting.epsilon(load_history(dataset_id, client_dir), delta, eps_error)


def dataset_ids(client_dir: str | os.PathLike) -> list[str]:
    """Every dataset id with a recorded history on this machine."""
    directory = Path(client_dir) / BUDGETS_DIR
    if not directory.is_dir():
        return []
    ids = (p.stem for p in directory.glob("*.json"))
    return sorted(i for i in ids if _DATASET_ID.fullmatch(i))
