"""Auditing the owner's privacy ledger without trusting the owner: what `offsite audit ledger` reports.

Input: an owner's state directory (its SQLite ledger, read-only) or an export file
(``offsite owner export-ledger``); optionally the owner's public key, pinned (``owner_pubkey``), and a
directory of checkpoints that data owners kept (``checkpoints``). In this order:

1. **The owner key**: the pinned one, else the one the state or export records (reported as not pinned:
   whoever could rewrite the ledger could then also have replaced the key).
2. **The export's signature** over the whole file (exports only): a replaced signature is named.
3. **The hash chain and every signature**, entry by entry. The first bad entry is named with its kind:
   *edited* (its bytes no longer match the owner's signature, or it was changed and re-signed so that
   the next entry no longer chains to it), *deleted* (entries missing before it), *reordered*,
   *inserted* (an entry not signed by the owner, or a signed entry copied in a second time), *forged
   receipt* (a submission whose receipt is not signed by the key the data owner enrolled, as the ledger
   recorded it). Nothing after the first bad entry is trusted or accounted.
4. **Checkpoints**: each must be signed by the owner key; a ledger shorter than a checkpoint's index is
   *truncated*, one whose entry at that index has another hash (or another entry 0) is *forked*.
5. **The recorded clients** (the state's table or the export's list) must match their enrolments in the
   ledger (receipt keys, certificate pins, revocations).
6. **Budgets, recomputed**: the ledger is replayed; for every accepted submission the union of the
   dataset's receipts' cumulative histories (``ledger_budget``, the rule the server enforces) is composed
   at the grant's δ with two independent accountants, Opacus' PRV (upper bound) and Google's
   dp-accounting PLD (pessimistic). No stated ε (the server's, and the receipt's cumulative ε) may be below
   the tighter of the two by more than the stated tolerance; no grant may be exceeded (the tighter
   recomputation above the grant's ε by more than ``GRANT_RTOL``); every submission needs a grant and a
   receipt that states every run recorded before it.
7. **Unsafe settings** are flagged: δ ≥ q for some phase (δ ≥ 1/N whenever the expected batch holds at
   least one record), seeded noise, sampling other than Poisson, an ε from an accountant that can
   underestimate (Opacus' GDP, PRV's estimate instead of its upper bound), δ too large for the size bucket.

Any failed check makes ``report.ok`` false (and the command's exit status 1). A non-private adapter
accepted under a job that allowed it is shown (no guarantee covers its data), not failed.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from offsite import crypto
from offsite.errors import FormatError, IntegrityError
from offsite.fileio import read_bounded
from offsite.formats import ledger as fmt
from offsite.privacy import accounting, ledger_budget
from offsite.privacy.ledger_source import Item, Source, read_source
from offsite.privacy.receipt_audit import FAIL, OK, UNVERIFIED, Check
from offsite.privacy.receipt_audit import _delta_vs_bucket as delta_vs_bucket  # the receipt audit's own rule
from offsite.privacy.receipt_audit import _noise_source as noise_source  # the receipt audit's own rule
from offsite.privacy.receipt_schema import parse_receipt

#: A stated ε may be below the tighter recomputation by at most TOLERANCE_ABS + TOLERANCE_REL·ε (the
#: accountants are numerical: PRV's upper bound adds its eps_error, 0.01, to its estimate, and PLD's
#: discretisation adds up to about 1e-3).
TOLERANCE_ABS = 0.01
TOLERANCE_REL = 1e-3
#: The two recomputations must agree within eps_error + this (else the audit says it cannot tell).
AGREEMENT_ABS = 0.02
#: A grant counts as exceeded when even the tighter recomputation is above it by more than this factor.
GRANT_RTOL = 1e-3
#: Accountants whose ε is an upper bound (what the server records: ``ledger_budget.SPENT_ACCOUNTANT``).
SAFE_ACCOUNTANTS = (ledger_budget.SPENT_ACCOUNTANT,)
MAX_CHECKPOINT_FILES = 100_000

#: The first bad entry's kinds, in the words of the report.
EDITED, DELETED, REORDERED, INSERTED = "edited", "deleted", "reordered", "inserted"
FORGED_RECEIPT, REPLACED_EXPORT_SIGNATURE = "forged receipt", "replaced export signature"
TRUNCATED, FORKED = "truncated", "forked"


# ------------------------------------------------------------------------------------------ the report


@dataclass
class BadEntry:
    """The first entry that is not what the owner signed, and how."""

    index: int | None  # its position (None: the export as a whole)
    kind: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "detail": self.detail}


@dataclass
class Point:
    """The dataset's composed ε right after an accepted submission (or a grant change)."""

    at: str
    entry: int
    epsilon_prv: float | None
    epsilon_pld: float | None
    grant: float | None
    event: str  # "grant" or "submission"

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class DatasetReport:
    client_id: str
    dataset_id: str
    grant_epsilon: float | None = None
    grant_delta: float | None = None
    spent_prv: float | None = None
    spent_pld: float | None = None
    stated: float | None = None  # the server's last stated ε
    accepted: int = 0
    runs: int = 0
    problems: list[str] = field(default_factory=list)
    timeline: list[Point] = field(default_factory=list)
    union: list[dict[str, Any]] = field(default_factory=list)
    incomplete: bool = False  # the ledger broke before its end: what follows the bad entry is not known

    @property
    def spent(self) -> float | None:
        values = [v for v in (self.spent_prv, self.spent_pld) if v is not None]
        return min(values) if values else None

    @property
    def remaining(self) -> float | None:
        """grant ε - spent ε by the PRV upper bound, the server's rule (0 spent before any accepted receipt):
        how far below the grant, not an ε a further run may spend on its own."""
        if self.grant_epsilon is None:
            return None
        spent = self.spent_prv if self.spent_prv is not None else self.spent
        return self.grant_epsilon - (spent or 0.0)

    @property
    def verdict(self) -> str:
        return "FAIL" if self.problems else "unverified" if self.incomplete else "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "dataset_id": self.dataset_id,
            "grant": None
            if self.grant_epsilon is None
            else {"epsilon": self.grant_epsilon, "delta": self.grant_delta},
            "spent": {"prv_upper": self.spent_prv, "pld": self.spent_pld, "stated_by_server": self.stated},
            "remaining": self.remaining,
            "accepted_submissions": self.accepted,
            "runs": self.runs,
            "verdict": self.verdict,
            "problems": list(self.problems),
            "timeline": [p.to_dict() for p in self.timeline],
        }


