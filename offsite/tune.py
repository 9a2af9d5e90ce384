"""The data owner's fine-tuning of a bundle's adapter on its private data.

DP is the default: ``tune`` plans the noise against the dataset's recorded budget
history, trains with DP-SGD, and writes the adapter with a signed privacy receipt.
Everything derived from the data (losses, counts) stays on this machine: it goes to the
terminal, never into the adapter's files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from offsite import crypto, device
from offsite.data import CLS, LM, MLM, Example, Record, make_examples, max_positions, read_records
from offsite.errors import DataError, FormatError, OffsiteError
from offsite.fileio import OutputClaim, claim_output, exclusive_lock
from offsite.formats.adapter import TENSORS_FILE, write_adapter
from offsite.formats.bundle import Bundle
from offsite.models.adapters import AdapterView
from offsite.models.loading import parse_dtype
from offsite.models.registry import Task
from offsite.privacy import accounting, history, reservation
from offsite.privacy.fingerprint import dataset_fingerprint
from offsite.privacy.receipt import RECEIPT_FILE, build_receipt, write_receipt
from offsite.training import checkpoint
from offsite.training.dp import DPPlan, DPTrainState, default_delta, make_plan, size_bucket, train_dp
from offsite.training.dp_defaults import DPDefaults, dp_defaults
from offsite.training.finetune import TrainConfig, mean_loss, train

#: AdamW moves every weight by about lr per step: above this, training can only diverge (and above
#: ~1e37, torch overflows in the middle of the run, after the budget was reserved).
MAX_LR = 10.0
#: The noise has standard deviation σ·C; beyond this clipping norm it can overflow float32.
MAX_GRAD_NORM = 1e6
MAX_SEED = 2**32 - 1


@dataclass
class TuneOptions:
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0  # data order, initialisation, dropout; never DP sampling or noise
    eval_data: str | os.PathLike | None = None
    eval_fraction: float = 0.1
    max_length: int | None = None
    dp: bool = True
    dataset_id: str | None = None
    epsilon: float | None = None  # None: the dataset's recorded budget
    delta: float | None = None  # None: the dataset's recorded δ (first run: the default)
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    physical_batch_size: int = 32
    inherit: tuple[str, ...] = ()  # datasets whose histories count towards this one's budget
    new_budget: bool = False  # records shared with other datasets get a separate budget anyway
    noise_seed: int | None = None  # test only: recorded in the receipt
    checkpoint_every: int = 20
    keys_dir: Path | None = None  # signing key and salt: required under DP
    budget_dir: Path | None = None  # budget histories: required under DP
    bundle_owner_key: Ed25519PublicKey | None = None  # checks the bundle's manifest.sig (formats.signing)
    # Under DP, these of ("batch_size", "epochs", "lr") come from offsite.training.dp_defaults (from
    # the size bucket and the budget) instead of the fields above: the ones the user did not give.
    dp_defaults_for: tuple[str, ...] = ()

    def validate(self) -> None:
        """Refuse every option out of range, before anything is loaded, reserved or written."""
        for name in ("epochs", "batch_size", "physical_batch_size", "checkpoint_every"):
            _whole(getattr(self, name), name, 1)
        _whole(self.seed, "seed", 0, MAX_SEED)
        if self.max_length is not None:
            _whole(self.max_length, "max_length", 1)
        _finite(self.lr, "lr", above=0, at_most=MAX_LR)
        _finite(self.eval_fraction, "eval_fraction", at_least=0, below=1)
        _finite(self.max_grad_norm, "max_grad_norm", above=0, at_most=MAX_GRAD_NORM)
        if self.epsilon is not None:
            _finite(self.epsilon, "epsilon", above=0)
        if self.delta is not None:
            _finite(self.delta, "delta", above=0, below=1)
        if self.noise_multiplier is not None:
            # The range the accountant is trusted over (see accounting.SIGMA_MIN / SIGMA_MAX).
            _finite(
                self.noise_multiplier,
                "noise_multiplier",
                at_least=accounting.SIGMA_MIN,
                at_most=accounting.SIGMA_MAX,
            )
        if self.noise_seed is not None:
            _whole(self.noise_seed, "noise_seed", 0, MAX_SEED)
        if not isinstance(self.inherit, (tuple, list)) or len(set(self.inherit)) != len(self.inherit):
            raise OffsiteError(f"--inherit must name distinct datasets, got {self.inherit!r}")
        for parent in self.inherit:
            _dataset_id(parent, "inherit")
        if self.dp:
            if not self.dataset_id:
                raise DataError("--dataset-id is required under DP: the budget is tracked per dataset")
            _dataset_id(self.dataset_id, "dataset_id")
            if self.dataset_id in self.inherit:
                raise OffsiteError(f"--inherit {self.dataset_id}: a dataset cannot inherit itself")
        else:
            given = [
                flag
                for flag, value in (
                    ("--epsilon", self.epsilon),
                    ("--delta", self.delta),
                    ("--noise-multiplier", self.noise_multiplier),
                    ("--inherit", self.inherit or None),
                    ("--new-budget", self.new_budget or None),
                    ("--insecure-noise-seed", self.noise_seed),
                )
                if value is not None
            ]
            if given:
                raise OffsiteError(f"{', '.join(given)}: options of DP runs, but --no-dp was given")


def _dataset_id(value: Any, name: str) -> None:
    try:
        history.validate_dataset_id(value)
    except OffsiteError as e:
        raise OffsiteError(f"{_flag(name)}: {e}") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _whole(value: Any, name: str, minimum: int, maximum: int | None = None) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise OffsiteError(f"{_flag(name)} must be a whole number {bound}, got {value!r}")


def _finite(
    value: Any,
    name: str,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    ok = ok and (below is None or value < below) and (at_most is None or value <= at_most)
    if not ok:
        bounds = [
            f"{op} {b:g}"
            for op, b in ((">", above), (">=", at_least), ("<", below), ("<=", at_most))
            if b is not None
        ]
        raise OffsiteError(f"{_flag(name)} must be a finite number {' and '.join(bounds)}, got {value!r}")


@dataclass
class TuneResult:
    adapter_dir: Path
    bundle_id: str
    plan: DPPlan | None = None
    receipt: dict | None = None
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int = 0
    run_id: str | None = None


# -- inputs ---------------------------------------------------------------------------
def data_kind(task: Task) -> str:
    return {Task.CAUSAL_LM: LM, Task.SEQ_CLS: CLS, Task.MASKED_LM: MLM}[task]


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A held-out slice for the per-epoch eval loss (shown only on the data owner's terminal)."""
    if fraction <= 0 or len(examples) < 10:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    n_eval = max(1, int(len(examples) * fraction))
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


