"""`offsite client jobs|fetch|submit|status` and `offsite client keys request|install`: the data
owner's side of the service; and the server's side of `offsite client budget --server` and
`offsite client train --server --job`.

Registered from ``offsite.cli.client`` and ``offsite.cli.keys`` with one call each; ``after_keys_init``
is the hook by which ``keys init`` also makes the TLS key and the enrolment request.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from offsite.cli.ui import console, err_console, print_json, table, warn

#: What --keys-dir means on every client command: one directory for everything of this data owner.
KEYS_DIR_HELP = (
    "the data owner's credentials directory: keys, enrolment, budget histories, ledger checkpoints "
    "(default: $OFFSITE_CLIENT_DIR, else the user config directory)"
)


def keys_dir(args: argparse.Namespace) -> Path:
    """The data owner's credentials directory of a client command (``--keys-dir``, else the default)."""
    value = getattr(args, "keys_dir", None) or getattr(args, "dir", None)
    if value is not None:
        return Path(value)
    from offsite import state

    return state.client_dir()


def _connection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys-dir", type=Path, default=None, help=KEYS_DIR_HELP)
    p.add_argument(
        "--server",
        default=None,
        metavar="HOST:PORT",
        help="reach the server here instead of the address in the enrolment package (its certificate must "
        "still be for the enrolled server name)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _server_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--server",
        nargs="?",
        const="",
        default=None,
        metavar="HOST:PORT",
        help=f"{what}: ask the owner's server (at the address of the enrolment package, or HOST:PORT; its "
        "certificate must still be for the enrolled server name)",
    )


def add_budget_server_arguments(p: argparse.ArgumentParser) -> None:
    """`client budget --server [HOST:PORT] [--keys-dir DIR]`."""
    _server_option(p, "show what the owner's ledger has recorded for your datasets and what remains")
    p.add_argument("--keys-dir", type=Path, default=None, help=KEYS_DIR_HELP)


def add_train_server_arguments(p: argparse.ArgumentParser) -> None:
    """`client train --server [HOST:PORT] --job JOB` (the DP group has --keys-dir)."""
    g = p.add_argument_group(
        "the owner's limits (with --server)",
        "Three limits apply to a run's dataset: this machine's budget, the job's maximum ε and the "
        "owner's grant for the dataset. With --server the server is asked for the job's maximum and the "
        "grant (and the runs its ledger holds for the dataset, which this machine must know about), and "
        "the run's target ε is the smallest of the limits (and --epsilon, if given), at the grant's δ.",
    )
    _server_option(g, "take the job's maximum ε and the dataset's grant into account")
    g.add_argument("--job", default=None, help="with --server: the job the adapter is for")


def register(cmds: argparse._SubParsersAction) -> None:
    p = cmds.add_parser(
        "jobs",
        help="list the jobs the model owner opened to you",
        description="Ask the owner's server which jobs this data owner is on, with each job's bundle and "
        "the policy a returned adapter must meet.",
    )
    _connection_arguments(p)
    p.set_defaults(func=cmd_jobs)

    p = cmds.add_parser(
        "fetch",
        help="download a job's bundle, checking the owner's signature and every hash",
        description="Download the bundle of JOB into --out. The manifest's signature is checked against the "
        "owner key of your enrolment package before anything else, then every file against the signed "
        "manifest, chunk by chunk. An interrupted download resumes when you run the command again.",
    )
    p.add_argument(
        "job", metavar="JOB", help="the job whose bundle to fetch (`offsite client jobs` lists them)"
    )
    p.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    _connection_arguments(p)
    p.set_defaults(func=cmd_fetch)

    p = cmds.add_parser(
        "submit",
        help="upload a trained adapter and its signed receipt to a job",
        description="Sign a submission envelope over ADAPTER's files (adapter.safetensors, adapter.json, "
        "receipt.json, receipt.sig) with your receipt key and upload them. The server checks the adapter "
        "against the job's bundle and the receipt against the job's privacy policy, and says accepted or "
        "rejected (with the reason). An interrupted upload resumes when you run the command again; one "
        "the server has expired meanwhile (no byte for its upload TTL, 24 h by default) starts afresh.",
    )
    p.add_argument(
        "adapter", type=Path, metavar="ADAPTER", help="adapter directory from `offsite client train`"
    )
    p.add_argument("--job", required=True, help="the job the adapter was trained for")
    _connection_arguments(p)
    p.set_defaults(func=cmd_submit)

    p = cmds.add_parser(
        "status",
        help="the state of your submissions (uploading, received, rejected, accepted, plugged, expired)",
        description="Ask the server for the state of SUBMISSION_ID, or of every submission made from this "
        "machine.",
    )
    p.add_argument(
        "submission_ids",
        nargs="*",
        metavar="SUBMISSION_ID",
        help="submissions to show (default: every submission this machine made)",
    )
    _connection_arguments(p)
    p.set_defaults(func=cmd_status)


