"""The service's errors and the one table that maps every ``OffsiteError`` to a gRPC status code.

The service layer and the storage raise ``OffsiteError`` subclasses with messages meant for the data
owner at the other end; the servicer turns them into a status with ``status_for`` and nothing else.
Anything that is not an ``OffsiteError`` is a bug: the caller gets INTERNAL without details, and the
server logs the traceback.
"""

from __future__ import annotations

import grpc

from offsite.errors import BudgetError, FormatError, IntegrityError, MismatchError, OffsiteError


class NotFoundError(OffsiteError):
    """No such job, submission or file (or not one the caller may see)."""


class AlreadyExistsError(OffsiteError):
    """A client, job or bundle with this id exists already."""


class UnauthenticatedError(OffsiteError):
    """The caller's certificate is unknown, revoked, or not from the owner's CA."""


class RevokedError(UnauthenticatedError):
    """The caller's certificate was revoked (also ends its open streams)."""


class SignatureError(UnauthenticatedError):
    """A submission envelope or receipt is unsigned or not signed by the caller's enrolled key."""


class PermissionDeniedError(OffsiteError):
    """The caller is known but may not do this (for example a job it is not on)."""


class ReplayError(OffsiteError):
    """A submission envelope's nonce was seen before."""


class ClockSkewError(OffsiteError):
    """A submission envelope's time is outside the window around the server's clock."""


class OffsetError(OffsiteError):
    """A chunk's offset is not the next byte expected (out of order, overlapping, or past the end)."""


class ChunkIntegrityError(IntegrityError):
    """A chunk or a whole file does not match its sha256."""


class FileIntegrityError(ChunkIntegrityError):
    """A whole uploaded file does not match the sha256 its signed envelope declared."""


class IncompleteUploadError(OffsiteError):
    """finish_write arrived before every declared byte."""


class LimitError(OffsiteError):
    """Over a size limit (chunk, file, job's adapter size)."""


class PolicyError(OffsiteError):
    """The submission does not meet the job's privacy policy (ε, δ, DP required)."""


class BusyError(OffsiteError):
    """Another stream is writing this submission; retry shortly."""


class LedgerConflictError(BusyError):
    """A budget entry of the same (client, dataset) was appended while a decision was being made: the
    decision is made again on the new state (the service retries; a caller that sees it retries too)."""


class NoGrantError(PolicyError):
    """No budget grant for the submitting client's dataset: the ledger refuses to count it."""


class GrantExceededError(PolicyError):
    """Accepting the submission would take the dataset's composed ε past its grant."""


class HistoryOmissionError(PolicyError):
    """The receipt's cumulative history leaves out a run the ledger already holds for its dataset."""


class QuotaError(OffsiteError):
    """The client holds as many open uploads (or declared bytes in them) as it may: final until some of
    them are finished or expire, so not RESOURCE_EXHAUSTED, which clients retry."""


class UploadExpiredError(OffsiteError):
    """The upload session was expired (no byte for longer than the TTL; its partial files are gone)."""


class RateLimitedError(OffsiteError):
    """The client is over its call rate, or has as many calls open as it may: retry after a moment."""


class StalledError(OffsiteError):
    """A stream made no progress for too long."""


# Most specific first: the first class an error is an instance of decides its code.
_CODES: tuple[tuple[type[OffsiteError], grpc.StatusCode], ...] = (
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (ReplayError, grpc.StatusCode.ALREADY_EXISTS),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (ClockSkewError, grpc.StatusCode.FAILED_PRECONDITION),
    (OffsetError, grpc.StatusCode.OUT_OF_RANGE),
    (IncompleteUploadError, grpc.StatusCode.FAILED_PRECONDITION),
    (ChunkIntegrityError, grpc.StatusCode.DATA_LOSS),
    # Not RESOURCE_EXHAUSTED: that is also gRPC's "server full", which clients retry; a limit is final.
    (LimitError, grpc.StatusCode.OUT_OF_RANGE),
    (QuotaError, grpc.StatusCode.FAILED_PRECONDITION),
    (UploadExpiredError, grpc.StatusCode.FAILED_PRECONDITION),
    # Retried by clients with backoff (client/connection.py), which is what a rate limit wants.
    (RateLimitedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PolicyError, grpc.StatusCode.FAILED_PRECONDITION),
    (BudgetError, grpc.StatusCode.FAILED_PRECONDITION),
    (BusyError, grpc.StatusCode.ABORTED),
    (StalledError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (MismatchError, grpc.StatusCode.INVALID_ARGUMENT),
    (IntegrityError, grpc.StatusCode.INVALID_ARGUMENT),
    (FormatError, grpc.StatusCode.INVALID_ARGUMENT),
    (OffsiteError, grpc.StatusCode.INVALID_ARGUMENT),
)

#: Details are cut to this length: a status travels in an HTTP/2 trailer.
MAX_DETAILS = 1000


def status_for(error: OffsiteError) -> tuple[grpc.StatusCode, str]:
    code = next(c for cls, c in _CODES if isinstance(error, cls))
    details = str(error)
    if len(details) > MAX_DETAILS:
        details = details[: MAX_DETAILS - 1] + "…"
    return code, details
