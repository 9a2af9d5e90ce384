"""Who is calling, checked at the start of every call and between the chunks of every stream.

grpcio checks that a client certificate chains to the owner's CA during the TLS handshake, but it has
no revocation lists, and a ``ServerInterceptor`` sees no peer identity. So ``AuthInterceptor`` wraps
each method handler of ``offsite.v1``: the wrapped handler reads the peer certificate from
``context.auth_context()``, takes the sha256 of its DER bytes and looks it up among the pins recorded
at enrolment; an unknown or revoked certificate gets UNAUTHENTICATED before the servicer runs. The
same wrapper turns the service's ``OffsiteError`` into its status code (``errors.status_for``).

Every open call is registered in ``CallRegistry``. A watcher thread polls the revocation table every
``POLL_S`` seconds: a stream of a revoked client fails its next between-chunks check, and one that is
blocked (waiting for a chunk, or for a reader) is cancelled; calls that make no progress for
``transport.STALL_TIMEOUT_S`` are cancelled too. Revocation takes effect within POLL_S + CANCEL_AFTER_S.

Once identified, a caller is held to its share of the server (``limits.ServerLimits``): a token bucket
of calls per second, and a number of calls open at once, so that one enrolled client cannot take every
thread. Over either, RESOURCE_EXHAUSTED, which clients retry with backoff. Both are in memory, per
server process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from offsite import crypto, pki
from offsite.errors import OffsiteError
from offsite.server.errors import (
    RateLimitedError,
    RevokedError,
    StalledError,
    UnauthenticatedError,
    status_for,
)
from offsite.server.limits import RateLimiter, ServerLimits
from offsite.server.storage.base import Storage
from offsite.wire import transport

log = logging.getLogger("offsite.server")

POLL_S = 0.2
CANCEL_AFTER_S = 0.3
#: Methods under these prefixes are authenticated; the standard health service is open to any peer
#: that completed the mutual-TLS handshake (load balancers and probes).
AUTHENTICATED_PREFIXES = ("/offsite.v1.", "/grpc.reflection.")


@dataclass(frozen=True)
class Caller:
    client_id: str
    cert_sha256: str
    receipt_key: Ed25519PublicKey


@dataclass(eq=False)
class Call:
    """One open call: who makes it, and whether it may go on."""

    caller: Caller
    context: grpc.ServicerContext
    registry: CallRegistry
    last_progress: float = field(default_factory=time.monotonic)
    revoked_at: float | None = None
    stalled: bool = False

    def check(self) -> None:
        """Between chunks: the caller must not be revoked meanwhile, nor the call stalled."""
        if self.revoked_at is not None or self.caller.cert_sha256 in self.registry.revoked:
            raise RevokedError(f"client {self.caller.client_id} was revoked")
        if self.stalled:
            raise StalledError(f"no progress for {transport.STALL_TIMEOUT_S:g} s")
        self.last_progress = time.monotonic()

    def checked(self, messages: Iterator) -> Iterator:
        """The request stream, checked before each message is handed on."""
        for message in messages:
            self.check()
            yield message


class CallRegistry:
    def __init__(self, storage: Storage):
        self._storage = storage
        self._calls: set[Call] = set()
        self._lock = threading.Lock()
        self.revoked: frozenset[str] = storage.revoked_certs()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="offsite-revocation-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def open(self, caller: Caller, context: grpc.ServicerContext, max_per_client: int | None = None) -> Call:
        """Register a call; RateLimitedError if the caller has ``max_per_client`` calls open already."""
        call = Call(caller, context, self)
        with self._lock:
            if max_per_client is not None:
                mine = sum(1 for c in self._calls if c.caller.client_id == caller.client_id)
                if mine >= max_per_client:
                    raise RateLimitedError(
                        f"client {caller.client_id} has {mine} calls open, the most it may have at once: "
                        "retry when one has ended"
                    )
            self._calls.add(call)
        return call

    def close(self, call: Call) -> None:
        with self._lock:
            self._calls.discard(call)

    def open_calls(self) -> int:
        with self._lock:
            return len(self._calls)

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.revoked = self._storage.revoked_certs()
            except Exception:  # a locked or busy database must not kill the watcher
                log.exception("could not read the revocation table")
            now = time.monotonic()
            with self._lock:
                calls = list(self._calls)
            for call in calls:
                if call.caller.cert_sha256 in self.revoked and call.revoked_at is None:
                    call.revoked_at = now
                if now - call.last_progress > transport.STALL_TIMEOUT_S:
                    call.stalled = True
                # The call's own checks end it with the right status if it is moving; a call blocked in
                # a read or a write is cancelled.
                if (call.revoked_at is not None and now - call.revoked_at > CANCEL_AFTER_S) or (
                    call.stalled and now - call.last_progress > transport.STALL_TIMEOUT_S + CANCEL_AFTER_S
                ):
                    call.context.cancel()
                    self.close(call)


class Authenticator:
    def __init__(self, storage: Storage, registry: CallRegistry, limits: ServerLimits | None = None):
        self._storage = storage
        self.registry = registry
        self.limits = limits or ServerLimits()
        self._rate = RateLimiter(self.limits.calls_per_second, self.limits.call_burst)

    def admit(self, caller: Caller, context: grpc.ServicerContext) -> Call:
        """The caller's call rate and open calls within its limits: register the call."""
        wait = self._rate.take(caller.client_id)
        if wait:
            raise RateLimitedError(
                f"client {caller.client_id} is over {self.limits.calls_per_second:g} calls a second "
                f"(burst {self.limits.call_burst}): retry in {wait:.2f} s"
            )
        return self.registry.open(caller, context, self.limits.max_calls_per_client)

    def identify(self, context: grpc.ServicerContext) -> Caller:
        certs = context.auth_context().get("x509_pem_cert")
        if not certs:
            raise UnauthenticatedError(
                "no client certificate: calls need the certificate from your enrolment"
            )
        pin = pki.pem_cert_sha256(certs[0])
        client = self._storage.client_by_cert(pin)
        if client is None:
            raise UnauthenticatedError("this client certificate is not enrolled with this server")
        if client.revoked_at is not None:
            raise RevokedError(f"client {client.client_id} was revoked at {client.revoked_at}")
        return Caller(client.client_id, pin, crypto.public_key_from_b64(client.receipt_key))