def register_keys(cmds: argparse._SubParsersAction) -> None:
    p = cmds.add_parser(
        "request",
        help="write an enrolment request for this machine's keys",
        description="Write enrolment-request.json: a certificate signing request for this machine's TLS key "
        "(made now if there is none, 0600) and the receipt-signing public key, signed by the receipt key. "
        "Send it to the model owner (`offsite owner enrol`); no private key is in it.",
    )
    p.add_argument("--dir", "--keys-dir", dest="dir", type=Path, default=None, help=KEYS_DIR_HELP)
    p.add_argument("--json", action="store_true", help="print the path as JSON")
    p.set_defaults(func=cmd_keys_request)

    p = cmds.add_parser(
        "install",
        help="install the enrolment package the model owner sent back",
        description="Check and install an enrolment package (from `offsite owner enrol`): the certificate "
        "must be for this machine's TLS key and come from the CA in the package, and the owner must have "
        "enrolled this machine's receipt key. Replaces an earlier package.",
    )
    p.add_argument("package", type=Path, metavar="DIR", help="the enrolment package directory the owner sent")
    p.add_argument("--dir", "--keys-dir", dest="dir", type=Path, default=None, help=KEYS_DIR_HELP)
    p.add_argument("--json", action="store_true", help="print the enrolment as JSON")
    p.set_defaults(func=cmd_keys_install)


def after_keys_init(directory: Path, force: bool) -> dict:
    """``keys init`` also makes the TLS key (0600) and the enrolment request; returns their paths."""
    from offsite.client import identity

    key = identity.make_tls_key(directory, force=force)
    request = identity.write_request(directory)
    return {"tls_key": str(key), "enrolment_request": str(request)}


def enrolled_owner_key(keys_dir: Path):
    """For ``client train``: the owner key of the installed enrolment package (None if not enrolled),
    so a signed bundle is checked against it."""
    from offsite.client import identity

    return identity.owner_key(keys_dir)


# ------------------------------------------------------------------------------------------ commands


def cmd_keys_request(args: argparse.Namespace) -> int:
    from offsite.client import identity

    path = identity.write_request(keys_dir(args))
    if args.json:
        print_json({"enrolment_request": str(path)})
        return 0
    console.print(f"[green]enrolment request written[/green] to {path}")
    console.print(
        "send it to the model owner; install what comes back with `offsite client keys install DIR`"
    )
    return 0


def cmd_keys_install(args: argparse.Namespace) -> int:
    from offsite.client import identity

    info = identity.install(keys_dir(args), args.package)
    if args.json:
        print_json(info.model_dump())
        return 0
    console.print(f"[green]enrolment installed[/green]: client {info.client_id} of {info.server_address}")
    console.print(f"  owner signing key  sha256:{info.owner_key_fingerprint}")
    return 0


@contextlib.contextmanager
def _client(args: argparse.Namespace):
    from offsite.client import identity
    from offsite.client.transfers import OffsiteClient
    from offsite.wire import transport

    transport.tune_allocator()
    keys = keys_dir(args)
    credentials = identity.load_credentials(keys)

    def on_retry(reason: str, delay: float) -> None:
        err_console.print(f"[yellow]retrying in {delay:.1f} s[/yellow] ({reason})")

    with OffsiteClient(credentials, keys, args.server, on_retry=on_retry) as c:
        yield c


@contextlib.contextmanager
def _bars(enabled: bool) -> Iterator[Callable]:
    """One progress bar per transfer, on stderr (so --json output stays clean)."""
    if not enabled:
        yield lambda description, total: lambda done: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err_console,
    ) as bars:

        def bar(description: str, total: int):
            task = bars.add_task(description, total=total)
            return lambda done: bars.update(task, completed=done)

        yield bar


