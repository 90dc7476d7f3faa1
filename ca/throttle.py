"""Rate limit for failed authentications, per source address.

Every failed authentication (401/403 from /v1/sign) spends one token from the source's
bucket (`burst` tokens, refilled at `per_second`). While a source's bucket is empty its
unauthenticated sign requests are answered 429 with Retry-After before any work is done
(no token lookup, no CSR parsing), so guessing join tokens costs the guesser time, not the
CA CPU. Successful requests spend nothing, and renewals over mTLS (a valid client
certificate was already verified by the TLS handshake) are never throttled, so good
clients are not slowed. At most `max_sources` buckets are kept; the fullest (least
suspicious) are dropped first when the table is full.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class AuthThrottle:
    def __init__(
        self,
        burst: float = 10.0,
        per_second: float = 1.0,
        *,
        max_sources: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.per_second = per_second
        self.max_sources = max_sources
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, at)
        self.refused = 0

    def _tokens(self, source: str, now: float) -> float:
        tokens, at = self._buckets.get(source, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.per_second)

    def retry_after(self, source: str) -> int:
        """0 if `source` may try to authenticate now, else whole seconds to wait."""
        if source not in self._buckets:
            return 0
        tokens = self._tokens(source, self.clock())
        if tokens >= 1:
            return 0
        return max(1, math.ceil((1 - tokens) / self.per_second))

    def failed(self, source: str) -> None:
        now = self.clock()
        tokens = self._tokens(source, now) - 1
        if source not in self._buckets and len(self._buckets) >= self.max_sources:
            self._evict(now)
        self._buckets[source] = (max(tokens, 0.0), now)

    def _evict(self, now: float) -> None:
        full = [s for s in self._buckets if self._tokens(s, now) >= self.burst]
        for s in (
            full
            or sorted(self._buckets, key=lambda s: -self._tokens(s, now))[
                : len(self._buckets) // 10 + 1
            ]
        ):
            del self._buckets[s]
