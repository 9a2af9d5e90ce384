"""The mission over the wire, as `offsite demo` runs it (and its test, with several data owners).

One model owner and N data owners, each step through the library call its command uses:

1. owner: ``offsite owner init`` (its own CA, a server certificate for ``localhost``, the Ed25519
   signing key, the SQLite database) and ``offsite owner prepare`` (the bundle, recorded as issued);
2. owner: ``offsite serve``: a real gRPC server with mutual TLS on 127.0.0.1, on a port the system picks
   (port 0), in this process;
3. each data owner: ``offsite client keys init`` (signing key, TLS key, enrolment request); owner:
   ``offsite owner enrol``; data owner: ``offsite client keys install``;
4. owner: ``offsite owner grant`` (one budget per data owner's dataset) and ``offsite owner publish``
   (signs the bundle's manifest, opens the job to every data owner);
5. each data owner, over gRPC: ``offsite client jobs``, ``client fetch`` (owner signature and every
   hash checked), ``client train --server --job`` (DP, at the smallest of the job's maximum, the grant
   and the local budget), ``client submit`` (adapter + signed receipt; the server verifies them and
   accepts, and returns a signed ledger checkpoint the data owner keeps);
6. owner: ``offsite owner plug MODEL --submission ID`` with the first data owner's accepted submission;
   then the server is stopped (always, also on an error or Ctrl-C);
7. auditor: ``offsite audit ledger OWNER_STATE --owner-pubkey KEY --checkpoints DIR --client-key ID=PEM``
   with the owner key from a data owner's enrolment package, the checkpoints every data owner kept and
   each data owner's receipt key (``audit``).

The work directory (``Layout``): ``owner/`` the owner's state; ``bundle/`` the bundle the owner
prepared; ``merged/`` the plugged model; ``packages/ID/`` the enrolment package sent to ``ID``;
``ID/keys/`` data owner ``ID``'s credentials directory (what ``$OFFSITE_CLIENT_DIR`` is on its machine:
keys, enrolment, budget history, ``checkpoints/``), ``ID/bundle/`` the bundle it fetched and
``ID/adapter/`` the adapter it trained and submitted; ``auditor/`` what the data owners handed the
auditor (the owner's public key, ``checkpoints/ID/``). The enrolment packages name ``localhost:50051``
(``owner init``'s default port): the demo's own server listens on a free port and the data owners are
pointed at it, as ``--server HOST:PORT`` does; after the demo, ``offsite serve --state DIR/owner``
serves the kept state where the packages say.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from offsite.cli.progress import step_bar
from offsite.cli.ui import warn

SERVER_NAME = "localhost"
HOST = "127.0.0.1"
STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class DataOwner:
    client_id: str
    train_file: Path
    dataset_id: str


@dataclass(frozen=True)
class Policy:
    """The owner's terms (the job's maximum and each dataset's grant) and the data owners' training."""

    job_id: str
    epsilon: float  # the job's maximum ε and each dataset's grant
    delta: float  # the job's maximum δ and each grant's δ
    seed: int = 0
    physical_batch: int = 32
    #: Hyperparameters the data owners give (epochs, lr, batch_size); the rest come from the DP defaults,
    #: as with `offsite client train` when a flag is left out.
    train: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def owner(self) -> Path:
        return self.root / "owner"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def auditor(self) -> Path:
        return self.root / "auditor"

    def package(self, client_id: str) -> Path:
        return self.root / "packages" / client_id

    def keys(self, client_id: str) -> Path:
        return self.root / client_id / "keys"

    def fetched(self, client_id: str) -> Path:
        return self.root / client_id / "bundle"

    def adapter(self, client_id: str) -> Path:
        return self.root / client_id / "adapter"


@dataclass
class Trained:
    """What one data owner did: its run's limits, DP defaults, receipt, and the server's decision."""

    client_id: str
    limits: dict
    defaults: dict
    receipt: dict
    noise_multiplier: float
    submission_id: str
    state: str
    checkpoint: Path | None


@dataclass
class Mission:
    layout: Layout
    job_id: str
    port: int
    owners: dict[str, Trained]
    plugged: str  # the submission plugged into layout.merged


class Timings:
    """Seconds per stage; a stage run once per data owner adds up."""

    def __init__(self, into: dict[str, float]):
        self.seconds = into

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def check_new_work(root: Path) -> None:
    """A work directory must be new or empty: `owner init` refuses to replace an owner's CA and keys."""
    from offsite.errors import OffsiteError

    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise OffsiteError(f"{root} exists and is not an empty directory: give a new directory to --keep")


