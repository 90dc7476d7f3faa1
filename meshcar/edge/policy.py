"""Pure L7/L4 policy for the edge: rate limiting, endpoint selection, health bookkeeping.

Nothing here does I/O or reads a clock by itself: callers pass `now`, so every decision is
a plain function of its inputs and is unit-tested as such.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from meshcar.common.config import HostPort


class RateLimiter:
    """A token bucket per client IP: `rate` tokens a second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: int, max_clients: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # ip -> (tokens, at)

    def allow(self, client: str, now: float) -> tuple[bool, int]:
        """(allowed, seconds to wait before retrying when not allowed)."""
        tokens, at = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            allowed, retry = True, 0
        else:
            self._buckets[client] = (tokens, now)
            allowed, retry = False, max(1, math.ceil((1.0 - tokens) / self.rate))
        while len(self._buckets) > self.max_clients:  # least recently seen clients go first
            self._buckets.popitem(last=False)
        return allowed, retry


@dataclass
class EndpointState:
    endpoint: HostPort
    healthy: bool = True
    fails: int = 0
    passes: int = 0
    active: int = 0  # connections or requests in flight (least-connections)

    def leave(self) -> None:
        """One connection or request in flight ended."""
        self.active -= 1


class Balancer:
    """Picks a healthy endpoint: round-robin, or least-connections; tracks health."""

    def __init__(
        self,
        endpoints: tuple[HostPort, ...],
        policy: str = "round_robin",
        fall: int = 2,
        rise: int = 1,
    ) -> None:
        self.states = [EndpointState(e) for e in endpoints]
        self.policy = policy
        self.fall = fall
        self.rise = rise
        self._next = 0

    def healthy(self) -> list[EndpointState]:
        return [s for s in self.states if s.healthy]

    def pick(self) -> EndpointState | None:
        candidates = self.healthy()
        if not candidates:
            return None
        if self.policy == "least_connections":
            return min(candidates, key=lambda s: s.active)
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return choice

    def report(self, state: EndpointState, ok: bool) -> str | None:
        """Record a health-check result; returns "ejected"/"readmitted" on a change."""
        if ok:
            state.fails = 0
            state.passes += 1
            if not state.healthy and state.passes >= self.rise:
                state.healthy = True
                return "readmitted"
        else:
            state.passes = 0
            state.fails += 1
            if state.healthy and state.fails >= self.fall:
                state.healthy = False
                return "ejected"
        return None
