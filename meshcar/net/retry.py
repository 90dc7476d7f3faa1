"""Retry policy and retry budget of an upstream (as Linkerd's: retries are a share of live traffic).

`RetryBudget`: every request deposits one token into a sliding window (`window` seconds, in
10 buckets); a retry may be made while the retries in the window stay within
`ratio * requests + min_per_second * window`. So under a failure storm the extra load
retries add is bounded by `ratio` (plus a small floor that keeps a quiet upstream
retryable), instead of multiplying the storm. Time is trio's clock (MockClock in tests).

`RetryPolicy`: what is retried. `connect-failure` (nothing reached the upstream), `reset`
(the connection broke before a response head), `timeout` (the per-try timeout fired), and
response statuses (`503`, or `5xx` for all of 500-599) seen before anything went to the
client. Only idempotent methods (RFC 9110 9.2.2) are retried after the request was sent,
and a request body only when it was buffered (`buffer_bytes`, Content-Length bodies up to
that size); a connect failure is retried for any request, since nothing was sent or read.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

RETRY_ON = ("connect-failure", "reset", "timeout")


@dataclass(frozen=True)
class RetryPolicy:
    retry_on: frozenset[str] = frozenset({"connect-failure"})  # the named conditions above
    statuses: frozenset[int] = frozenset()  # response statuses that are retried
    max_attempts: int = 3  # attempts in all, the first included
    budget_ratio: float = 0.2  # retries per request in the window
    min_per_second: float = 10.0  # retries allowed per second regardless of traffic
    window_seconds: float = 10.0
    buffer_bytes: int = 64 * 1024  # request bodies up to this size are buffered for replay


_BUCKETS = 10


class RetryBudget:
    """Requests and retries of one upstream over a sliding window of trio's clock."""

    __slots__ = ("ratio", "floor", "width", "_requests", "_retries", "_start", "_index")

    def __init__(self, ratio: float, min_per_second: float, window: float) -> None:
        self.ratio = ratio
        self.floor = min_per_second * window
        self.width = window / _BUCKETS
        self._requests = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._start: float | None = None  # the start of the current bucket (first use)
        self._index = 0

    def _advance(self) -> None:
        now = trio.current_time()
        if self._start is None:  # made outside trio (a config loaded before trio.run)
            self._start = now
        steps = int((now - self._start) / self.width)
        if steps <= 0:
            return
        for _ in range(min(steps, _BUCKETS)):
            self._index = (self._index + 1) % _BUCKETS
            self._requests[self._index] = 0
            self._retries[self._index] = 0
        self._start += steps * self.width

    def deposit(self) -> None:
        """One request (its first attempt)."""
        self._advance()
        self._requests[self._index] += 1

    def can_retry(self) -> bool:
        self._advance()
        return sum(self._retries) + 1 <= self.ratio * sum(self._requests) + self.floor

    def withdraw(self) -> None:
        """One retry made (after `can_retry`)."""
        self._advance()
        self._retries[self._index] += 1
