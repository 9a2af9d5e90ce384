"""The data owner's connection to the owner's server: mutual TLS, retries with backoff, clear errors.

The channel presents the client certificate from the enrolment package and trusts only the owner's
CA from the same package. Host-name checking stays on: the server must present a certificate for the
name in the enrolment package, also when ``--server HOST:PORT`` reaches it under another address.

Calls that fail with UNAVAILABLE (server down or restarting), RESOURCE_EXHAUSTED (server full),
ABORTED (another stream on the same upload) or DEADLINE_EXCEEDED are retried with exponential backoff
and full jitter; transfers resume where the other side says they stopped. Other failures become an
``OffsiteError`` that carries the server's status code and message.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from offsite.client.identity import Credentials
from offsite.errors import OffsiteError
from offsite.wire import transport
from offsite.wire.v1 import offsite_pb2_grpc

T = TypeVar("T")

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


class ServerError(OffsiteError):
    """The server refused a call; ``code`` is its gRPC status code."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"server: {details} ({code.name})")
        self.code = code
        self.details = details


def server_error(error: grpc.RpcError) -> ServerError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"cannot reach the server ({details})"
    return ServerError(code, details or code.name)


def retryable(error: BaseException) -> bool:
    return isinstance(error, grpc.RpcError) and error.code() in RETRYABLE


class Backoff:
    """Exponential backoff with full jitter; gives up after ``budget`` seconds without progress."""

    def __init__(
        self, budget: float = transport.RETRY_BUDGET_S, on_retry: Callable[[str, float], None] | None = None
    ):
        self.budget = budget
        self.on_retry = on_retry
        self.progress()

    def progress(self) -> None:
        self._attempt = 0
        self._since = time.monotonic()

    def wait(self, error: grpc.RpcError) -> None:
        """Sleep before the next attempt, or raise the error as an OffsiteError if the budget is spent."""
        if time.monotonic() - self._since > self.budget:
            raise server_error(error) from None
        delay = random.uniform(0, min(transport.RETRY_MAX_S, transport.RETRY_INITIAL_S * 2**self._attempt))
        self._attempt += 1
        if self.on_retry:
            self.on_retry(f"{error.code().name}: {error.details()}", delay)
        time.sleep(delay)


def open_channel(credentials: Credentials, server: str | None = None) -> grpc.Channel:
    """A mutual-TLS channel to ``server`` (default: the address in the enrolment package)."""
    tls = grpc.ssl_channel_credentials(
        root_certificates=credentials.ca_pem,
        private_key=credentials.tls_key_pem,
        certificate_chain=credentials.cert_pem,
    )
    options = transport.channel_options() + [("grpc.ssl_target_name_override", credentials.server_name)]
    return grpc.secure_channel(server or credentials.server_address, tls, options=options)


def stub(channel: grpc.Channel) -> offsite_pb2_grpc.OffsiteServiceStub:
    return offsite_pb2_grpc.OffsiteServiceStub(channel)


def unary(call: Callable[..., T], request, backoff: Backoff) -> T:
    """A unary call with the standard deadline, retried while the error is retryable."""
    while True:
        try:
            result = call(request, timeout=transport.UNARY_DEADLINE_S)
            backoff.progress()
            return result
        except grpc.RpcError as e:
            if not retryable(e):
                raise server_error(e) from None
            backoff.wait(e)
