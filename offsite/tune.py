"""The data owner's fine-tuning of a bundle's adapter on its private data.

DP is the default: ``tune`` plans the noise against the dataset's recorded budget
history, trains with DP-SGD, and writes the adapter with a signed privacy receipt.
Everything derived from the data (losses, counts) stays on this machine: it goes to the
terminal, never into the adapter's files.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from offsite import crypto
from offsite.data import CLS, LM, MLM, Example, Record, make_examples, max_positions, read_records
from offsite.errors import DataError
from offsite.fileio import check_new_output, staged_directory
from offsite.formats.adapter import TENSORS_FILE, write_adapter
from offsite.formats.bundle import Bundle
from offsite.models.adapters import AdapterView
from offsite.models.loading import parse_dtype
from offsite.models.registry import Task
from offsite.privacy import history
from offsite.privacy.fingerprint import dataset_fingerprint
from offsite.privacy.receipt import build_receipt, write_receipt
from offsite.training.dp import DPPlan, DPTrainState, default_delta, make_plan, train_dp
from offsite.training.dp_defaults import DPDefaults, dp_defaults, size_bucket
from offsite.training.finetune import TrainConfig, mean_loss, train


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
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    physical_batch_size: int = 32
    noise_seed: int | None = None  # test only: recorded in the receipt
    checkpoint_every: int = 20
    keys_dir: Path | None = None  # signing key and salt: required under DP
    budget_dir: Path | None = None  # budget histories: required under DP
    # Under DP, these of ("batch_size", "epochs", "lr") come from offsite.training.dp_defaults (from
    # the size bucket and the budget) instead of the fields above: the ones the user did not give.
    dp_defaults_for: tuple[str, ...] = ()

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "physical_batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.lr > 0:
            raise DataError("--lr must be positive")
        if not 0 <= self.eval_fraction < 1:
            raise DataError("--eval-fraction must be in [0, 1)")


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
    bundle = Bundle.open(bundle_dir)
    model, view = bundle.load_emulator(torch.float32)
    tokenizer = bundle.load_tokenizer()
    kind = data_kind(bundle.task)
    num_labels = bundle.manifest["source"].get("num_labels")
    records = read_records(Path(data), kind)

    limit = min(opts.max_length or max_positions(model.config), max_positions(model.config))

    def tokenize(recs: Sequence[Record]) -> list[Example]:
        return make_examples(kind, recs, tokenizer, limit, num_labels)

    examples = tokenize(records)
    if opts.eval_data:
        train, ev = examples, tokenize(read_records(Path(opts.eval_data), kind))
    else:
        train, ev = split_eval(examples, opts.eval_fraction, opts.seed)
    return TuneInputs(bundle, model, view, tokenizer, train, ev, records)


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
    on_defaults: Callable[[DPDefaults], None] | None = None,
) -> TuneResult:
    """Fine-tune the adapter of ``bundle_dir`` on ``data``; write ``out`` (adapter, and under DP the receipt).

    Every check that can fail (output exists, keys, dataset id, bundle integrity, data, budget)
    runs before training; nothing is written at ``out`` unless the whole run succeeds.
    """
    out = check_new_output(out)
    opts.validate()
    keys = None
    if opts.dp:
        if opts.keys_dir is None or opts.budget_dir is None:
            raise ValueError("a DP run needs TuneOptions.keys_dir and budget_dir (see offsite.state)")
        keys = DataOwnerKeys.load(opts.keys_dir)
        if not opts.dataset_id:
            raise DataError("--dataset-id is required under DP: the budget is tracked per dataset")
        history.validate_dataset_id(opts.dataset_id)
    inputs = load_for_tuning(bundle_dir, data, opts)
    if opts.dp and opts.dp_defaults_for:
        opts = _with_dp_defaults(opts, len(inputs.train), inputs.bundle.spec.kind, on_defaults)
    torch.manual_seed(opts.seed)
    shift = inputs.bundle.task is Task.CAUSAL_LM
    pad = inputs.tokenizer.pad_token_id
    result = TuneResult(out, inputs.bundle.id)
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
            loss = mean_loss(inputs.model, inputs.eval, pad, shift)
            result.eval_losses.append((epoch + 1, loss))
            if on_eval:
                on_eval(epoch + 1, loss)

    if opts.dp:
        fingerprint = dataset_fingerprint([r.raw for r in inputs.records], keys.salt)
        plan = _train_private(inputs, opts, fingerprint, hyper, result, on_step, on_epoch, on_plan, on_total)
        hyper.update(
            {
                "max_grad_norm": plan.max_grad_norm,
                "noise_multiplier": plan.noise_multiplier,
                "sample_rate": plan.sample_rate,
                "steps": plan.steps,
                "delta": plan.delta,
            }
        )
    else:
        if on_total:
            on_total(opts.epochs * -(-len(inputs.train) // opts.batch_size))
        cfg = TrainConfig(epochs=opts.epochs, lr=opts.lr, batch_size=opts.batch_size, seed=opts.seed)
        train(
            inputs.model,
            inputs.view.named_parameters().values(),
            inputs.train,
            cfg,
            pad_id=pad,
            shift=shift,
            on_step=on_step,
            on_epoch=on_epoch,
        )
    with staged_directory(out) as stage:
        meta = write_adapter(
            stage,
            adapter_tensors_for_export(inputs.view, inputs.bundle),
            spec=inputs.bundle.spec,
            bundle_id=inputs.bundle.id,
            source_fingerprint=inputs.bundle.source_fingerprint,
            hyperparameters=hyper,
        )
        if opts.dp:
            receipt = build_receipt(
                run_history=[result.plan.entry(result.plan.steps)],
                cumulative_history=history.load_history(opts.dataset_id, opts.budget_dir),
                delta=result.plan.delta,
                max_grad_norm=result.plan.max_grad_norm,
                dataset_id=opts.dataset_id,
                dataset_fingerprint=fingerprint,
                adapter_sha256=meta["sha256"][TENSORS_FILE],
                bundle_id=inputs.bundle.id,
                signer_public_key=keys.private_key.public_key(),
                run_id=result.run_id,
                noise_seed=opts.noise_seed,
            )
            write_receipt(stage, receipt, keys.private_key)
            result.receipt = receipt
    if opts.dp:
        shutil.rmtree(state_dir_for(out), ignore_errors=True)
    return result


# -- DP ---------------------------------------------------------------------------------
def _with_dp_defaults(opts: TuneOptions, n_train: int, adapter_kind: str, on_defaults) -> TuneOptions:
    """``opts`` with the DP defaults filled in where asked; the rule sees the size bucket, never N."""
    bucket = size_bucket(n_train)
    delta = opts.delta if opts.delta is not None else default_delta(bucket)
    chosen = dp_defaults(bucket, opts.epsilon, delta, adapter_kind)
    if on_defaults:
        on_defaults(chosen)
    return replace(opts, **{name: getattr(chosen, name) for name in opts.dp_defaults_for})


@dataclass
class DataOwnerKeys:
    private_key: Ed25519PrivateKey
    salt: bytes

    @classmethod
    def load(cls, keys_dir: Path) -> DataOwnerKeys:
        """The signing key and dataset salt; a DP run needs both for its receipt."""
        paths = crypto.KeyPaths.in_dir(keys_dir)
        if not paths.private_key.is_file() or not paths.salt.is_file():
            raise DataError(
                f"no signing key in {paths.private_key.parent}: run `offsite client keys init` first"
            )
        return cls(crypto.load_private_key(paths.private_key), crypto.load_salt(paths.salt))


def _train_private(
    inputs: TuneInputs,
    opts: TuneOptions,
    fingerprint: str,
    hyper: dict,
    result: TuneResult,
    on_step,
    on_epoch,
    on_plan,
    on_total,
) -> DPPlan:
    """Plan (or resume) and run DP-SGD; fills ``result.plan``, ``run_id`` and ``resumed_from``."""
    identity = {
        "bundle_id": inputs.bundle.id,
        "dataset_id": opts.dataset_id,
        "dataset_fingerprint": fingerprint,
        "hyperparameters": dict(hyper),
        "max_grad_norm": opts.max_grad_norm,
        "epsilon": opts.epsilon,
        "delta": opts.delta,
        "noise_multiplier": opts.noise_multiplier,
        "noise_seed": opts.noise_seed,
    }
    state = DPTrainState(state_dir_for(result.adapter_dir))
    if state.exists():
        # An interrupted run keeps its run id and σ; its recorded steps are never reset.
        meta = state.read_meta()
        if meta.get("identity", {}).get("identity") != identity:
            raise DataError(
                f"{state.directory} holds an interrupted run with other inputs or settings; "
                "remove it to start over (its spent budget stays recorded)"
            )
        run_id, plan = meta["identity"]["run_id"], DPPlan(**meta["identity"]["plan"])
        result.resumed_from = int(meta["step"])
    else:
        run_id = uuid.uuid4().hex

        def plan_against(prior: list[dict]) -> tuple[dict, DPPlan]:
            p = make_plan(
                len(inputs.train),
                opts.batch_size,
                opts.epochs,
                prior_history=prior,
                epsilon=opts.epsilon,
                delta=opts.delta,
                noise_multiplier=opts.noise_multiplier,
                max_grad_norm=opts.max_grad_norm,
            )
            return p.entry(p.steps), p

        # The whole run is reserved before it starts, so concurrent runs cannot overspend together.
        plan = history.reserve(opts.dataset_id, run_id, plan_against, opts.budget_dir)
    result.run_id, result.plan = run_id, plan
    if on_plan:
        on_plan(plan)
    if on_total:
        on_total(plan.steps)
    train_dp(
        inputs.model,
        inputs.view.named_parameters(),
        inputs.train,
        plan,
        lr=opts.lr,
        pad_id=inputs.tokenizer.pad_token_id,
        shift=inputs.bundle.task is Task.CAUSAL_LM,
        physical_batch_size=opts.physical_batch_size,
        state=state,
        identity={"identity": identity, "run_id": run_id, "plan": asdict(plan)},
        noise_seed=opts.noise_seed,
        checkpoint_every=opts.checkpoint_every,
        on_step=on_step,
        on_epoch=on_epoch,
    )
    return plan
