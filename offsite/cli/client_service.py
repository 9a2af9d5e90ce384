"""`offsite client jobs|fetch|submit|status` and `offsite client keys request|install`: the data
owner's side of the service.

Registered from ``offsite.cli.client`` and ``offsite.cli.keys`` with one call each; ``after_keys_init``
is the hook by which ``keys init`` also makes the TLS key and the enrolment request.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from offsite.cli.ui import console, err_console, print_json, table, warn


def _keys_dir(args: argparse.Namespace) -> Path:
    value = getattr(args, "keys_dir", None) or getattr(args, "dir", None)
    if value is not None:
        return Path(value)
    from offsite import state

    return state.client_dir()


def _connection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keys-dir",
        type=Path,
        default=None,
        help="the data owner's credentials (default: $OFFSITE_CLIENT_DIR, else the user config directory)",
    )
    p.add_argument(
        "--server",
        default=None,
        metavar="HOST:PORT",
        help="reach the server here instead of the address in the enrolment package (its certificate must "
        "still be for the enrolled server name)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


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
        "rejected (with the reason). An interrupted upload resumes when you run the command again.",
    )
    p.add_argument(
        "adapter", type=Path, metavar="ADAPTER", help="adapter directory from `offsite client train`"
    )
    p.add_argument("--job", required=True, help="the job the adapter was trained for")
    _connection_arguments(p)
    p.set_defaults(func=cmd_submit)

    p = cmds.add_parser(
        "status",
        help="the state of your submissions (uploading, received, rejected, accepted, plugged)",
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
    p.add_argument("--dir", "--keys-dir", dest="dir", type=Path, default=None, help="credentials directory")
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
    p.add_argument("--dir", "--keys-dir", dest="dir", type=Path, default=None, help="credentials directory")
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

    path = identity.write_request(_keys_dir(args))
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

    info = identity.install(_keys_dir(args), args.package)
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
    keys = _keys_dir(args)
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
        except ServerError as e:
            if args.json:
                print_json({"error": e.details, "code": e.code.name})
            raise OffsiteError(f"submission refused: {e.details} ({e.code.name})") from None
    info = _submission_json(result.submission)
    if args.json:
        print_json(info | {"resumed": result.resumed})
        return 0 if info["state"] in ("accepted", "plugged") else 3
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
    return 0 if info["state"] in ("accepted", "plugged") else 3


def cmd_status(args: argparse.Namespace) -> int:
    from offsite.client.transfers import remembered_submissions

    ids = list(args.submission_ids) or [s["submission_id"] for s in remembered_submissions(_keys_dir(args))]
    if not ids:
        if args.json:
            print_json({"submissions": []})
        else:
            console.print("no submissions made from this machine")
        return 0
    with _client(args) as c:
        rows = [_submission_json(c.status(i)) for i in ids]
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