class CallContext:
    """The servicer's view of a context: the real one, plus the authenticated ``call``."""

    def __init__(self, context: grpc.ServicerContext, call: Call):
        self._context = context
        self.call = call

    def __getattr__(self, name: str):
        return getattr(self._context, name)


def _abort(context: grpc.ServicerContext, error: Exception) -> None:
    if isinstance(error, OffsiteError):
        code, details = status_for(error)
    else:
        log.exception("internal error", exc_info=error)
        code, details = grpc.StatusCode.INTERNAL, "internal error (logged on the server)"
    context.abort(code, details)


def _guard(auth: Authenticator, behaviour: Callable, request_streaming: bool, response_streaming: bool):
    """Wrap one method's behaviour: identify, register, map errors, unregister."""

    def begin(context: grpc.ServicerContext) -> Call:
        try:
            return auth.admit(auth.identify(context), context)
        except Exception as e:  # noqa: BLE001 - mapped to a status by _abort
            _abort(context, e)
            raise  # unreachable: abort raises

    if response_streaming:

        def stream(request_or_iterator, context):
            call = begin(context)
            try:
                if request_streaming:
                    request_or_iterator = call.checked(request_or_iterator)
                for response in behaviour(request_or_iterator, CallContext(context, call)):
                    call.check()
                    yield response
            except Exception as e:  # noqa: BLE001
                if not context.is_active():
                    return
                _abort(context, e)
            finally:
                auth.registry.close(call)

        return stream

    def unary(request_or_iterator, context):
        call = begin(context)
        try:
            if request_streaming:
                request_or_iterator = call.checked(request_or_iterator)
            return behaviour(request_or_iterator, CallContext(context, call))
        except Exception as e:  # noqa: BLE001
            if not context.is_active():
                return None
            _abort(context, e)
        finally:
            auth.registry.close(call)

    return unary


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, auth: Authenticator):
        self._auth = auth

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(AUTHENTICATED_PREFIXES):
            return handler
        kinds = {
            (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
            (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
            (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
            (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
        }
        attr, make = kinds[(handler.request_streaming, handler.response_streaming)]
        behaviour = getattr(handler, attr)
        return make(
            _guard(self._auth, behaviour, handler.request_streaming, handler.response_streaming),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