@dataclass
class ClientReport:
    client_id: str
    receipt_key_fingerprint: str = ""
    enrolled_at_entry: int | None = None
    revoked_at_entry: int | None = None
    non_private: int = 0
    datasets: dict[str, DatasetReport] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        verdicts = {d.verdict for d in self.datasets.values()}
        return "FAIL" if "FAIL" in verdicts else "unverified" if "unverified" in verdicts else "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "receipt_key_fingerprint": self.receipt_key_fingerprint,
            "enrolled_at_entry": self.enrolled_at_entry,
            "revoked_at_entry": self.revoked_at_entry,
            "non_private_adapters": self.non_private,
            "verdict": self.verdict,
            "datasets": [d.to_dict() for d in self.datasets.values()],
        }


@dataclass
class LedgerReport:
    source: str
    source_kind: str
    owner_key_fingerprint: str | None = None
    owner_key_pinned: bool = False
    ledger_id: str | None = None
    entries: int = 0
    verified_entries: int = 0
    checkpoints_checked: int = 0
    checks: list[Check] = field(default_factory=list)
    first_bad: BadEntry | None = None
    clients: dict[str, ClientReport] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.first_bad is None and all(c.status != FAIL for c in self.checks)

    @property
    def verdict(self) -> str:
        if self.ok:
            return "PASS" + ("" if self.owner_key_pinned else " (owner key not pinned)")
        failed = [c.name for c in self.checks if c.status == FAIL]
        return "FAIL: " + ", ".join(failed)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def datasets(self) -> list[DatasetReport]:
        return [d for c in self.clients.values() for d in c.datasets.values()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "verdict": self.verdict,
            "source": self.source,
            "source_kind": self.source_kind,
            "owner_key_fingerprint": self.owner_key_fingerprint,
            "owner_key_pinned": self.owner_key_pinned,
            "ledger_id": self.ledger_id,
            "entries": self.entries,
            "verified_entries": self.verified_entries,
            "checkpoints_checked": self.checkpoints_checked,
            "first_bad_entry": self.first_bad.to_dict() if self.first_bad else None,
            "checks": [c.to_dict() for c in self.checks],
            "clients": [c.to_dict() for c in self.clients.values()],
            "tolerance": {
                "stated_epsilon": f"stated ≥ min(PRV upper, PLD) - ({TOLERANCE_ABS} + {TOLERANCE_REL}·ε)",
                "grant": f"min(PRV upper, PLD) ≤ grant ε × (1 + {GRANT_RTOL})",
            },
        }

    def _bad(self, bad: BadEntry) -> None:
        """Keep the earliest bad entry."""
        if self.first_bad is None or (
            bad.index is not None and (self.first_bad.index is None or bad.index < self.first_bad.index)
        ):
            self.first_bad = bad