@dataclass
class TuneInputs:
    bundle: Bundle
    model: torch.nn.Module
    view: AdapterView
    tokenizer: object
    train: list[Example]
    eval: list[Example]
    records: list[Record]  # every record of the data file: what the dataset fingerprint covers


def load_for_tuning(bundle_dir: str | os.PathLike, data: str | os.PathLike, opts: TuneOptions) -> TuneInputs:
    bundle = Bundle.open(bundle_dir, owner_key=opts.bundle_owner_key)
    # On the current placement's device; the adapter in float32, frozen parts in its frozen dtype.
    model, view = bundle.load_emulator(placement=device.current())
    tokenizer = bundle.load_tokenizer()
    kind = data_kind(bundle.task)
    num_labels = bundle.manifest["source"].get("num_labels")
    records = read_records(Path(data), kind)

    limit = min(opts.max_length or max_positions(model.config), max_positions(model.config))

    def tokenize(recs: Sequence[Record]) -> list[Example]:
        return make_examples(kind, recs, tokenizer, limit, num_labels)

    _check_finite_model(model)
    examples = tokenize(records)
    if opts.eval_data:
        train, ev = examples, tokenize(read_records(Path(opts.eval_data), kind))
    else:
        train, ev = split_eval(examples, opts.eval_fraction, opts.seed)
    return TuneInputs(bundle, model, view, tokenizer, train, ev, records)


def _check_finite_model(model: torch.nn.Module) -> None:
    """A bundle whose emulator holds NaN or ±inf can only train into a non-finite adapter: refuse it
    before anything is reserved, rather than spend budget on it."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    bad = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise FormatError(
            f"the bundle's emulator holds NaN or infinite values ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): refusing to train on it"
        )


def adapter_tensors_for_export(view: AdapterView, bundle: Bundle) -> dict[str, torch.Tensor]:
    """The trained adapter in the bundle's stored dtype (training ran in fp32)."""
    expected = bundle.expected_tensors
    return {name: t.to(parse_dtype(expected[name]["dtype"])) for name, t in view.state_dict().items()}


