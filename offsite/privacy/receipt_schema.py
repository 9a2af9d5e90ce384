"""The privacy receipt format, versions 1 and 2, declared once as pydantic models.

A receipt is canonical JSON (sorted keys, 2-space indent, trailing newline) signed over its exact
bytes (``receipt.sig``: one line of base64 of the raw 64-byte Ed25519 signature). It carries mechanism
histories, not just ε, so that an auditor can recompute every ε with any accountant, and nothing
derived from the data except the salted fingerprint and, in version 2, the coarse size bucket.

Version 2 (written by this offsite)::

    format, format_version (2), created_at, run_id, bundle_id,
    dataset_id, dataset_fingerprint, fingerprint_scheme, adapter_sha256,
    mechanism, neighbouring_relation, delta, max_grad_norm,
    size_bucket, nominal_batch,              (q = nominal_batch / size_bucket for this run's phases)
    noise_source: {generator, seeded},
    budget: {epsilon, delta, changes: [{epsilon, delta, at, how}], inherits: [dataset_id, ...]},
    run_history: [{mechanism, noise_multiplier, sample_rate, steps}, ...],
    cumulative_history: [{run_id, mechanism, noise_multiplier, sample_rate, steps}, ...],
    epsilon: {this_run: {prv_upper, prv_eps_error, rdp}, cumulative: {...}},
    accountants: {prv, rdp}, signer: {algorithm, public_key, public_key_fingerprint},
    versions: {offsite, torch, opacus, transformers}

Version 1 (read for audits of older receipts) has ``noise_seed`` (null or an integer) instead of
``noise_source``, and no ``size_bucket``, ``nominal_batch`` or ``budget``.

``parse_receipt`` is the one reader of receipt bytes: size-bounded, version dispatched, every field
checked, the bytes required to be canonical (so no two JSON readers can disagree on what was signed),
every failure a ``FormatError`` naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, StringConstraints, model_validator

from offsite import crypto
from offsite.errors import FormatError, OffsiteError
from offsite.fileio import canonical_json
from offsite.formats.schema import MAX_METADATA_BYTES, Schema, parse, validate
from offsite.privacy import accounting
from offsite.privacy.fingerprint import FINGERPRINT_SCHEME
from offsite.privacy.history import validate_dataset_id, validate_run_id
from offsite.training.noise import GENERATOR as NOISE_GENERATOR

FORMAT = "offsite-receipt"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
RECEIPT_FILE = "receipt.json"
SIGNATURE_FILE = "receipt.sig"

#: Receipts larger than this are refused before they are parsed.
MAX_RECEIPT_BYTES = MAX_METADATA_BYTES
#: run_history and cumulative_history together may hold at most this many entries.
MAX_HISTORY_ENTRIES = 10_000
#: A stated eps_error above this would make the PRV comparison meaningless.
MAX_EPS_ERROR = 0.5
#: No phase may claim more steps than this (the accountants bound their own work too).
MAX_STEPS = 10**9

BUDGET_CHANGES = ("first-run", "set-budget")


def _checked(check):
    """Turn an OffsiteError from one of the project's own validators into a pydantic error."""

    def run(value):
        try:
            check(value)
        except OffsiteError as e:
            raise ValueError(str(e)) from None
        return value

    return AfterValidator(run)


Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
DatasetId = Annotated[str, _checked(validate_dataset_id)]
RunId = Annotated[str, _checked(validate_run_id)]
Timestamp = Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")]
PositiveFinite = Annotated[float, Field(gt=0)]
#: σ of a phase: at least accounting.SIGMA_FLOOR, below which no ε can be computed.
NoiseMultiplier = Annotated[float, Field(gt=0), _checked(accounting.check_sigma_floor)]
Probability = Annotated[float, Field(gt=0, lt=1)]
Strings = Annotated[dict[Annotated[str, StringConstraints(max_length=64)], str], Field(max_length=64)]


class Phase(Schema):
    """One phase of Poisson-subsampled Gaussian DP-SGD: σ, q and how many steps ran."""

    mechanism: Literal[accounting.MECHANISM]  # type: ignore[valid-type]
    noise_multiplier: NoiseMultiplier
    sample_rate: Annotated[float, Field(gt=0, le=1)]
    steps: Annotated[int, Field(ge=0, le=MAX_STEPS)]
    run_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None


class EpsilonBlock(Schema):
    prv_upper: Annotated[float, Field(ge=0)]
    prv_eps_error: Annotated[float, Field(gt=0, le=MAX_EPS_ERROR)]
    rdp: Annotated[float, Field(ge=0)]


class Epsilons(Schema):
    this_run: EpsilonBlock
    cumulative: EpsilonBlock


class Signer(Schema):
    algorithm: Literal["ed25519"]
    public_key: Annotated[str, StringConstraints(max_length=128)]
    public_key_fingerprint: Hex64

    @model_validator(mode="after")
    def _fingerprint_matches(self) -> Signer:
        try:
            key = crypto.public_key_from_b64(self.public_key, "public_key")
        except (OffsiteError, ValueError) as e:
            raise ValueError(f"public_key: {e}") from None
        if crypto.public_key_fingerprint(key) != self.public_key_fingerprint:
            raise ValueError("public_key_fingerprint does not match public_key")
        return self