def cmd_jobs(args: argparse.Namespace) -> int:

    with _client(args) as c:
        jobs = c.list_jobs()
        rows = []
        for job in jobs:
            try:
                manifest = c.verified_manifest(job)
                signed = "ok"
            except Exception as e:  # noqa: BLE001 - shown, and `fetch` refuses it
                manifest, signed = None, f"BAD: {e}"
            rows.append(
                {
                    "job_id": job.job_id,
                    "bundle_id": job.bundle_id,
                    "signature": signed,
                    "model_type": manifest.source.model_type if manifest is not None else "?",
                    "max_epsilon": job.policy.max_epsilon,
                    "max_delta": job.policy.max_delta,
                    "allow_no_dp": job.policy.allow_no_dp,
                    "max_adapter_bytes": job.policy.max_adapter_bytes,
                    "published_at": job.published_at,
                }
            )
    if args.json:
        print_json({"jobs": rows})
        return 0
    if not rows:
        console.print("no jobs are open to you")
        return 0
    console.print(
        table(
            "jobs open to you",
            ["job", "bundle", "model", "max ε", "max δ", "DP", "owner signature", "published"],
            [
                (
                    r["job_id"],
                    r["bundle_id"][:16] + "…",
                    r["model_type"],
                    f"{r['max_epsilon']:g}",
                    f"{r['max_delta']:g}",
                    "optional" if r["allow_no_dp"] else "required",
                    r["signature"],
                    r["published_at"][:19],
                )
                for r in rows
            ],
        )
    )
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    with _client(args) as c, _bars(not args.json) as bar:
        bundle = c.fetch(args.job, args.out, progress=bar)
    if args.json:
        print_json(
            {"bundle": str(args.out), "bundle_id": bundle.id, "job_id": args.job, "signature": "verified"}
        )
        return 0
    console.print(
        f"[green]bundle fetched[/green] to {args.out}: owner signature and every file's sha256 verified"
    )
    console.print(f"bundle id  {bundle.id}")
    console.print(
        f"next: `offsite client train {args.out} --data FILE --out ADAPTER --dataset-id ID --epsilon E`"
    )
    return 0


_STATE_STYLE = {"accepted": "green", "plugged": "green", "rejected": "red"}


def _submission_json(s) -> dict:
    from offsite.client.transfers import STATE_NAMES

    return {
        "submission_id": s.submission_id,
        "job_id": s.job_id,
        "state": STATE_NAMES.get(s.state, "unknown"),
        "reason": s.reason,
        "dataset_id": s.dataset_id,
        "epsilon": s.epsilon,
        "delta": s.delta,
        "adapter_sha256": s.adapter_sha256,
        "created_at": s.created_at,
        "decided_at": s.decided_at,
    }


def cmd_submit(args: argparse.Namespace) -> int:
    from offsite.client.connection import ServerError
    from offsite.errors import OffsiteError

    with _client(args) as c, _bars(not args.json) as bar:
        try:
            result = c.submit(args.job, args.adapter, progress=bar)
        except ServerError as e:  # under --json, main prints it as the one JSON object
            raise OffsiteError(f"submission refused: {e.details} ({e.code.name})") from None
    info = _submission_json(result.submission) | {
        "ledger_checkpoint": str(result.checkpoint) if result.checkpoint else None
    }
    if result.checkpoint_problem:
        warn(f"the server's ledger checkpoint: {result.checkpoint_problem}")
    if args.json:
        print_json(info | {"resumed": result.resumed, "replaced_expired": result.replaced_expired or None})
        return 0 if info["state"] in ("accepted", "plugged") else 3
    if result.replaced_expired:
        warn(
            f"the interrupted upload {result.replaced_expired} had expired on the server (no byte for its "
            "upload TTL); the adapter was uploaded again from the start"
        )
    style = _STATE_STYLE.get(info["state"], "yellow")
    console.print(
        f"submission {info['submission_id']}: [{style}]{info['state']}[/{style}]"
        + (" (resumed)" if result.resumed else "")
    )
    if info["reason"]:
        console.print(f"reason: {info['reason']}")
    if info["dataset_id"]:
        console.print(
            f"dataset {info['dataset_id']}: cumulative ε = {info['epsilon']:.4g} at δ = {info['delta']:g}"
        )
    if result.checkpoint:
        console.print(f"ledger checkpoint kept: {result.checkpoint}")
    return 0 if info["state"] in ("accepted", "plugged") else 3


