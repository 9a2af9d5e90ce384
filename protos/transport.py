"""Every transfer setting of both sides in one place: chunk size, message limits, keepalive, deadlines.

The numbers follow two rules (docs/service.md explains them to operators):

* A message must fit in the limit on both sides, with room to spare: a chunk is at most
  ``MAX_CHUNK_BYTES`` (4 MiB, the most a client may send) and a message at most ``MAX_MESSAGE_BYTES``
  (chunk + 1 MiB for the other fields). One message never approaches protobuf's 2 GB ceiling, so
  files of any size move as streams of chunks.
* Transfers time out only when they make no progress (``STALL_TIMEOUT_S``), never because a large file
  takes long; short calls get a plain deadline; dead peers are found by HTTP/2 keepalive pings.
"""

from __future__ import annotations

import ctypes
import ctypes.util

MiB = 1 << 20

#: Size of the chunks both sides send (bundle files down, submission files up).
CHUNK_BYTES = 1 * MiB
#: The largest chunk the server accepts in an upload.
MAX_CHUNK_BYTES = 4 * MiB
#: The largest gRPC message either side sends or receives (a chunk plus its fields, or one page of jobs).
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + 1 * MiB

#: Deadline of a unary call (listing jobs, opening a submission, asking a status).
UNARY_DEADLINE_S = 30.0
#: A stream that moves no byte for this long is ended by either side (the transfer is resumable).
STALL_TIMEOUT_S = 60.0
#: After finish_write, how long the client waits for the server's checks (receipt accounting included).
DECIDE_TIMEOUT_S = 300.0

#: A second stream on the same submission waits this long for the first to end, then gets ABORTED.
WRITER_WAIT_S = 2.0

#: The server makes received bytes durable (fsync, then the committed offset) this often, and at the
#: end of every stream: a crash loses at most this much of an upload, never anything reported.
COMMIT_INTERVAL_S = 0.5
COMMIT_BYTES = 64 * MiB

#: On SIGTERM the server stops taking calls and lets calls in flight finish for this long.
DRAIN_GRACE_S = 30.0
#: Threads serving calls (each open stream holds one) and calls admitted at once (the rest get
#: RESOURCE_EXHAUSTED, which clients retry with backoff).
MAX_WORKERS = 64
MAX_CONCURRENT_RPCS = 256

#: What one enrolled data owner may hold of the server (``server.limits.ServerLimits``; each has an
#: ``offsite serve`` flag). An upload session with no committed byte for UPLOAD_TTL_S is expired (its
#: partial files deleted); the janitor looks for such sessions this often (or every quarter TTL, if
#: shorter), and once when the server starts.
UPLOAD_TTL_S = 24 * 3600.0
JANITOR_INTERVAL_S = 600.0
#: Open (uploading) submissions per client, and the bytes they may declare together.
MAX_OPEN_UPLOADS = 4
UPLOAD_QUOTA_BYTES = 4096 * MiB
#: Calls per client: a token bucket refilled at CALLS_PER_SECOND holding at most CALL_BURST calls; over
#: it, RESOURCE_EXHAUSTED (clients back off and retry). At most MAX_CALLS_PER_CLIENT of one client's
#: calls are open at once, so no single client holds more than that many of the MAX_WORKERS threads.
CALLS_PER_SECOND = 20.0
CALL_BURST = 60
MAX_CALLS_PER_CLIENT = 8

#: Client retries of UNAVAILABLE / RESOURCE_EXHAUSTED / ABORTED: exponential backoff with full jitter,
#: until RETRY_BUDGET_S have passed without any progress.
RETRY_INITIAL_S = 0.25
RETRY_MAX_S = 8.0
RETRY_BUDGET_S = 120.0

#: Keepalive: the server pings idle connections every 30 s and drops a peer that does not answer in 10
#: s; it accepts client pings at most every 10 s (more often is a "ping strike").
_KEEPALIVE_TIME_MS = 30_000
_KEEPALIVE_TIMEOUT_MS = 10_000
_MIN_PING_INTERVAL_MS = 10_000


#: glibc's malloc serves blocks this large from its heap, and keeps this much free memory at the heap's
#: top, instead of mapping fresh pages for every chunk-sized buffer and returning them on free: every
#: chunk allocates a few 1 MiB buffers (the message, its serialised bytes, the bytes a field access
#: copies), and faulting in 256 fresh pages for each cost more CPU than hashing the chunk
#: (docs/benchmarks.md, "Transfers"). The threshold is above the largest message.
MALLOC_MMAP_THRESHOLD = 8 * MiB
MALLOC_TRIM_THRESHOLD = 32 * MiB
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h


def tune_allocator() -> bool:
    """Set the malloc thresholds above for this process (``offsite serve``, the client commands); False
    where the C library has no ``mallopt`` (not glibc), which changes nothing else."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
        and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    )


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", _KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", _MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
        # gRPC sets SO_REUSEPORT by default: a second server on the same port would silently share the
        # calls. Without it, starting a second server on a port in use fails.
        ("grpc.so_reuseport", 0),
    ]


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", _KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 0),
        # The client does its own retries (with resume); gRPC's transparent retries would hide them.
        ("grpc.enable_retries", 0),
    ]