def run_mission(
    layout: Layout,
    model_dir: Path,
    prepare_options,
    owners: Sequence[DataOwner],
    policy: Policy,
    timings: Timings,
    train_stage: str = "client train with DP",
    on_server: Callable[[int], None] | None = None,
) -> Mission:
    """Steps 1-6 of the module docstring, in ``layout.root`` (new or empty)."""
    from offsite.prepare import prepare
    from offsite.server import admin
    from offsite.server.app import OffsiteServer
    from offsite.server.owner_state import OwnerState, init_owner

    if not owners:
        raise ValueError("the mission needs at least one data owner")
    check_new_work(layout.root)
    layout.root.mkdir(parents=True, exist_ok=True)
    with timings("owner init (CA, server certificate, signing key, database)"):
        init_owner(layout.owner, SERVER_NAME)
    with timings("owner prepare" + (" + distillation" if prepare_options.distill else "")):
        if prepare_options.distill:
            with step_bar("owner: distilling the emulator", prepare_options.distill.steps, "kd") as bar:
                prepare(model_dir, layout.bundle, prepare_options, on_distill_step=bar)
        else:
            prepare(model_dir, layout.bundle, prepare_options)
        with OwnerState(layout.owner) as state:
            admin.record_bundle(state, layout.bundle)  # as `owner prepare --state` does
    with timings("server start (mutual TLS on loopback)"):
        server = OffsiteServer(layout.owner, host=HOST, port=0)  # port 0: the system picks a free one
        port = server.start()
    try:
        if on_server:
            on_server(port)
        with timings("enrol (keys, request, certificate, package)"):
            for owner in owners:
                _enrol(layout, owner.client_id)
        with timings("owner grant + publish (signs the bundle)"), OwnerState(layout.owner) as state:
            for owner in owners:
                admin.grant(state, owner.client_id, owner.dataset_id, policy.epsilon, policy.delta)
            admin.publish(
                state,
                layout.bundle,
                job_id=policy.job_id,
                clients=[o.client_id for o in owners],
                max_epsilon=policy.epsilon,
                max_delta=policy.delta,
            )
        trained = {}
        for owner in owners:
            trained[owner.client_id] = _data_owner(layout, owner, policy, port, timings, train_stage)
        first = trained[owners[0].client_id]
        with timings("owner plug (accepted submission)"):
            _plug(layout, model_dir, first.submission_id)
    finally:
        with timings("server stop"):
            server.stop(STOP_GRACE_S)
    return Mission(layout, policy.job_id, port, trained, first.submission_id)


def _enrol(layout: Layout, client_id: str) -> None:
    """`client keys init` on the data owner's machine, `owner enrol`, `client keys install`."""
    from offsite import crypto
    from offsite.cli.client_service import after_keys_init
    from offsite.client import identity
    from offsite.server import admin
    from offsite.server.owner_state import OwnerState

    keys = layout.keys(client_id)
    crypto.init_client_keys(keys)
    request = Path(after_keys_init(keys, force=False)["enrolment_request"])
    with OwnerState(layout.owner) as state:
        admin.enrol(state, request.read_bytes(), client_id, layout.package(client_id), str(request))
    identity.install(keys, layout.package(client_id))


def _client(layout: Layout, client_id: str, port: int):
    from offsite.client import identity
    from offsite.client.transfers import OffsiteClient

    keys = layout.keys(client_id)
    return OffsiteClient(identity.load_credentials(keys), keys, f"{HOST}:{port}")