# ------------------------------------------------------------------------------------------ the chain


@dataclass
class Parsed:
    entry: fmt.LedgerEntry | None
    problem: str
    signed: bool
    hash: str | None


def _parse(item: Item, key: Ed25519PublicKey) -> Parsed:
    if item.data is None:
        return Parsed(None, item.problem or "no entry bytes", False, None)
    digest = fmt.entry_hash(item.data)
    try:
        entry = fmt.parse_entry(item.data, f"entry at position {item.position}")
    except FormatError as e:
        return Parsed(None, str(e), False, digest)
    signed = False
    if item.signature is not None:
        try:
            crypto.verify(key, item.data, item.signature)
            signed = True
        except IntegrityError:
            signed = False
    return Parsed(entry, item.problem, signed, digest)


def _walk(
    items: list[Item], key: Ed25519PublicKey
) -> tuple[list[tuple[fmt.LedgerEntry, str]], BadEntry | None]:
    """The verified prefix (entries with their hashes) and the first bad entry, if any."""
    parsed = [_parse(item, key) for item in items]
    claimed = Counter(p.entry.index for p in parsed if p.entry is not None and p.signed)
    verified: list[tuple[fmt.LedgerEntry, str]] = []
    prev = fmt.GENESIS_PREV
    for pos, p in enumerate(parsed):
        entry = p.entry
        if entry is None:
            return verified, BadEntry(
                pos, EDITED, f"entry {pos} cannot be read as a ledger entry: {p.problem}"
            )
        if not p.signed:
            following = parsed[pos + 1] if pos + 1 < len(parsed) else None
            if (
                following is not None
                and following.entry is not None
                and following.signed
                and following.entry.index == pos
            ):
                return verified, BadEntry(
                    pos,
                    INSERTED,
                    f"the entry at position {pos} is not signed by the owner key, and the owner's entry {pos} "
                    "follows it: it was inserted",
                )
            if entry.index != pos:
                return verified, BadEntry(
                    pos,
                    INSERTED,
                    f"the entry at position {pos} (claiming index {entry.index}) is not signed by "
                    "the owner key: it was inserted",
                )
            return verified, BadEntry(
                pos,
                EDITED,
                f"entry {pos} does not match the owner's signature: its content was changed"
                + (f" ({p.problem})" if p.problem else ""),
            )
        if entry.index != pos:
            if claimed[entry.index] > 1:
                return verified, BadEntry(
                    pos,
                    INSERTED,
                    f"the entry at position {pos} is a second copy of the owner's entry {entry.index}",
                )
            later = {q.entry.index for q in parsed[pos + 1 :] if q.entry is not None and q.signed}
            if entry.index < pos or any(i in later for i in range(pos, entry.index)):
                return verified, BadEntry(
                    pos,
                    REORDERED,
                    f"the owner's entry {entry.index} stands at position {pos}: entries were reordered",
                )
            missing = f"{pos}" if entry.index == pos + 1 else f"{pos} to {entry.index - 1}"
            return verified, BadEntry(
                pos,
                DELETED,
                f"entry {missing} is missing (the owner's entry {entry.index} follows entry {pos - 1})",
            )
        if entry.prev != prev:
            if pos == 0:
                return verified, BadEntry(
                    0, EDITED, "entry 0 does not open the chain (its prev is not 64 zeros)"
                )
            return verified[:-1], BadEntry(
                pos - 1,
                EDITED,
                f"entry {pos} is signed by the owner but chained to another entry {pos - 1} than the one here: "
                f"entry {pos - 1} was changed and signed again with the owner's key",
            )
        verified.append((entry, p.hash or ""))
        prev = p.hash or ""
    return verified, None


# ------------------------------------------------------------------------------------------ the audit


def _tolerance(epsilon: float) -> float:
    return TOLERANCE_ABS + TOLERANCE_REL * epsilon