def state_dir_for(out: Path) -> Path:
    """Where an interrupted DP run keeps its resumable state (beside the adapter directory)."""
    return out.parent / f".{out.name}.train-state"


# -- the run ----------------------------------------------------------------------------
def tune(
    bundle_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    opts: TuneOptions,
    on_step: Callable[[int, float], None] | None = None,
    on_eval: Callable[[int, float], None] | None = None,
    on_plan: Callable[[DPPlan], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_defaults: Callable[[DPDefaults], None] | None = None,
) -> TuneResult:
    """Fine-tune the adapter of ``bundle_dir`` on ``data``; write ``out`` (adapter, and under DP the receipt).

    Every check that can fail (options, output exists or is claimed by another run, keys, dataset id,
    bundle integrity, data, budget) runs before training and before any budget is reserved; nothing is written at ``out``
    unless the whole run succeeds, and never an adapter with a non-finite value.
    """
    opts.validate()
    out = Path(out)
    if opts.dp:
        if opts.keys_dir is None or opts.budget_dir is None:
            raise ValueError("a DP run needs TuneOptions.keys_dir and budget_dir (see offsite.state)")
        _clear_finished_state(out)
    # ``out`` is claimed before any work, so a second run on the same ``out`` fails at once.
    callbacks = _Callbacks(on_step, on_eval, on_plan, on_total, on_warning, on_defaults)
    with claim_output(out) as claim:
        return _tune(claim, bundle_dir, data, opts, callbacks)


@dataclass(frozen=True)
class _Callbacks:
    """What ``tune`` reports as it goes (each optional); see ``tune``'s parameters."""

    on_step: Callable[[int, float], None] | None = None
    on_eval: Callable[[int, float], None] | None = None
    on_plan: Callable[[DPPlan], None] | None = None
    on_total: Callable[[int], None] | None = None
    on_warning: Callable[[str], None] | None = None
    on_defaults: Callable[[DPDefaults], None] | None = None


def _tune(
    claim: OutputClaim,
    bundle_dir: str | os.PathLike,
    data: str | os.PathLike,
    opts: TuneOptions,
    cb: _Callbacks,
) -> TuneResult:
    keys = DataOwnerKeys.load(opts.keys_dir) if opts.dp else None
    inputs = load_for_tuning(bundle_dir, data, opts)
    if opts.dp and opts.dp_defaults_for:
        opts = _with_dp_defaults(opts, len(inputs.train), inputs.bundle.spec.kind, cb.on_defaults)
    torch.manual_seed(opts.seed)
    result = TuneResult(claim.path, inputs.bundle.id)
    hyper = {
        "epochs": opts.epochs,
        "lr": opts.lr,
        "batch_size": opts.batch_size,
        "seed": opts.seed,
        "max_length": opts.max_length,
        "dp": opts.dp,
    }

    def on_epoch(epoch: int) -> None:
        if inputs.eval:
            loss = mean_loss(inputs.model, inputs.eval, inputs.tokenizer.pad_token_id, _shift(inputs))
            result.eval_losses.append((epoch + 1, loss))
            if cb.on_eval:
                cb.on_eval(epoch + 1, loss)

    if opts.dp:
        _tune_private(claim, inputs, opts, keys, hyper, result, cb, on_epoch)
    else:
        _tune_plain(claim, inputs, opts, hyper, cb, on_epoch)
    return result


def _shift(inputs: TuneInputs) -> bool:
    """Whether the loss predicts the next token (causal LMs) rather than the token in place."""
    return inputs.bundle.task is Task.CAUSAL_LM


def _tune_plain(
    claim: OutputClaim, inputs: TuneInputs, opts: TuneOptions, hyper: dict, cb: _Callbacks, on_epoch
) -> None:
    """Without DP: plain fine-tuning, and the adapter written (no receipt)."""
    if cb.on_total:
        cb.on_total(opts.epochs * -(-len(inputs.train) // opts.batch_size))
    cfg = TrainConfig(epochs=opts.epochs, lr=opts.lr, batch_size=opts.batch_size, seed=opts.seed)
    train(
        inputs.model,
        inputs.view.named_parameters().values(),
        inputs.train,
        cfg,
        pad_id=inputs.tokenizer.pad_token_id,
        shift=_shift(inputs),
        on_step=cb.on_step,
        on_epoch=on_epoch,
    )
    tensors = _finite_adapter(inputs, "")
    with claim.staged() as stage:
        _write_adapter(stage, inputs, tensors, hyper)


def _tune_private(
    claim: OutputClaim,
    inputs: TuneInputs,
    opts: TuneOptions,
    keys: DataOwnerKeys,
    hyper: dict,
    result: TuneResult,
    cb: _Callbacks,
    on_epoch,
) -> None:
    """Under DP: reserve (or resume), train, then the adapter and its signed receipt written as one unit."""
    fingerprint = dataset_fingerprint([r.raw for r in inputs.records], keys.salt)
    state = DPTrainState(state_dir_for(claim.path))
    with _run_lock(state.directory):
        plan = _train_private(inputs, opts, fingerprint, state, result, cb, on_epoch)
        hyper.update(
            {
                "max_grad_norm": plan.max_grad_norm,
                "noise_multiplier": plan.noise_multiplier,
                "sample_rate": plan.sample_rate,
                "steps": plan.steps,
                "delta": plan.delta,
                "size_bucket": plan.size_bucket,
            }
        )
        try:
            tensors = _finite_adapter(
                inputs,
                f" The budget of this run stays recorded in dataset {opts.dataset_id}'s history (run "
                f"{result.run_id}): it was reserved before training, and a new run reserves anew.",
            )
        except OffsiteError:
            _remove_state(state.directory)  # the run is over: resuming would give the same values
            raise
        with claim.staged() as stage:
            meta = _write_adapter(stage, inputs, tensors, hyper)
            result.receipt = _signed_receipt(
                stage, inputs, opts, keys, plan, fingerprint, meta, result.run_id
            )
        _remove_state(state.directory)


def _signed_receipt(
    stage: Path,
    inputs: TuneInputs,
    opts: TuneOptions,
    keys: DataOwnerKeys,
    plan: DPPlan,
    fingerprint: str,
    meta: dict,
    run_id: str,
) -> dict:
    """The run's receipt, signed and written into ``stage`` beside the adapter; returned."""
    receipt = build_receipt(
        run_history=[plan.entry(plan.steps)],
        # Its own runs and every inherited dataset's, with their run ids.
        cumulative_history=history.cumulative_history(opts.dataset_id, opts.budget_dir),
        delta=plan.delta,
        max_grad_norm=plan.max_grad_norm,
        size_bucket=plan.size_bucket,
        nominal_batch=plan.nominal_batch,
        budget=history.budget_for_receipt(opts.dataset_id, opts.budget_dir),
        dataset_id=opts.dataset_id,
        dataset_fingerprint=fingerprint,
        adapter_sha256=meta["sha256"][TENSORS_FILE],
        bundle_id=inputs.bundle.id,
        signer_public_key=keys.private_key.public_key(),
        run_id=run_id,
        noise_seeded=opts.noise_seed is not None,
    )
    write_receipt(stage, receipt, keys.private_key)
    return receipt


def _finite_adapter(inputs: TuneInputs, consequence: str) -> dict[str, torch.Tensor]:
    """The adapter as it will be written (in the bundle's dtype), refused if any value is NaN or ±inf."""
    tensors = adapter_tensors_for_export(inputs.view, inputs.bundle)
    bad = sorted(name for name, t in tensors.items() if not bool(torch.isfinite(t).all()))
    if bad:
        raise OffsiteError(
            f"training diverged: {len(bad)} adapter tensor(s) hold NaN or infinite values "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); no adapter or receipt was written. "
            f"Try a smaller --lr.{consequence}"
        )
    return tensors


def _write_adapter(stage: Path, inputs: TuneInputs, tensors: dict[str, torch.Tensor], hyper: dict) -> dict:
    return write_adapter(
        stage,
        tensors,
        spec=inputs.bundle.spec,
        bundle_id=inputs.bundle.id,
        source_fingerprint=inputs.bundle.source_fingerprint,
        hyperparameters=hyper,
    )


# -- DP ---------------------------------------------------------------------------------
def _with_dp_defaults(
    opts: TuneOptions, n_train: int, adapter_kind: str, on_defaults: Callable[[DPDefaults], None] | None
) -> TuneOptions:
    """``opts`` with the DP defaults filled in where asked; the rule sees the size bucket, never N.

    The budget the rule plans for is the run's target: ``--epsilon``/``--delta`` if given, else the
    dataset's recorded budget, else (a first run with only ``--noise-multiplier``) the default δ.
    """
    bucket = size_bucket(n_train)
    recorded = history.read(opts.dataset_id, opts.budget_dir).budget
    epsilon = opts.epsilon if opts.epsilon is not None else (recorded.epsilon if recorded else None)
    delta = opts.delta if opts.delta is not None else (recorded.delta if recorded else default_delta(bucket))
    chosen = dp_defaults(bucket, epsilon, delta, adapter_kind)
    if on_defaults:
        on_defaults(chosen)
    return replace(opts, **{name: getattr(chosen, name) for name in opts.dp_defaults_for})


@dataclass
class DataOwnerKeys:
    private_key: Ed25519PrivateKey
    salt: bytes

    @classmethod
    def load(cls, keys_dir: Path) -> DataOwnerKeys:
        """The signing key and dataset salt, checked to belong together; a DP run needs both."""
        private_key, salt = crypto.load_client_keys(keys_dir)
        return cls(private_key, salt)


@contextlib.contextmanager
def _run_lock(directory: Path) -> Iterator[None]:
    """One process at a time trains into a state directory; a directory left without a committed
    state (the run stopped before its first checkpoint) is removed."""
    lock = exclusive_lock(directory / ".lock", wait=False)
    try:
        lock.__enter__()
    except BlockingIOError:
        raise OffsiteError(
            f"another `offsite client train` is using {directory} (the state of a run writing the same "
            "--out); wait for it to finish"
        ) from None
    try:
        yield
    finally:
        if directory.is_dir() and not checkpoint.exists(directory):
            shutil.rmtree(directory, ignore_errors=True)
        lock.__exit__(None, None, None)


def _remove_state(directory: Path) -> None:
    """Remove a finished run's state: the pointer first, so that a crash part-way leaves no state that
    could be taken for an interrupted run."""
    with contextlib.suppress(FileNotFoundError):
        (directory / checkpoint.META).unlink()
    shutil.rmtree(directory, ignore_errors=True)


def _clear_finished_state(out: Path) -> None:
    """If ``out`` holds the adapter of the run whose state is beside it (killed after publishing, before
    removing its state), remove that state; ``out`` existing is then reported as usual."""
    directory = state_dir_for(out)
    if not (out.is_dir() and directory.is_dir()):
        return
    try:
        with exclusive_lock(directory / ".lock", wait=False):
            if checkpoint.exists(directory):
                receipt = json.loads((out / RECEIPT_FILE).read_bytes())
                if checkpoint.read_meta(directory)["identity"]["run_id"] != receipt["run_id"]:
                    return
            _remove_state(directory)
    except (BlockingIOError, OSError, ValueError, KeyError, TypeError, OffsiteError):
        return  # not provably finished: leave it alone


def run_identity(inputs: TuneInputs, opts: TuneOptions, fingerprint: str, out: Path) -> dict[str, Any]:
    """What makes two invocations the same run: the same bundle, data, output and settings.

    ``--physical-batch-size`` and ``--checkpoint-every`` are not part of it (they change memory use and
    how often state is saved, not what is computed), so an interrupted run can resume with other values.
    """
    return {
        "bundle_id": inputs.bundle.id,
        "dataset_id": opts.dataset_id,
        "dataset_fingerprint": fingerprint,
        "output": str(out.resolve()),
        "epochs": opts.epochs,
        "lr": opts.lr,
        "batch_size": opts.batch_size,
        "seed": opts.seed,
        "max_length": opts.max_length,
        "eval_split": "file" if opts.eval_data else opts.eval_fraction,
        "epsilon": opts.epsilon,
        "delta": opts.delta,
        "noise_multiplier": opts.noise_multiplier,
        "max_grad_norm": opts.max_grad_norm,
        "inherit": sorted(opts.inherit),
        "new_budget": opts.new_budget,
        "noise_seed": opts.noise_seed,
    }


def _differences(saved: Any, current: dict[str, Any]) -> list[str]:
    if not isinstance(saved, dict):
        return ["(state from an older version of offsite)"]
    return [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def _train_private(
    inputs: TuneInputs,
    opts: TuneOptions,
    fingerprint: str,
    state: DPTrainState,
    result: TuneResult,
    cb: _Callbacks,
    on_epoch,
) -> DPPlan:
    """Reserve (or resume under its reservation) and run DP-SGD; fills ``result``'s plan, run id and
    ``resumed_from``."""
    identity = run_identity(inputs, opts, fingerprint, result.adapter_dir)
    params = inputs.view.named_parameters()
    run_id, plan = _reserve_or_resume(inputs, opts, identity, state, params, result, cb.on_warning)
    result.run_id, result.plan = run_id, plan
    if cb.on_plan:
        cb.on_plan(plan)
    if cb.on_total:
        cb.on_total(plan.steps)
    train_dp(
        inputs.model,
        params,
        inputs.train,
        plan,
        lr=opts.lr,
        pad_id=inputs.tokenizer.pad_token_id,
        shift=_shift(inputs),
        physical_batch_size=opts.physical_batch_size,
        state=state,
        identity=_state_identity(identity, run_id, plan),
        noise_seed=opts.noise_seed,
        checkpoint_every=opts.checkpoint_every,
        on_step=cb.on_step,
        on_epoch=on_epoch,
    )
    return plan


def _reserve_or_resume(
    inputs: TuneInputs,
    opts: TuneOptions,
    identity: dict,
    state: DPTrainState,
    params,
    result: TuneResult,
    on_warning: Callable[[str], None] | None,
) -> tuple[str, DPPlan]:
    """The run id and plan: an interrupted run's, confirmed under its reservation, or a new run's, with
    its budget reserved (after the step-0 checkpoint, so a crash from then on resumes under it)."""
    request = reservation.Request(
        epsilon=opts.epsilon,
        delta=opts.delta,
        records=[r.canonical for r in inputs.records],
        inherit=tuple(opts.inherit),
        new_budget=opts.new_budget,
    )
    if state.exists():
        # An interrupted run resumes with its run id, plan and reservation; its steps are never reset.
        run_id, plan, step = _interrupted_run(state, identity)
        reservation.confirm_reservation(
            opts.dataset_id,
            run_id,
            request,
            reservation.Planned(plan.entry(plan.steps), plan.delta, plan),
            opts.budget_dir,
            on_warning=on_warning,
        )
        result.resumed_from = step
        return run_id, plan
    run_id = uuid.uuid4().hex

    def plan_for(target: reservation.Target) -> reservation.Planned[DPPlan]:
        p = make_plan(
            len(inputs.train),
            opts.batch_size,
            opts.epochs,
            prior_history=target.prior,
            epsilon=target.epsilon,
            delta=target.delta,
            noise_multiplier=opts.noise_multiplier,
            max_grad_norm=opts.max_grad_norm,
        )
        # The receipt states ε by both accountants for this run and for the composition: compute
        # them now (they are cached for the receipt), so that an accountant that cannot refuses the
        # run before anything is reserved, not after training.
        accounting.epsilon([p.entry(p.steps)], p.delta)
        accounting.epsilon([*target.prior, p.entry(p.steps)], p.delta)
        return reservation.Planned(p.entry(p.steps), p.delta, p)

    def commit_step_zero(p: DPPlan) -> None:
        # Before the reservation is written: a crash from here on resumes under it.
        state.save(_state_identity(identity, run_id, p), 0, params, None)

    plan = reservation.reserve(
        opts.dataset_id,
        run_id,
        request,
        plan_for,
        opts.budget_dir,
        before_record=commit_step_zero,
        on_warning=on_warning,
    )
    return run_id, plan


def _state_identity(identity: dict, run_id: str, plan: DPPlan) -> dict:
    return {"identity": identity, "run_id": run_id, "plan": asdict(plan)}


def _interrupted_run(state: DPTrainState, identity: dict) -> tuple[str, DPPlan, int]:
    """(run id, plan, step) of the interrupted run in ``state``; refuses another run's state."""
    remove = f"remove {state.directory} to start a new run (the interrupted run's budget stays recorded)"
    try:
        meta = state.read_meta()
    except FormatError as e:
        raise FormatError(f"{e}; {remove}") from None
    saved = meta.get("identity") if isinstance(meta.get("identity"), dict) else {}
    differs = _differences(saved.get("identity"), identity)
    if differs:
        raise OffsiteError(
            f"{state.directory} holds an interrupted run with other inputs, output or settings "
            f"({', '.join(differs)} differ). Rerun with the same ones to resume it, or {remove}"
        )
    try:
        return str(saved["run_id"]), DPPlan(**saved["plan"]), int(meta["step"])
    except (KeyError, TypeError) as e:
        raise FormatError(f"training state in {state.directory} is incomplete ({e}); {remove}") from None