def cmd_status(args: argparse.Namespace) -> int:
    from offsite.client.transfers import remembered_submissions

    ids = list(args.submission_ids) or [s["submission_id"] for s in remembered_submissions(keys_dir(args))]
    if not ids:
        if args.json:
            print_json({"submissions": []})
        else:
            console.print("no submissions made from this machine")
        return 0
    with _client(args) as c:
        records = [c.status(i) for i in ids]
        for record in records:
            c.keep_checkpoint(record.ledger_checkpoint)
        rows = [_submission_json(r) for r in records]
    if args.json:
        print_json({"submissions": rows})
        return 0
    console.print(
        table(
            "submissions",
            ["submission", "job", "state", "dataset", "ε", "decided", "reason"],
            [
                (
                    r["submission_id"],
                    r["job_id"],
                    r["state"],
                    r["dataset_id"] or "-",
                    f"{r['epsilon']:.3f}" if r["dataset_id"] else "-",
                    (r["decided_at"] or "-")[:19],
                    r["reason"][:80],
                )
                for r in rows
            ],
        )
    )
    if any(r["state"] == "rejected" for r in rows):
        warn("rejected submissions are not used; the reason says what to fix")
    return 0


# ------------------------------------------------------------------------------------------ budgets


def _runs(view) -> list[dict]:
    from offsite.privacy.accounting import MECHANISM

    return [
        {
            "run_id": r.run_id,
            "mechanism": MECHANISM,
            "noise_multiplier": r.noise_multiplier,
            "sample_rate": r.sample_rate,
            "steps": r.steps,
        }
        for r in view.runs
    ]


def _budget_json(view) -> dict:
    return {
        "dataset_id": view.dataset_id,
        "granted": view.granted,
        "grant": {"epsilon": view.grant_epsilon, "delta": view.grant_delta, "at": view.granted_at}
        if view.granted
        else None,
        "spent_epsilon": view.spent_epsilon,
        "remaining_epsilon": view.remaining_epsilon if view.granted else None,
        "accepted_submissions": view.accepted_submissions,
        "runs": _runs(view),
    }


def cmd_server_budget(args: argparse.Namespace) -> int:
    """`client budget --server`: the server's ledger for this data owner's datasets, beside this machine's."""
    from offsite.privacy import history, ledger_budget

    wanted = [history.validate_dataset_id(d) for d in args.dataset_ids]
    with _client(args) as c:
        responses = [c.budget(d) for d in wanted] if wanted else [c.budget()]
    views = [v for response, _, _ in responses for v in response.datasets]
    kept = [k for _, k, _ in responses if k is not None]
    problems = [p for _, _, p in responses if p]
    client_dir = keys_dir(args)
    rows = []
    for view in views:
        row = _budget_json(view)
        local = history.read(view.dataset_id, client_dir)
        row["this_machine"] = None
        if local.version is not None:  # this machine has a history of the dataset
            mine = history.cumulative_history(view.dataset_id, client_dir)
            row["this_machine"] = {
                "budget": None
                if local.budget is None
                else {"epsilon": local.budget.epsilon, "delta": local.budget.delta},
                "unknown_runs": ledger_budget.omission(_runs(view), mine),
            }
        rows.append(row)
    info = {"datasets": rows, "checkpoint": str(kept[-1]) if kept else None, "checkpoint_problems": problems}
    if args.json:
        print_json(info)
        return 0 if not problems else 1
    if not rows:
        console.print("the owner's ledger holds no grant and no submission of yours")
    else:
        console.print(
            table(
                "the owner's ledger: your datasets (ε composed over the recorded runs, never added)",
                ["dataset", "grant ε", "δ", "spent ε", "remaining", "accepted", "runs"],
                [
                    (
                        r["dataset_id"],
                        f"{r['grant']['epsilon']:g}" if r["grant"] else "none",
                        f"{r['grant']['delta']:g}" if r["grant"] else "-",
                        f"{r['spent_epsilon']:.4f}",
                        f"{r['remaining_epsilon']:.4f}" if r["grant"] else "-",
                        r["accepted_submissions"],
                        len(r["runs"]),
                    )
                    for r in rows
                ],
            )
        )
        console.print(
            "remaining = grant ε - spent ε, how far the composed total is below the grant; a further run "
            "is composed with the recorded ones (`client train --server --job` does it)"
        )
        for r in rows:
            if r["grant"] is None:
                warn(
                    f"{r['dataset_id']}: no grant: the server refuses its DP submissions until the owner grants one"
                )
            mine = r["this_machine"]
            if mine and mine["unknown_runs"]:
                warn(
                    f"{r['dataset_id']}: the server holds runs this machine has not recorded: {mine['unknown_runs']}"
                )
    if kept:
        console.print(f"ledger checkpoint kept: {kept[-1]}")
    for p in problems:
        warn(f"the server's ledger checkpoint: {p}")
    return 0 if not problems else 1