def _data_owner(
    layout: Layout, owner: DataOwner, policy: Policy, port: int, timings: Timings, train_stage: str
) -> Trained:
    """`client jobs`, `client fetch`, `client train --server --job`, `client submit`."""
    from offsite.cli.client_service import enrolled_owner_key, limits_from_server
    from offsite.client.transfers import STATE_NAMES
    from offsite.errors import OffsiteError
    from offsite.training.dp_defaults import DEFAULTED
    from offsite.tune import TuneOptions, tune

    cid, keys = owner.client_id, layout.keys(owner.client_id)
    with timings("fetch (job list, owner signature, every hash)"), _client(layout, cid, port) as c:
        if policy.job_id not in {j.job_id for j in c.list_jobs()}:
            raise OffsiteError(f"job {policy.job_id} is not open to {cid}")
        c.fetch(policy.job_id, layout.fetched(cid))
    with timings(train_stage):
        with _client(layout, cid, port) as c:
            limits = limits_from_server(c, policy.job_id, owner.dataset_id, keys)
        given = dict(policy.train)
        opts = TuneOptions(
            **given,
            dp_defaults_for=tuple(name for name in DEFAULTED if name not in given),
            seed=policy.seed,
            eval_fraction=0.0,
            dataset_id=owner.dataset_id,
            epsilon=limits["epsilon"],
            delta=limits["delta"],
            physical_batch_size=policy.physical_batch,
            keys_dir=keys,
            budget_dir=keys,
            bundle_owner_key=enrolled_owner_key(keys),
        )
        defaults: dict = {}
        with step_bar(f"{cid}: DP training (ε={limits['epsilon']:g})") as bar:
            result = tune(
                layout.fetched(cid),
                owner.train_file,
                layout.adapter(cid),
                opts,
                on_step=bar,
                on_total=bar.set_total,
                on_warning=warn,
                on_defaults=lambda d: defaults.update(d.to_json()),
            )
    with timings("submit + verify (upload, server checks, ledger)"), _client(layout, cid, port) as c:
        submitted = c.submit(policy.job_id, layout.adapter(cid))
    state = STATE_NAMES.get(submitted.submission.state, "unknown")
    if state != "accepted":
        raise OffsiteError(f"{cid}'s submission is {state}: {submitted.submission.reason}")
    if submitted.checkpoint is None:
        raise OffsiteError(f"{cid} kept no ledger checkpoint: {submitted.checkpoint_problem or 'none sent'}")
    return Trained(
        client_id=cid,
        limits=limits,
        defaults=defaults,
        receipt=result.receipt,
        noise_multiplier=result.plan.noise_multiplier,
        submission_id=submitted.submission.submission_id,
        state=state,
        checkpoint=submitted.checkpoint,
    )


def _plug(layout: Layout, model_dir: Path, submission_id: str) -> None:
    """`owner plug MODEL --submission ID --out merged`."""
    from offsite.cli.owner_service import plug_source
    from offsite.plug import plug

    with plug_source(layout.owner, submission=submission_id, out=layout.merged) as (adapter, manifests, done):
        plug(model_dir, adapter, layout.merged, manifests)
        done()


def audit(layout: Layout, client_ids: Sequence[str]):
    """Step 7: the data owners hand the auditor the owner key of their enrolment package, the
    checkpoints they kept and their own receipt keys (copied to ``auditor/``); the auditor runs `offsite audit ledger` on the owner's
    state with them. Returns the ``LedgerReport``."""
    from offsite import crypto
    from offsite.client import checkpoints, identity
    from offsite.formats import enrolment
    from offsite.privacy.ledger_audit import audit_ledger

    pinned = layout.auditor / enrolment.OWNER_KEY
    layout.auditor.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(
        identity.ClientPaths(layout.keys(client_ids[0])).package_file(enrolment.OWNER_KEY), pinned
    )
    client_keys = {}
    for cid in client_ids:
        shutil.copytree(
            checkpoints.directory(layout.keys(cid)), layout.auditor / "checkpoints" / cid, dirs_exist_ok=True
        )
        receipt_key = layout.auditor / f"{cid}.pub.pem"  # the data owner's receipt key, handed over directly
        shutil.copyfile(crypto.KeyPaths.in_dir(layout.keys(cid)).public_key, receipt_key)
        client_keys[cid] = crypto.load_public_key(receipt_key)
    return audit_ledger(
        layout.owner,
        owner_pubkey=crypto.load_public_key(pinned),
        checkpoints=layout.auditor / "checkpoints",
        client_keys=client_keys,
    )


def audit_passed(report, n_owners: int) -> bool:
    """The demo's verdict: the audit passed, with the owner key and every data owner's receipt key pinned
    and every data owner's checkpoint found in the ledger."""
    from offsite.privacy.receipt_audit import OK

    return (
        report.ok
        and report.owner_key_pinned
        and report.check("checkpoints").status == OK
        and report.checkpoints_checked >= n_owners
        and report.check("client keys").status == OK
    )