class _Common(Schema):
    """Fields shared by versions 1 and 2."""

    format: Literal[FORMAT]  # type: ignore[valid-type]
    bundle_id: Name
    dataset_id: DatasetId
    dataset_fingerprint: Hex64
    fingerprint_scheme: Literal[FINGERPRINT_SCHEME]  # type: ignore[valid-type]
    adapter_sha256: Hex64
    mechanism: Literal[accounting.MECHANISM]  # type: ignore[valid-type]
    neighbouring_relation: Literal[accounting.NEIGHBOURING_RELATION]  # type: ignore[valid-type]
    delta: Probability
    max_grad_norm: PositiveFinite
    run_history: Annotated[list[Phase], Field(max_length=MAX_HISTORY_ENTRIES)]
    cumulative_history: Annotated[list[Phase], Field(max_length=MAX_HISTORY_ENTRIES)]
    epsilon: Epsilons
    accountants: Strings
    signer: Signer
    versions: Strings

    @model_validator(mode="after")
    def _bounded_histories(self) -> _Common:
        total = len(self.run_history) + len(self.cumulative_history)
        if total > MAX_HISTORY_ENTRIES:
            raise ValueError(
                f"run_history and cumulative_history hold {total} entries together, more than "
                f"{MAX_HISTORY_ENTRIES}: refused before any accounting"
            )
        return self


class ReceiptV1(_Common):
    """Format version 1 (offsite before receipts published the size bucket)."""

    format_version: Literal[1]
    created_at: Name
    run_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None
    noise_seed: int | None


class NoiseSource(Schema):
    generator: Literal[NOISE_GENERATOR]  # type: ignore[valid-type]
    seeded: bool


class BudgetChange(Schema):
    epsilon: PositiveFinite
    delta: Probability
    at: Timestamp
    how: Literal[BUDGET_CHANGES]  # type: ignore[valid-type]


class Budget(Schema):
    """The dataset's budget (ε, δ) when the run was made, how it came to be, and which other datasets'
    histories it composes with."""

    epsilon: PositiveFinite
    delta: Probability
    changes: Annotated[list[BudgetChange], Field(min_length=1, max_length=1000)]
    inherits: Annotated[list[DatasetId], Field(max_length=1000)]


class ReceiptV2(_Common):
    """Format version 2: the size bucket instead of anything that follows N, the noise source, the budget."""

    format_version: Literal[2]
    created_at: Timestamp
    run_id: RunId
    size_bucket: Annotated[int, Field(ge=1, le=1 << 52)]
    nominal_batch: Annotated[int, Field(ge=1, le=1 << 52)]
    noise_source: NoiseSource
    budget: Budget

    @model_validator(mode="after")
    def _bucket_is_a_power_of_two(self) -> ReceiptV2:
        if self.size_bucket & (self.size_bucket - 1):
            raise ValueError(f"size_bucket must be a power of two, got {self.size_bucket}")
        if self.nominal_batch > self.size_bucket:
            raise ValueError("nominal_batch must not exceed size_bucket")
        return self


class _Envelope(Schema):
    """Just enough to choose the version; every other field is checked by the version's model."""

    model_config = ConfigDict(extra="ignore")
    format: Literal[FORMAT]  # type: ignore[valid-type]
    format_version: Literal[READABLE_VERSIONS]  # type: ignore[valid-type]


MODELS: dict[int, type[_Common]] = {1: ReceiptV1, 2: ReceiptV2}


def parse_receipt(data: bytes, what: str = "receipt") -> tuple[int, dict[str, Any]]:
    """Validate receipt bytes (untrusted): ``(format_version, document)``; FormatError names the field."""
    envelope = parse(_Envelope, data, what, max_bytes=MAX_RECEIPT_BYTES)
    receipt = parse(MODELS[envelope.format_version], data, what, max_bytes=MAX_RECEIPT_BYTES)
    # Receipts are written canonical; anything else (a duplicated key that another JSON reader would
    # resolve differently, reordered or padded fields) was edited or made by something else.
    if canonical_json(json.loads(data)) != data:
        raise FormatError(
            f"{what}: not in canonical form (sorted keys, 2-space indent, one trailing newline, no "
            "duplicate keys): it was edited or not written by offsite"
        )
    # The document is what was validated (fields as given, numbers as parsed), not a second parse.
    return envelope.format_version, receipt.model_dump(mode="json", exclude_unset=True)


def validate_receipt(doc: Any, what: str = "receipt") -> dict[str, Any]:
    """Check a receipt document being built or already parsed (any readable version); a plain copy."""
    if not isinstance(doc, Mapping):
        raise FormatError(f"{what}: must be a JSON object")
    envelope = validate(_Envelope, doc, what)
    validate(MODELS[envelope.format_version], doc, what)
    return json.loads(json.dumps(doc))  # a plain, independent copy


def uncovered(run: Sequence[Mapping[str, Any]], cumulative: Sequence[Mapping[str, Any]]) -> str | None:
    """None if every phase of ``run`` is accounted for in ``cumulative``, else why not.

    Each run phase needs its own cumulative entry with the same σ and q and at least as many steps
    (the history may have recorded steps ahead of execution, which only overstates ε). Within one
    (σ, q), sorting both sides by steps and pairing largest with largest finds such a matching
    whenever one exists, in O(n log n) however long the histories are.
    """
    by_mechanism: dict[tuple[float, float], list[int]] = {}
    for c in cumulative:
        by_mechanism.setdefault((c["noise_multiplier"], c["sample_rate"]), []).append(c["steps"])
    wanted: dict[tuple[float, float], list[tuple[int, int]]] = {}
    for i, e in enumerate(run):
        if e["steps"] > 0:
            wanted.setdefault((e["noise_multiplier"], e["sample_rate"]), []).append((e["steps"], i))
    for (sigma, q), phases in wanted.items():
        have = sorted(by_mechanism.get((sigma, q), []), reverse=True)
        for k, (steps, i) in enumerate(sorted(phases, reverse=True)):
            if k >= len(have) or have[k] < steps:
                return (
                    f"run_history[{i}] (σ={sigma:g}, q={q:g}, steps={steps}) has no matching entry in "
                    "cumulative_history"
                )
    return None
