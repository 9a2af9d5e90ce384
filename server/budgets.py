"""Grants enforced: what the ledger holds for one (client, dataset), and whether a receipt may join it.

Three limits apply to a DP submission, and all must hold: the data owner's own budget (the receipt's
``budget`` block, checked by the receipt audit), the job's maximum (``checks.check_receipt``) and the
owner's **grant** for the (client, dataset), checked here against the ledger:

* **no grant, no acceptance.** A submission for a dataset the owner granted nothing for is refused: the
  job's maximum bounds what one receipt states, not what a dataset may spend over many jobs and many
  submissions, and taking it as an implicit grant would let every new dataset id a data owner names
  start afresh with the job's maximum. The owner grants with ``offsite owner grant``.
* **composition, not addition**: ε is that of the union of the accepted receipts' cumulative histories
  with the new one (``offsite.privacy.ledger_budget``), at the grant's δ, by the PRV upper bound; it must
  not exceed the grant's ε;
* **no omissions**: the receipt must state every run the ledger already holds for the dataset.

The decision is made on a snapshot of the pair's budget entries (``mark``: the index of the last one)
and commits only if no budget entry of the pair was appended since (``LedgerScope``), so two
submissions decided at once can never both fit into what only one fits into.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from offsite.formats import ledger as fmt
from offsite.privacy import accounting, ledger_budget
from offsite.privacy.receipt_schema import parse_receipt
from offsite.server.errors import GrantExceededError, HistoryOmissionError, NoGrantError
from offsite.server.storage.base import LedgerScope, Storage


@dataclass(frozen=True)
class Grant:
    index: int  # of the grant entry
    epsilon: float
    delta: float
    at: str


@dataclass
class DatasetLedger:
    """The budget entries of one (client, dataset) as the ledger holds them."""

    client_id: str
    dataset_id: str
    grant: Grant | None = None
    union: list[dict[str, Any]] = field(default_factory=list)
    accepted: int = 0
    mark: int = -1

    @property
    def scope(self) -> LedgerScope:
        return LedgerScope(self.client_id, self.dataset_id, self.mark)

    def spent(self) -> float:
        """ε of the recorded runs at the grant's δ (0 without runs); needs a grant."""
        assert self.grant is not None
        return ledger_budget.spent(self.union, self.grant.delta) if self.union else 0.0


def read(storage: Storage, client_id: str, dataset_id: str) -> DatasetLedger:
    view = DatasetLedger(client_id, dataset_id)
    histories = []
    for row in storage.ledger_scope(client_id, dataset_id):
        entry = fmt.parse_entry(row.entry, f"ledger entry {row.index}")
        record = entry.record
        view.mark = row.index
        if record.kind == "grant":
            view.grant = Grant(row.index, record.epsilon, record.delta, entry.at)
        elif record.kind == "submission" and record.receipt is not None:
            _, receipt = parse_receipt(
                fmt.unb64(record.receipt, "receipt"), f"receipt of ledger entry {row.index}"
            )
            histories.append(receipt["cumulative_history"])
            view.accepted += 1
    view.union = ledger_budget.union(histories)
    return view


@dataclass(frozen=True)
class Admission:
    """A receipt that fits: the grant it was admitted under and what the dataset has spent with it."""

    view: DatasetLedger
    union: list[dict[str, Any]]
    epsilon: float

    def spent(self) -> dict[str, Any]:
        assert self.view.grant is not None
        return {
            "epsilon": self.epsilon,
            "delta": self.view.grant.delta,
            "accountant": ledger_budget.SPENT_ACCOUNTANT,
            "eps_error": accounting.DEFAULT_EPS_ERROR,
        }


def admit(view: DatasetLedger, cumulative_history: list[dict[str, Any]]) -> Admission:
    """Whether a receipt with this cumulative history may join the dataset's ledger; raises the
    PolicyError that says why not."""
    who = f"client {view.client_id}, dataset {view.dataset_id}"
    if view.grant is None:
        raise NoGrantError(
            f"no budget is granted for {who}: the owner grants one with `offsite owner grant "
            f"{view.client_id} {view.dataset_id} --epsilon E --delta D`"
        )
    omitted = ledger_budget.omission(view.union, cumulative_history)
    if omitted:
        raise HistoryOmissionError(f"the receipt does not account for what {who} has spent: {omitted}")
    union = ledger_budget.union([view.union, cumulative_history])
    epsilon = ledger_budget.spent(union, view.grant.delta)
    if epsilon > view.grant.epsilon:
        before = view.spent()
        raise GrantExceededError(
            f"accepting it would exceed the grant for {who}: its runs composed with the {len(view.union)} "
            f"phase(s) already recorded give ε = {epsilon:.4f} at δ = {view.grant.delta:g} (PRV upper bound; "
            f"{before:.4f} before it), more than the granted ε = {view.grant.epsilon:g}"
        )
    return Admission(view, union, epsilon)