def server_limits(args: argparse.Namespace) -> dict:
    """For `client train --server --job`: the run's target ε (the smallest of the limits) and δ (the
    grant's), after checking that this machine knows every run the server's ledger holds."""
    from offsite.errors import OffsiteError

    if not args.job:
        raise OffsiteError("--server needs --job JOB: the job's maximum ε is one of the limits")
    if args.no_dp:
        raise OffsiteError("--server sets the privacy target of a DP run; it cannot be used with --no-dp")
    if not args.dataset_id:
        raise OffsiteError("--server needs --dataset-id: grants are per dataset")
    with _client(args) as c:
        return limits_from_server(
            c, args.job, args.dataset_id, keys_dir(args), epsilon=args.epsilon, delta=args.delta
        )


def limits_from_server(
    c,
    job_id: str,
    dataset_id: str,
    budget_dir: Path,
    epsilon: float | None = None,
    delta: float | None = None,
) -> dict:
    """The limits of a DP run on ``dataset_id`` for job ``job_id``, asked of the server through the
    connected client ``c`` (an ``OffsiteClient``): the job's maximum ε, the owner's grant, this machine's
    budget in ``budget_dir`` and ``epsilon`` (if given); the target is the smallest, at the grant's δ
    (within the job's maximum). Refuses when the server's ledger holds runs ``budget_dir`` does not know
    (a receipt from here would leave them out), and ``delta`` other than that δ."""
    from offsite.errors import OffsiteError
    from offsite.privacy import history, ledger_budget

    dataset_id = history.validate_dataset_id(dataset_id)
    job = c.job(job_id)
    response, kept, problem = c.budget(dataset_id)
    if problem:
        raise OffsiteError(f"the server's ledger checkpoint: {problem}")
    view = next((v for v in response.datasets if v.dataset_id == dataset_id), None)
    if view is None or not view.granted:
        raise OffsiteError(
            f"the owner has granted no budget for dataset {dataset_id}: the server would refuse the adapter. "
            f"Ask the owner for `offsite owner grant CLIENT_ID {dataset_id} --epsilon E --delta D`"
        )
    unknown = ledger_budget.omission(_runs(view), history.cumulative_history(dataset_id, budget_dir))
    if unknown:
        raise OffsiteError(
            f"the server's ledger holds runs on {dataset_id} that this machine has not recorded ({unknown}); "
            "a receipt from this machine would leave them out and be refused"
        )
    run_delta = view.grant_delta
    if job.policy.max_delta < run_delta:
        run_delta = job.policy.max_delta
    if delta is not None and delta != run_delta:
        raise OffsiteError(
            f"--delta {delta:g}: with --server the run is accounted at δ = {run_delta:g} (the grant's, within "
            "the job's maximum); leave --delta out"
        )
    limits = {f"job {job.job_id}'s maximum": job.policy.max_epsilon, "the owner's grant": view.grant_epsilon}
    local = history.read(dataset_id, budget_dir).budget
    if local is not None:
        if local.delta != run_delta:
            raise OffsiteError(
                f"dataset {dataset_id}'s budget on this machine is at δ = {local.delta:g}, the grant's at "
                f"δ = {run_delta:g}: `offsite client set-budget {dataset_id} --epsilon E --delta {run_delta:g}` "
                "first"
            )
        limits["this machine's budget"] = local.epsilon
    if epsilon is not None:
        limits["--epsilon"] = epsilon
    chosen = min(limits, key=limits.get)
    return {
        "epsilon": limits[chosen],
        "delta": run_delta,
        "limits": limits,
        "chosen": chosen,
        "spent_on_server": view.spent_epsilon,
        "checkpoint": str(kept) if kept else None,
    }
