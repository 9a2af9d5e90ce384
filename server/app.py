"""``offsite serve``: the owner's gRPC server, its TLS, health and reflection, and a clean shutdown.

**Sync server, deliberately.** Each call's work blocks: SQLite transactions that wait for fsync,
file reads and fsyncs of uploads, safetensors validation, the receipt's privacy accounting (CPU for
a second or more). Under ``grpc.aio`` all of it would have to be pushed to an executor anyway, so the
thread pool would stay and the event loop would be one more thing to get right; and a sync handler can
be cancelled from the revocation watcher with ``context.cancel()``. The cost is one thread per open
call: ``transport.MAX_WORKERS`` threads and ``MAX_CONCURRENT_RPCS`` admitted calls (the rest get
RESOURCE_EXHAUSTED, which clients retry) are plenty for tens of data owners per server.

Mutual TLS always: the server presents ``STATE/tls/server.pem`` and requires a client certificate
that chains to ``STATE/ca/ca.pem``; the CA's key is never read. The standard health service
(``grpc.health.v1``) and reflection are served on the same port under the same TLS. On SIGTERM or
SIGINT the server reports NOT_SERVING, stops accepting calls, lets calls in flight finish for up to
``grace`` seconds (``transport.DRAIN_GRACE_S``, or ``offsite serve --drain-seconds``), cancels those
still running (their clients resume later) and exits 0. The janitor thread (``janitor``), which
expires abandoned uploads, runs from the start until the drain begins.

``insecure_loopback``: plaintext on a loopback address, health only (for tests of the process
itself); any other address is refused.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from offsite.errors import OffsiteError
from offsite.server.auth import Authenticator, AuthInterceptor, CallRegistry
from offsite.server.janitor import Janitor
from offsite.server.limits import ServerLimits
from offsite.server.owner_state import OwnerState, read_server_config
from offsite.server.service import OffsiteService
from offsite.server.servicer import OffsiteServicer
from offsite.wire import transport
from offsite.wire.v1 import offsite_pb2, offsite_pb2_grpc

log = logging.getLogger("offsite.server")

SERVICE_NAME = offsite_pb2.DESCRIPTOR.services_by_name["OffsiteService"].full_name


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class OffsiteServer:
    """One server on one state directory. ``start`` returns the bound port (useful with port 0)."""

    def __init__(
        self,
        state_dir,
        host: str = "0.0.0.0",
        port: int | None = None,
        insecure_loopback: bool = False,
        limits: ServerLimits | None = None,
    ):
        self.host = host
        self.limits = limits or ServerLimits()
        self.insecure_loopback = insecure_loopback
        if insecure_loopback and not is_loopback(host):
            raise OffsiteError(f"--insecure-loopback serves plaintext on loopback only, not on {host!r}")
        self.state = OwnerState(state_dir)
        self.port = port
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.registry = CallRegistry(self.state.storage)
        self.server: grpc.Server | None = None
        self.service: OffsiteService | None = None
        self.janitor: Janitor | None = None

    def _credentials(self) -> grpc.ServerCredentials:
        paths = self.state.paths
        try:
            key, cert, ca = (
                paths.server_key.read_bytes(),
                paths.server_cert.read_bytes(),
                paths.ca_cert.read_bytes(),
            )
        except FileNotFoundError as e:
            raise OffsiteError(
                f"{e.filename} is missing: run `offsite owner init --state {paths.root} --server-name NAME` first"
            ) from None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def start(self) -> int:
        paths = self.state.paths
        if self.port is None:
            self.port = read_server_config(paths).port
        interceptors = (
            []
            if self.insecure_loopback
            else [AuthInterceptor(Authenticator(self.state.storage, self.registry, self.limits))]
        )
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=transport.MAX_WORKERS, thread_name_prefix="offsite-call"),
            interceptors=interceptors,
            options=transport.server_options(),
            maximum_concurrent_rpcs=transport.MAX_CONCURRENT_RPCS,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        listen = address(self.host, self.port)
        try:
            bound = self._listen(server, listen)
        except RuntimeError:  # grpcio raises when the port cannot be bound
            bound = 0
        if not bound:
            server.stop(None)
            self.state.close()
            raise OffsiteError(
                f"cannot listen on {listen}: the port is in use, or not an address of this machine"
            )
        self.port = bound
        self.registry.start()
        if self.service is not None:
            self.janitor = Janitor(self.service)
            self.janitor.start()
        server.start()
        self.server = server
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return bound

    def _listen(self, server: grpc.Server, listen: str) -> int:
        if self.insecure_loopback:
            return server.add_insecure_port(listen)
        service = self.service = OffsiteService(self.state, limits=self.limits)
        service.recover()  # expires abandoned uploads too
        offsite_pb2_grpc.add_OffsiteServiceServicer_to_server(OffsiteServicer(service), server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        return server.add_secure_port(listen, self._credentials())

    def stop(self, grace: float = transport.DRAIN_GRACE_S) -> None:
        """Report NOT_SERVING, refuse new calls, let calls in flight finish for ``grace`` seconds."""
        self.health.enter_graceful_shutdown()
        if self.janitor is not None:
            self.janitor.stop()
        if self.server is not None:
            self.server.stop(grace).wait()
        self.registry.stop()
        self.state.close()


def run(
    state_dir,
    host: str,
    port: int | None,
    insecure_loopback: bool = False,
    on_ready: Callable[[OffsiteServer], None] | None = None,
    grace: float = transport.DRAIN_GRACE_S,
    limits: ServerLimits | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT, then drain and return 0."""
    transport.tune_allocator()
    server = OffsiteServer(state_dir, host, port, insecure_loopback, limits)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    if on_ready:
        on_ready(server)
    while not stop.wait(0.5):  # a timed wait, so the signal handler runs promptly
        pass
    log.info("draining: calls in flight have %s s to finish", grace)
    server.stop(grace)
    return 0
