"""`offsite serve`: run the model owner's gRPC server on a state directory."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="model owner: run the server data owners fetch bundles from and submit adapters to",
        description="Serve the owner's jobs over gRPC with mutual TLS: data owners enrolled with `offsite "
        "owner enrol` list their jobs, download signed bundles and upload adapters with signed receipts, "
        "which are checked before they count. Needs `offsite owner init` first; reads the server "
        "certificate and key, never the CA key. Health (grpc.health.v1) and reflection are on the same "
        "port. SIGTERM or Ctrl-C drains calls in flight (up to --drain-seconds) and exits 0. docs/service.md "
        "says how to expose it to the internet.",
    )
    from offsite.cli.owner_service import add_state_argument
    from offsite.wire import transport

    add_state_argument(p)
    p.add_argument(
        "--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: every interface)"
    )
    p.add_argument(
        "--port", type=int, default=None, help="port (default: the one given to `owner init`, 50051)"
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=transport.DRAIN_GRACE_S,
        metavar="S",
        help=f"on SIGTERM or Ctrl-C, how long calls in flight may run before they are cancelled "
        f"(default {transport.DRAIN_GRACE_S:.0f}; keep it below your supervisor's kill timeout)",
    )
    g = p.add_argument_group(
        "limits per data owner",
        "what one enrolled client may hold of the server (docs/service.md, 'Limits and timeouts')",
    )
    g.add_argument(
        "--upload-ttl",
        type=float,
        default=transport.UPLOAD_TTL_S / 3600,
        metavar="HOURS",
        help="an upload with no new byte for this long is expired: its partial files are deleted and "
        "its state becomes 'expired' (default %(default)g; checked at start and every quarter TTL, at "
        f"most every {transport.JANITOR_INTERVAL_S / 60:g} minutes)",
    )
    g.add_argument(
        "--max-open-uploads",
        type=int,
        default=transport.MAX_OPEN_UPLOADS,
        metavar="N",
        help="open (uploading) submissions per client; one more is refused (default %(default)s)",
    )
    g.add_argument(
        "--upload-quota-mib",
        type=float,
        default=transport.UPLOAD_QUOTA_BYTES / transport.MiB,
        metavar="MIB",
        help="bytes a client's open submissions may declare together (default %(default)g MiB)",
    )
    g.add_argument(
        "--calls-per-second",
        type=float,
        default=transport.CALLS_PER_SECOND,
        metavar="R",
        help="calls per client per second, on average (default %(default)g; a token bucket)",
    )
    g.add_argument(
        "--call-burst",
        type=int,
        default=transport.CALL_BURST,
        metavar="N",
        help="calls per client in a burst above that rate (default %(default)s)",
    )
    g.add_argument(
        "--max-calls-per-client",
        type=int,
        default=transport.MAX_CALLS_PER_CLIENT,
        metavar="N",
        help=f"calls one client may have open at once, of the server's {transport.MAX_WORKERS} threads "
        "(default %(default)s)",
    )
    p.add_argument(
        "--insecure-loopback",
        action="store_true",
        help="tests only: plaintext, health service only, and only on a loopback address",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from offsite.cli.owner_service import state_dir
    from offsite.server import app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = state_dir(args)
    if not args.insecure_loopback and not Path(state).joinpath("server.json").is_file():
        from offsite.errors import OffsiteError

        raise OffsiteError(
            f"{state} is not initialised: run `offsite owner init --state {state} --server-name NAME`"
        )

    def ready(server) -> None:
        mode = "plaintext, health only" if server.insecure_loopback else "mutual TLS"
        # Tests and scripts read this line to learn the port (with --port 0).
        print(f"serving on {app.address(server.host, server.port)} ({mode}); state {state}", flush=True)

    if not args.drain_seconds >= 0:  # also refuses nan
        from offsite.errors import OffsiteError

        raise OffsiteError(f"--drain-seconds must be 0 or more, not {args.drain_seconds}")
    return app.run(
        state,
        args.host,
        args.port,
        args.insecure_loopback,
        on_ready=ready,
        grace=args.drain_seconds,
        limits=limits_of(args),
    )


def limits_of(args: argparse.Namespace):
    """The flags as ``ServerLimits`` (which refuses zero, negative and non-finite values)."""
    from offsite.server.limits import ServerLimits
    from offsite.wire import transport

    quota = args.upload_quota_mib * transport.MiB
    return ServerLimits(
        upload_ttl_s=args.upload_ttl * 3600,
        max_open_uploads=args.max_open_uploads,
        upload_quota_bytes=int(quota) if math.isfinite(quota) else quota,
        calls_per_second=args.calls_per_second,
        call_burst=args.call_burst,
        max_calls_per_client=args.max_calls_per_client,
    )