def _tight(history: list[dict[str, Any]], delta: float) -> tuple[float, float]:
    """(PRV upper, PLD) of ``history`` at ``delta`` (AccountingError if either cannot be computed)."""
    return (
        accounting.epsilon_prv(history, delta, accounting.DEFAULT_EPS_ERROR),
        accounting.epsilon_pld(history, delta),
    )


def _mechanisms(data: bytes) -> list[str]:
    """Every ``mechanism`` a receipt names (read before the strict parse, which refuses any other than
    Poisson-subsampled Gaussian, so that such a receipt is named for its sampling)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return []
    found = [doc.get("mechanism")] if isinstance(doc, dict) else []
    for key in ("run_history", "cumulative_history"):
        for e in doc.get(key, []) if isinstance(doc, dict) and isinstance(doc.get(key), list) else []:
            if isinstance(e, dict):
                found.append(e.get("mechanism"))
    return [str(m) for m in found if m is not None]


def underestimating(name: str, description: str) -> str | None:
    """Why an accountant, as a receipt or an entry names it, can understate ε (None if it cannot)."""
    text = f"{name} {description}".lower()
    if "gdp" in text or "gaussianaccountant" in text or "gaussian accountant" in text:
        return "Opacus' GDP accountant (a CLT approximation) can understate ε"
    if "prv" in text and "upper" not in text:
        return "PRV's estimate, not its upper bound, can understate ε"
    return None


class _Audit:
    def __init__(self, report: LedgerReport):
        self.report = report
        self.keys: dict[str, Ed25519PublicKey] = {}  # receipt keys as enrolled in the ledger
        self.enrolments: dict[str, dict[str, Any]] = {}
        self.revoked: set[str] = set()
        self.grants: dict[tuple[str, str], tuple[int, float, float]] = {}
        self.histories: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.receipts = 0
        self.failures: dict[str, list[str]] = {"receipts": [], "epsilon": [], "grants": [], "unsafe": []}
        self.notes: dict[str, list[str]] = {"accountants": [], "non-private": []}

    def client(self, client_id: str) -> ClientReport:
        return self.report.clients.setdefault(client_id, ClientReport(client_id))

    def dataset(self, client_id: str, dataset_id: str) -> DatasetReport:
        datasets = self.client(client_id).datasets
        return datasets.setdefault(dataset_id, DatasetReport(client_id, dataset_id))

    def fail(self, group: str, dataset: DatasetReport | None, message: str) -> None:
        self.failures[group].append(message)
        if dataset is not None:
            dataset.problems.append(message)

    # -- replay -------------------------------------------------------------------------------------
    def replay(self, verified: list[tuple[fmt.LedgerEntry, str]]) -> BadEntry | None:
        for entry, _ in verified:
            record = entry.record
            if record.kind == "enrol":
                try:
                    self.keys[record.client_id] = crypto.public_key_from_b64(
                        record.receipt_key, "receipt_key"
                    )
                except (FormatError, ValueError):  # its receipts then verify against nothing: forged
                    self.keys.pop(record.client_id, None)
                self.enrolments[record.client_id] = record.model_dump()
                c = self.client(record.client_id)
                c.receipt_key_fingerprint, c.enrolled_at_entry = record.receipt_key_fingerprint, entry.index
            elif record.kind == "revoke":
                self.revoked.add(record.client_id)
                self.client(record.client_id).revoked_at_entry = entry.index
            elif record.kind == "grant":
                self.grants[(record.client_id, record.dataset_id)] = (
                    entry.index,
                    record.epsilon,
                    record.delta,
                )
                d = self.dataset(record.client_id, record.dataset_id)
                d.grant_epsilon, d.grant_delta = record.epsilon, record.delta
                d.timeline.append(
                    Point(entry.at, entry.index, d.spent_prv, d.spent_pld, record.epsilon, "grant")
                )
            elif record.kind == "submission":
                bad = self.submission(entry)
                if bad is not None:
                    return bad
        return None

    def submission(self, entry: fmt.LedgerEntry) -> BadEntry | None:
        record = entry.record
        where = f"entry {entry.index}"
        if record.receipt is None:
            self.client(record.client_id).non_private += 1
            self.notes["non-private"].append(
                f"{where}: {record.client_id}'s non-private adapter accepted for job {record.job_id}"
            )
            return None
        key = self.keys.get(record.client_id)
        if key is None:
            return BadEntry(
                entry.index, FORGED_RECEIPT, f"{where}: no enrolment of {record.client_id} precedes it"
            )
        try:
            data = fmt.unb64(record.receipt, f"{where}.receipt")
            crypto.verify(key, data, fmt.unb64(record.receipt_signature or "", f"{where}.receipt_signature"))
        except (IntegrityError, FormatError):
            return BadEntry(
                entry.index,
                FORGED_RECEIPT,
                f"{where}: the receipt is not signed by the key {record.client_id} enrolled "
                f"({crypto.public_key_fingerprint(key)[:16]}…)",
            )
        self.receipts += 1
        dataset = self.dataset(record.client_id, record.dataset_id or "")
        dataset.accepted += 1
        others = [m for m in _mechanisms(data) if m != accounting.MECHANISM]
        if others:
            self.fail(
                "unsafe", dataset, f"{where}: sampling other than Poisson ({', '.join(sorted(set(others)))})"
            )
        try:
            _, receipt = parse_receipt(data, f"{where}: receipt")
        except FormatError as e:
            self.fail("receipts", dataset, str(e))
            return None
        if receipt["dataset_id"] != record.dataset_id:
            self.fail("receipts", dataset, f"{where}: the receipt is for dataset {receipt['dataset_id']}")
        self.flags(where, dataset, receipt)
        pair = (record.client_id, record.dataset_id or "")
        held = self.histories.get(pair, [])
        cumulative = receipt["cumulative_history"]
        try:
            omitted = ledger_budget.omission(held, cumulative)
            union = ledger_budget.union([held, cumulative])
        except FormatError as e:
            self.fail("grants", dataset, f"{where}: {e}")
            return None
        if omitted:
            self.fail("grants", dataset, f"{where}: the receipt was accepted although {omitted}")
        self.histories[pair] = union
        dataset.union, dataset.runs = union, len({r["run_id"] for r in union})
        self.receipt_epsilon(where, dataset, receipt)
        grant = self.grants.get(pair)
        if grant is None:
            self.fail("grants", dataset, f"{where}: accepted without a grant for {pair[0]}/{pair[1]}")
            dataset.timeline.append(Point(entry.at, entry.index, None, None, None, "submission"))
            return None
        index, grant_eps, grant_delta = grant
        if record.grant_index != index:
            self.fail(
                "grants",
                dataset,
                f"{where}: names grant entry {record.grant_index}; the grant in force is {index}",
            )
        for phase in union:
            if grant_delta >= phase["sample_rate"]:
                self.fail(
                    "unsafe",
                    dataset,
                    f"{where}: the grant's δ = {grant_delta:g} ≥ q = {phase['sample_rate']:g}",
                )
                break
        try:
            prv, pld = _tight(union, grant_delta)
        except accounting.AccountingError as e:
            self.fail("epsilon", dataset, f"{where}: ε cannot be recomputed: {e}")
            return None
        dataset.spent_prv, dataset.spent_pld = prv, pld
        tight = min(prv, pld)
        if abs(prv - pld) > accounting.DEFAULT_EPS_ERROR + AGREEMENT_ABS + TOLERANCE_REL * tight:
            self.notes["accountants"].append(f"{where}: PRV upper {prv:.4f} and PLD {pld:.4f} disagree")
        spent = record.spent
        if spent is None:
            self.fail("epsilon", dataset, f"{where}: states no ε for its dataset")
        else:
            dataset.stated = spent.epsilon
            why = underestimating(spent.accountant, "")
            if why:
                self.fail("unsafe", dataset, f"{where}: the server's ε comes from {spent.accountant}: {why}")
            if spent.delta != grant_delta:
                self.fail(
                    "epsilon",
                    dataset,
                    f"{where}: states ε at δ = {spent.delta:g}, not the grant's {grant_delta:g}",
                )
            elif spent.epsilon < tight - _tolerance(tight):
                self.fail(
                    "epsilon",
                    dataset,
                    f"{where}: states ε = {spent.epsilon:.4f}, below the recomputed {tight:.4f} (PRV upper "
                    f"{prv:.4f}, PLD {pld:.4f}) by more than the tolerance {_tolerance(tight):.3g}",
                )
        if tight > grant_eps * (1 + GRANT_RTOL):
            self.fail(
                "grants",
                dataset,
                f"{where}: grant exceeded: the recorded runs compose to ε = {tight:.4f} at δ = {grant_delta:g} "
                f"(PRV upper {prv:.4f}, PLD {pld:.4f}), above the granted ε = {grant_eps:g}",
            )
        dataset.timeline.append(Point(entry.at, entry.index, prv, pld, grant_eps, "submission"))
        return None

    def receipt_epsilon(self, where: str, dataset: DatasetReport, receipt: dict[str, Any]) -> None:
        stated = receipt["epsilon"]["cumulative"]["prv_upper"]
        try:
            prv, pld = _tight(receipt["cumulative_history"], receipt["delta"])
        except accounting.AccountingError as e:
            self.fail("epsilon", dataset, f"{where}: the receipt's ε cannot be recomputed: {e}")
            return
        tight = min(prv, pld)
        if stated < tight - _tolerance(tight):
            self.fail(
                "epsilon",
                dataset,
                f"{where}: the receipt states cumulative ε = {stated:.4f} at δ = {receipt['delta']:g}, below the "
                f"recomputed {tight:.4f} (PRV upper {prv:.4f}, PLD {pld:.4f}) beyond the tolerance",
            )

    def flags(self, where: str, dataset: DatasetReport, receipt: dict[str, Any]) -> None:
        version = receipt["format_version"]
        noise = noise_source(version, receipt)
        if noise.status == FAIL:
            self.fail("unsafe", dataset, f"{where}: seeded noise ({noise.stated})")
        delta = receipt["delta"]
        for phase in receipt["cumulative_history"]:
            if phase["steps"] > 0 and delta >= phase["sample_rate"]:
                self.fail(
                    "unsafe",
                    dataset,
                    f"{where}: δ = {delta:g} ≥ q = {phase['sample_rate']:g} (run {phase.get('run_id')}): δ ≥ 1/N "
                    "whenever the expected batch holds a record, which allows releasing a record outright",
                )
                break
        if version >= 2:
            bucket = delta_vs_bucket(receipt)
            if bucket.status == FAIL:
                self.fail("unsafe", dataset, f"{where}: {bucket.detail}")
        for name, description in receipt.get("accountants", {}).items():
            why = underestimating(name, description)
            if why:
                self.fail(
                    "unsafe", dataset, f"{where}: the receipt's ε comes from {name} ({description}): {why}"
                )


def _checkpoints(
    report: LedgerReport,
    directory: Path,
    key: Ed25519PublicKey,
    items: list[Item],
    ledger_id: str | None,
) -> Check:
    if not directory.is_dir():
        raise FormatError(f"--checkpoints {directory}: not a directory")
    files = sorted(p for p in directory.rglob("*.json") if p.is_file() and not p.is_symlink())
    if len(files) > MAX_CHECKPOINT_FILES:
        raise FormatError(f"--checkpoints {directory}: more than {MAX_CHECKPOINT_FILES} files")
    problems, ignored, checked = [], [], 0
    for path in files:
        name = path.relative_to(directory)
        try:
            checkpoint = fmt.parse_checkpoint(
                read_bounded(path, f"{name}", fmt.MAX_CHECKPOINT_BYTES), str(name)
            )
        except FormatError:
            ignored.append(str(name))
            continue
        try:
            fmt.verify_document(checkpoint, key, str(name))
        except (IntegrityError, FormatError):
            problems.append(
                f"{name}: not signed by the ledger's owner key (a forged checkpoint, or a ledger signed "
                "again under another key)"
            )
            continue
        checked += 1
        if checkpoint.ledger_id != ledger_id:
            report._bad(
                BadEntry(
                    0,
                    FORKED,
                    f"checkpoint {name} is of ledger {checkpoint.ledger_id[:16]}…, signed by the same owner key: "
                    "this ledger was started again (forked at entry 0)",
                )
            )
            problems.append(f"{name}: another ledger id: forked at entry 0")
        elif checkpoint.index >= len(items):
            report._bad(
                BadEntry(
                    len(items),
                    TRUNCATED,
                    f"checkpoint {name} names entry {checkpoint.index} (signed by the owner at "
                    f"{checkpoint.issued_at}); the ledger ends at entry {len(items) - 1}: its tail was cut off",
                )
            )
            problems.append(f"{name}: entry {checkpoint.index} is missing: truncated")
        else:
            item = items[checkpoint.index]
            digest = fmt.entry_hash(item.data) if item.data is not None else None
            if digest != checkpoint.head:
                report._bad(
                    BadEntry(
                        checkpoint.index,
                        FORKED,
                        f"checkpoint {name} says entry {checkpoint.index} has hash {checkpoint.head[:16]}…; the "
                        f"ledger's has {str(digest)[:16]}…: the history was rewritten at or before it",
                    )
                )
                problems.append(f"{name}: entry {checkpoint.index} is not the entry the owner signed then")
    report.checkpoints_checked = checked
    detail = f"{checked} checkpoint(s) signed by the owner match the ledger"
    if ignored:
        detail += f"; {len(ignored)} file(s) that are not checkpoints ignored"
    if problems:
        return Check("checkpoints", FAIL, str(checked), "", "; ".join(problems[:5]))
    if not checked:
        return Check("checkpoints", UNVERIFIED, "0", "", "no valid checkpoint in the directory: " + detail)
    return Check("checkpoints", OK, str(checked), "", detail)


def _clients_check(audit: _Audit, source: Source) -> Check:
    problems = []
    listed = {c["client_id"]: c for c in source.clients}
    for client_id, client in listed.items():
        enrolled = audit.enrolments.get(client_id)
        if enrolled is None:
            problems.append(f"{client_id} is recorded but not enrolled in the ledger")
            continue
        for field_name in ("receipt_key", "receipt_key_fingerprint", "cert_sha256"):
            if client.get(field_name) != enrolled[field_name]:
                problems.append(f"{client_id}'s {field_name} as recorded differs from its enrolment entry")
        if (client.get("revoked_at") is not None) != (client_id in audit.revoked):
            problems.append(f"{client_id}'s revocation as recorded differs from the ledger")
    for client_id in audit.enrolments:
        if client_id not in listed:
            problems.append(f"{client_id} is enrolled in the ledger but missing from the recorded clients")
    if problems:
        return Check("recorded clients", FAIL, detail="; ".join(problems[:5]))
    return Check(
        "recorded clients",
        OK,
        str(len(listed)),
        detail="receipt keys, certificate pins and revocations as recorded match the ledger's entries",
    )


def _group_check(name: str, failures: list[str], ok_detail: str) -> Check:
    if failures:
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        return Check(name, FAIL, str(len(failures)), "", "; ".join(failures[:3]) + more)
    return Check(name, OK, detail=ok_detail)


def audit_ledger(
    state_or_export: str | os.PathLike,
    owner_pubkey: Ed25519PublicKey | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> LedgerReport:
    """Audit an owner's state directory or ledger export; see the module docstring.

    Raises FormatError when the input cannot be read at all (not a state, not an export, malformed
    export); every other finding is a check of the report.
    """
    source = read_source(state_or_export)
    report = LedgerReport(str(state_or_export), source.kind, entries=len(source.items))

    # 1. the owner key
    genesis_key = None
    if source.items and source.items[0].data is not None:
        try:
            first = fmt.parse_entry(source.items[0].data).record
            if first.kind == "open":
                genesis_key = crypto.public_key_from_b64(first.owner_key, "entry 0 owner_key")
        except FormatError:
            pass
    recorded = source.owner_key or genesis_key
    key = owner_pubkey or recorded
    if key is None:
        raise FormatError(f"{state_or_export}: no owner key is recorded; pass --owner-pubkey")
    report.owner_key_fingerprint = crypto.public_key_fingerprint(key)
    report.owner_key_pinned = owner_pubkey is not None
    if owner_pubkey is not None:
        same = recorded is None or crypto.public_key_raw(recorded) == crypto.public_key_raw(owner_pubkey)
        report.checks.append(
            Check(
                "owner key",
                OK if same else FAIL,
                report.owner_key_fingerprint[:16] + "…",
                detail="pinned (--owner-pubkey)"
                + (
                    ""
                    if same
                    else f"; the {source.kind} records another key: it was re-signed by someone else"
                ),
            )
        )
    else:
        report.checks.append(
            Check(
                "owner key",
                UNVERIFIED,
                report.owner_key_fingerprint[:16] + "…",
                detail=f"not pinned: read from the {source.kind}; whoever could rewrite the ledger could also have "
                "replaced this key (pass --owner-pubkey)",
            )
        )

    # 3. the chain, and forged receipts during the replay
    verified, bad = _walk(source.items, key)
    audit = _Audit(report)
    if bad is None:
        bad = audit.replay(verified)
        if bad is not None:
            verified = [(e, h) for e, h in verified if e.index < bad.index]
    else:
        audit.replay(verified)
    report.verified_entries = len(verified)
    if verified:
        report.ledger_id = verified[0][1]
    elif source.items and source.items[0].data is not None:
        report.ledger_id = fmt.entry_hash(source.items[0].data)
    if bad is not None:
        report._bad(bad)
    report.checks.append(
        Check(
            "hash chain and signatures",
            FAIL if bad else OK,
            str(len(source.items)),
            str(len(verified)),
            f"entry {bad.index}: {bad.kind}: {bad.detail}"
            if bad
            else f"{len(source.items)} entries chained and signed by the owner key",
        )
    )
    if source.export is not None and source.export.ledger_id not in (None, report.ledger_id):
        report.checks.append(
            Check("export head", FAIL, detail="the export's ledger_id is not its entry 0's hash")
        )
    if (
        source.export is not None
        and source.items
        and source.export.head != (fmt.entry_hash(source.items[-1].data) if source.items[-1].data else None)
    ):
        report.checks.append(
            Check("export head", FAIL, detail="the export's head is not its last entry's hash")
        )

    # 4. checkpoints
    if checkpoints is not None:
        report.checks.append(_checkpoints(report, Path(checkpoints), key, source.items, report.ledger_id))
    else:
        report.checks.append(
            Check(
                "checkpoints",
                UNVERIFIED,
                detail="none given (--checkpoints): a cut-off tail, or a history the owner rewrote and signed "
                "again, cannot be detected",
            )
        )
    if report.first_bad is not None:  # the budgets shown stop at the first bad entry
        for dataset in report.datasets():
            dataset.incomplete = True
    if report.first_bad is not None and bad is None and report.first_bad.kind in (TRUNCATED, FORKED):
        chain = report.check("hash chain and signatures")
        chain.detail += f"; but against a checkpoint: entry {report.first_bad.index}: {report.first_bad.kind}"

    # 5. the export's signature (named as the first bad thing only if no entry explains the change)
    if source.export is not None:
        try:
            fmt.verify_document(source.export, key, "the export")
            report.checks.append(
                Check("export signature", OK, detail="the owner's signature over the whole file")
            )
        except (IntegrityError, FormatError) as e:
            detail = str(e)
            if report.first_bad is None:
                report._bad(
                    BadEntry(None, REPLACED_EXPORT_SIGNATURE, f"the export's signature does not verify: {e}")
                )
            else:
                detail += "; the file was changed after the owner signed it (see the first bad entry)"
            report.checks.insert(1, Check("export signature", FAIL, detail=detail))

    # 6-8. recorded clients, receipts, ε, grants, unsafe settings
    report.checks.append(_clients_check(audit, source))
    report.checks.append(
        _group_check(
            "receipts",
            audit.failures["receipts"],
            f"{audit.receipts} receipt(s) signed by their data owners' enrolled keys and readable",
        )
    )
    report.checks.append(
        _group_check(
            "ε recomputed (PRV, PLD)",
            audit.failures["epsilon"],
            "no stated ε below the tighter of Opacus' PRV upper bound and dp-accounting's PLD beyond "
            f"{TOLERANCE_ABS} + {TOLERANCE_REL}·ε",
        )
    )
    if audit.notes["accountants"]:
        report.checks.append(
            Check("accountants agree", UNVERIFIED, detail="; ".join(audit.notes["accountants"][:3]))
        )
    report.checks.append(
        _group_check(
            "grants",
            audit.failures["grants"],
            "every accepted receipt had a grant, stated every recorded run, and kept its dataset within it",
        )
    )
    report.checks.append(
        _group_check(
            "unsafe settings",
            audit.failures["unsafe"],
            "no δ ≥ q, no seeded noise, Poisson sampling only, ε from upper bounds only",
        )
    )
    if audit.notes["non-private"]:
        report.checks.append(
            Check(
                "non-private adapters",
                UNVERIFIED,
                str(len(audit.notes["non-private"])),
                detail="accepted where the job allowed it; no guarantee covers their data: "
                + "; ".join(audit.notes["non-private"][:3]),
            )
        )
    return report


def parse_time(at: str) -> float:
    """Seconds since the epoch of a ledger time stamp (for plots)."""
    whole, _, fraction = at.rstrip("Z").partition(".")
    seconds = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return seconds + (float(f"0.{fraction}") if fraction else 0.0)


__all__ = ["BadEntry", "LedgerReport", "audit_ledger", "read_source"]
