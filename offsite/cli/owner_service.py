"""`offsite owner init|enrol|revoke|publish|submissions|grant|export-ledger`: the model owner's side of
the service.

Registered from ``offsite.cli.owner`` with one call; also the helpers ``owner prepare`` and
``owner plug`` use to reach the owner's state (record of issued bundles, accepted submissions).
Every command works on the state directory (``--state``, default ``$OFFSITE_OWNER_DIR``) with or
without ``offsite serve`` running.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from offsite.cli.ui import console, print_json, table


def add_state_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state",
        type=Path,
        default=None,
        help="the owner's state directory (default: $OFFSITE_OWNER_DIR, else the user data directory "
        "offsite/owner)",
    )


def state_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "state", None) is not None:
        return args.state
    from offsite import state

    return state.owner_dir()


def _open(args: argparse.Namespace):
    from offsite.server.owner_state import OwnerState

    return OwnerState(state_dir(args))


def register(cmds: argparse._SubParsersAction) -> None:
    p = cmds.add_parser(
        "init",
        help="create the owner's CA, server certificate, signing key and database",
        description="Set up a state directory for `offsite serve`: a certificate authority (its key "
        "signs client certificates at enrolment; `serve` never reads it), a server certificate for "
        "--server-name (the name clients connect to and check), the owner's Ed25519 key that signs "
        "published bundles, and the database. Private keys are created 0600. Refuses an initialised "
        "directory.",
    )
    add_state_argument(p)
    p.add_argument(
        "--server-name",
        required=True,
        help="DNS name or IP address clients will connect to (the certificate's subject alternative name)",
    )
    p.add_argument(
        "--port", type=int, default=None, help="port written into enrolment packages (default 50051)"
    )
    p.add_argument("--json", action="store_true", help="print the paths as JSON")
    p.set_defaults(func=cmd_init)

    p = cmds.add_parser(
        "enrol",
        help="admit a data owner: certify its enrolment request, write its enrolment package",
        description="Check REQUEST (made by `offsite client keys init` or `keys request` on the data "
        "owner's machine: a certificate request and its receipt-signing public key, signed by that key), "
        "issue a client certificate for CLIENT_ID, record the client and its receipt key, and write the "
        "enrolment package to --out (client certificate, the owner's CA certificate, the owner's signing "
        "public key, the server's address). Send the package back; no private key travels either way.",
    )
    p.add_argument("request", type=Path, help="the data owner's enrolment-request.json")
    p.add_argument("--client-id", required=True, help="name for this data owner (letters, digits, . _ -)")
    add_state_argument(p)
    p.add_argument("--out", type=Path, required=True, help="directory to write the enrolment package to")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_enrol)

    p = cmds.add_parser(
        "revoke",
        help="revoke a data owner: its calls are refused and its open transfers end",
        description="Mark CLIENT_ID revoked. A running server refuses its next call and ends its open "
        "streams within a second; its accepted submissions stay on record.",
    )
    p.add_argument("client_id", metavar="CLIENT_ID", help="the enrolled client to revoke")
    add_state_argument(p)
    p.add_argument("--reason", default="revoked by the owner", help="recorded with the revocation")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_revoke)

    p = cmds.add_parser(
        "publish",
        help="sign a bundle and open a job on it to enrolled data owners",
        description="Verify BUNDLE's files against its manifest, sign the manifest with the owner's key, "
        "store the files for download, and open job JOB to the listed clients with the policy that "
        "decides which returned adapters count: the receipt's cumulative ε on its dataset at most "
        "--max-epsilon, its δ at most --max-delta, and (unless --allow-no-dp) a valid DP receipt.",
    )
    p.add_argument("bundle", type=Path, help="bundle directory (from `offsite owner prepare`)")
    p.add_argument("--job", required=True, help="job id (letters, digits, . _ -)")
    p.add_argument("--clients", required=True, help="comma-separated enrolled client ids allowed on the job")
    p.add_argument(
        "--max-epsilon", type=float, required=True, help="largest cumulative ε a receipt may state"
    )
    p.add_argument("--max-delta", type=float, required=True, help="largest δ a receipt may be stated at")
    p.add_argument(
        "--allow-no-dp",
        action="store_true",
        help="also accept adapters trained without differential privacy (default: refuse them)",
    )
    add_state_argument(p)
    p.add_argument("--json", action="store_true", help="print the job as JSON")
    p.set_defaults(func=cmd_publish)

    p = cmds.add_parser(
        "submissions",
        help="list data owners' submissions and their state",
        description="Every submission with its state (uploading, received, rejected with the reason, "
        "accepted, plugged, or expired: abandoned for the server's upload TTL), client, job, dataset and ε.",
    )
    p.add_argument("--job", default=None, help="only this job")
    p.add_argument(
        "--only",
        dest="states",
        default=None,
        help="only these states, comma-separated (uploading,received,rejected,accepted,plugged,expired)",
    )
    add_state_argument(p)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_submissions)

    p = cmds.add_parser(
        "grant",
        help="grant a data owner's dataset a privacy budget (ε, δ), recorded in the ledger",
        description="Grant CLIENT_ID's dataset DATASET_ID (the dataset id its receipts name) a budget: the "
        "server accepts a DP submission for the dataset only while the union of the runs its accepted "
        "receipts record, composed (never added) at δ = --delta, stays within ε = --epsilon (PRV upper "
        "bound). Without a grant the dataset's submissions are refused. Granting again replaces the grant "
        "in force; every grant is a signed entry of the ledger. Works with or without the server running.",
    )
    p.add_argument("client_id", metavar="CLIENT_ID", help="the enrolled data owner")
    p.add_argument("dataset_id", metavar="DATASET_ID", help="its dataset id, as its receipts name it")
    p.add_argument("--epsilon", type=float, required=True, help="the most ε the dataset may spend, composed")
    p.add_argument("--delta", type=float, required=True, help="the δ at which ε is computed")
    add_state_argument(p)
    p.add_argument("--json", action="store_true", help="print the grant as JSON")
    p.set_defaults(func=cmd_grant)

    p = cmds.add_parser(
        "export-ledger",
        help="write the signed ledger as one self-contained file for an auditor",
        description="Write FILE: every ledger entry with the owner's signature, the owner's public key, the "
        "enrolled clients' receipt keys and certificate pins as recorded, signed over the whole by the "
        "owner's key. An auditor checks it with `offsite audit ledger FILE`, without access to the server. "
        "Refuses an existing FILE.",
    )
    add_state_argument(p)
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="the export file to create")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_export_ledger)


# ------------------------------------------------------------------------------------------ commands


def cmd_init(args: argparse.Namespace) -> int:
    from offsite.server.owner_state import DEFAULT_PORT, init_owner

    paths = init_owner(state_dir(args), args.server_name, args.port or DEFAULT_PORT)
    info = {
        "state": str(paths.root),
        "ca_certificate": str(paths.ca_cert),
        "ca_key": str(paths.ca_key),
        "server_certificate": str(paths.server_cert),
        "server_key": str(paths.server_key),
        "signing_public_key": str(paths.signing_public_key),
        "server_name": args.server_name,
        "port": args.port or DEFAULT_PORT,
    }
    if args.json:
        print_json(info)
        return 0
    console.print(f"[green]owner state initialised[/green] in {paths.root}")
    console.print(f"  CA certificate      {paths.ca_cert}")
    console.print(
        f"  CA key              {paths.ca_key}  (0600; needed to enrol, never by `serve`: keep it offline)"
    )
    console.print(f"  server certificate  {paths.server_cert}  (for {args.server_name})")
    console.print(f"  signing key         {paths.signing_key}  (0600; signs published bundles)")
    console.print(
        f"next: `offsite serve --state {paths.root}` and `offsite owner enrol REQUEST --client-id ID`"
    )
    return 0


def cmd_enrol(args: argparse.Namespace) -> int:
    from offsite.errors import OffsiteError
    from offsite.server import admin

    try:
        request = args.request.read_bytes()
    except OSError as e:
        raise OffsiteError(f"cannot read {args.request}: {e.strerror}") from None
    with _open(args) as state:
        record = admin.enrol(state, request, args.client_id, args.out, str(args.request))
    info = {
        "client_id": record.client_id,
        "certificate_sha256": record.cert_sha256,
        "receipt_key_fingerprint": record.receipt_key_fingerprint,
        "package": str(args.out),
    }
    if args.json:
        print_json(info)
        return 0
    console.print(f"[green]enrolled[/green] {record.client_id}")
    console.print(f"  certificate sha256        {record.cert_sha256}")
    console.print(f"  receipt key fingerprint   {record.receipt_key_fingerprint}")
    console.print(f"  enrolment package         {args.out}  (send it to the data owner)")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from offsite.server import admin

    with _open(args) as state:
        record = admin.revoke(state, args.client_id, args.reason)
    if args.json:
        print_json(
            {"client_id": record.client_id, "revoked_at": record.revoked_at, "reason": record.revoked_reason}
        )
        return 0
    console.print(
        f"[green]revoked[/green] {record.client_id} at {record.revoked_at} ({record.revoked_reason})"
    )
    return 0


def _job_json(job) -> dict:
    return {
        "job_id": job.job_id,
        "bundle_id": job.bundle_id,
        "clients": list(job.clients),
        "max_epsilon": job.max_epsilon,
        "max_delta": job.max_delta,
        "allow_no_dp": job.allow_no_dp,
        "max_adapter_bytes": job.max_adapter_bytes,
        "published_at": job.published_at,
    }


def cmd_publish(args: argparse.Namespace) -> int:
    from offsite.server import admin

    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    with _open(args) as state:
        job = admin.publish(
            state,
            args.bundle,
            job_id=args.job,
            clients=clients,
            max_epsilon=args.max_epsilon,
            max_delta=args.max_delta,
            allow_no_dp=args.allow_no_dp,
        )
    if args.json:
        print_json(_job_json(job))
        return 0
    console.print(
        f"[green]published[/green] job {job.job_id} (bundle {job.bundle_id[:16]}…) to {', '.join(job.clients)}"
    )
    console.print(
        f"  accepts: cumulative ε ≤ {job.max_epsilon:g}, δ ≤ {job.max_delta:g}, "
        f"{'non-private adapters too' if job.allow_no_dp else 'DP receipts required'}, "
        f"adapter ≤ {job.max_adapter_bytes} bytes"
    )
    return 0


def submission_json(s) -> dict:
    return {
        "submission_id": s.submission_id,
        "client_id": s.client_id,
        "job_id": s.job_id,
        "state": s.state.value,
        "reason": s.reason,
        "dataset_id": s.dataset_id,
        "epsilon": s.epsilon,
        "delta": s.delta,
        "adapter_sha256": s.adapter_sha256,
        "bytes": s.total,
        "committed": s.committed,
        "created_at": s.created_at,
        "decided_at": s.decided_at,
        "plugged_at": s.plugged_at,
    }


def cmd_submissions(args: argparse.Namespace) -> int:
    from offsite.errors import OffsiteError
    from offsite.server import admin
    from offsite.server.storage.base import SubmissionState

    states = None
    if args.states:
        try:
            states = [SubmissionState(s.strip()) for s in args.states.split(",") if s.strip()]
        except ValueError:
            raise OffsiteError(
                f"--only {args.states!r}: states are {', '.join(s.value for s in SubmissionState)}"
            ) from None
    with _open(args) as state:
        rows = [submission_json(s) for s in admin.submissions(state, args.job, states)]
    if args.json:
        print_json({"submissions": rows})
        return 0
    if not rows:
        console.print("no submissions")
        return 0
    console.print(
        table(
            "submissions",
            ["submission", "client", "job", "state", "dataset", "ε", "δ", "created", "reason"],
            [
                (
                    r["submission_id"],
                    r["client_id"],
                    r["job_id"],
                    r["state"],
                    r["dataset_id"] or "-",
                    f"{r['epsilon']:.3f}" if r["dataset_id"] else "-",
                    f"{r['delta']:g}" if r["dataset_id"] else "-",
                    r["created_at"][:19],
                    r["reason"][:80],
                )
                for r in rows
            ],
        )
    )
    return 0


def cmd_grant(args: argparse.Namespace) -> int:
    from offsite.cli.ui import warn
    from offsite.server import admin

    with _open(args) as state:
        view = admin.grant(state, args.client_id, args.dataset_id, args.epsilon, args.delta)
        spent = view.spent()
    info = {
        "client_id": view.client_id,
        "dataset_id": view.dataset_id,
        "epsilon": args.epsilon,
        "delta": args.delta,
        "entry": view.grant.index if view.grant else None,
        "spent_epsilon": spent,
        "accepted_submissions": view.accepted,
    }
    if args.json:
        print_json(info)
        return 0
    console.print(
        f"[green]granted[/green] {view.client_id} / {view.dataset_id}: ε = {args.epsilon:g} at δ = "
        f"{args.delta:g} (ledger entry {info['entry']})"
    )
    console.print(
        f"  recorded so far: {view.accepted} accepted submission(s), ε = {spent:.4f} at δ = {args.delta:g} "
        "(PRV upper bound, runs composed)"
    )
    if spent > args.epsilon:
        warn("the dataset has already spent more than this grant: its further submissions will be refused")
    return 0


def cmd_export_ledger(args: argparse.Namespace) -> int:
    from offsite.formats.ledger import parse_export
    from offsite.server import admin

    with _open(args) as state:
        path = admin.export_ledger(state, args.out)
    export = parse_export(path.read_bytes())
    info = {
        "export": str(path),
        "entries": len(export.entries),
        "ledger_id": export.ledger_id,
        "head": export.head,
        "owner_key_fingerprint": export.owner_key_fingerprint,
    }
    if args.json:
        print_json(info)
        return 0
    console.print(f"[green]ledger exported[/green] to {path}: {info['entries']} signed entries")
    console.print(f"  ledger id   {export.ledger_id}")
    console.print(f"  owner key   sha256:{export.owner_key_fingerprint}  (give the auditor this to pin)")
    console.print(f"next: `offsite audit ledger {path} --owner-pubkey OWNER_KEY.pem`")
    return 0


# ------------------------------------------------------------------------------------------ prepare and plug


def record_prepared(args: argparse.Namespace, bundle_dir: Path) -> None:
    """After `owner prepare`: keep the bundle's manifest in the owner's record of issued bundles."""
    from offsite.server import admin

    with _open(args) as state:
        admin.record_bundle(state, bundle_dir)


@contextlib.contextmanager
def plug_inputs(args: argparse.Namespace) -> Iterator[tuple[Path, object, object]]:
    """For `owner plug`: (adapter directory, manifest source, call after success).

    ``--bundle DIR`` needs no owner state at all; otherwise the manifest comes from the record of
    issued bundles, and ``--submission ID`` takes an accepted submission's files from the state.
    """
    with plug_source(
        state_dir(args), adapter=args.adapter, submission=args.submission, bundle=args.bundle, out=args.out
    ) as inputs:
        yield inputs


@contextlib.contextmanager
def plug_source(
    state: Path,
    *,
    adapter: Path | None = None,
    submission: str | None = None,
    bundle: Path | None = None,
    out: Path,
) -> Iterator[tuple[Path, object, object]]:
    """What `owner plug` plugs, from the owner's state directory ``state``: (adapter directory, manifest
    source, call after success: records the submission as plugged into ``out``). Give ``adapter`` or
    ``submission`` (an accepted submission's id)."""
    from offsite.errors import OffsiteError
    from offsite.plug import manifest_from_bundle_dir

    if (adapter is None) == (submission is None):
        raise OffsiteError("give either ADAPTER (a directory) or --submission ID, not both or neither")
    if submission is None and bundle is not None:
        yield adapter, manifest_from_bundle_dir(bundle), lambda: None
        return
    from offsite.server import admin
    from offsite.server.owner_state import OwnerState

    with OwnerState(state) as owner:
        manifests = manifest_from_bundle_dir(bundle) if bundle else admin.manifest_source(owner)
        if submission is None:
            yield adapter, manifests, lambda: None
            return
        with (
            tempfile.TemporaryDirectory(prefix=".offsite-plug-", dir=owner.paths.root) as scratch,
            admin.accepted_adapter(owner, submission, Path(scratch)) as adapter_dir,
        ):
            yield (
                adapter_dir,
                manifests,
                lambda: admin.mark_plugged(owner, submission, str(Path(out).resolve())),
            )
