"""What one enrolled data owner may hold of the server: upload sessions, their bytes, calls.

The defaults are in ``offsite.wire.transport`` (with every other limit); ``offsite serve`` flags
override them. All of it is per server process and in memory except the upload counts, which the
storage checks in the transaction that opens an upload (so they hold across restarts too).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from offsite.errors import OffsiteError
from offsite.wire import transport


@dataclass(frozen=True)
class ServerLimits:
    upload_ttl_s: float = transport.UPLOAD_TTL_S
    max_open_uploads: int = transport.MAX_OPEN_UPLOADS
    upload_quota_bytes: int = transport.UPLOAD_QUOTA_BYTES
    calls_per_second: float = transport.CALLS_PER_SECOND
    call_burst: int = transport.CALL_BURST
    max_calls_per_client: int = transport.MAX_CALLS_PER_CLIENT

    def __post_init__(self) -> None:
        positive = {
            "the upload TTL (--upload-ttl)": self.upload_ttl_s,
            "open uploads per client (--max-open-uploads)": self.max_open_uploads,
            "the upload quota (--upload-quota-mib)": self.upload_quota_bytes,
            "calls per second (--calls-per-second)": self.calls_per_second,
            "the call burst (--call-burst)": self.call_burst,
            "open calls per client (--max-calls-per-client)": self.max_calls_per_client,
        }
        for what, value in positive.items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise OffsiteError(f"{what} must be a positive number, not {value!r}")

    @property
    def janitor_interval_s(self) -> float:
        """How often abandoned uploads are looked for: often enough that none outlives its TTL by more
        than a quarter of it."""
        return min(transport.JANITOR_INTERVAL_S, self.upload_ttl_s / 4)

    def ttl_text(self) -> str:
        hours = self.upload_ttl_s / 3600
        return f"{hours:g} h" if hours >= 0.1 else f"{self.upload_ttl_s:g} s"


class RateLimiter:
    """One token bucket per client: ``rate`` tokens a second, at most ``burst`` saved; a call takes one.

    Buckets are kept for enrolled clients only (the caller is identified first), so the table is as
    large as the client list at most."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, client_id: str) -> float:
        """0.0 if the call may go ahead; otherwise the seconds until a token is there (nothing taken)."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(client_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[client_id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[client_id] = (tokens, now)
            return (1.0 - tokens) / self.rate
