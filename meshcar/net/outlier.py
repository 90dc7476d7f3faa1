"""Passive outlier detection: endpoints that fail in a row are ejected for a growing time.

An endpoint's result is a failure when it could not be dialed, broke or timed out before a
response head, or answered 502/503/504 (a gateway failure); anything else is a success and
resets the count. After `consecutive_failures` failures in a row it is ejected for
`base_ejection_seconds * 2**(n-1)` (n: its ejections so far), capped at
`max_ejection_seconds`, unless that would put more than `max_ejected_percent` of the
upstream's endpoints out (then it stays in: a cap, as Envoy's, so a storm that hits every
endpoint does not empty the upstream). Once the time is up it is readmitted (lazily, at the
next pick); it keeps its ejection count until it has stayed in for `max_ejection_seconds`.
Time is trio's clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

GATEWAY_FAILURES = frozenset((502, 503, 504))


@dataclass(frozen=True)
class OutlierPolicy:
    consecutive_failures: int = 5  # 0: never eject
    base_ejection_seconds: float = 30.0
    max_ejection_seconds: float = 300.0
    max_ejected_percent: float = 50.0


class Tracked(Protocol):
    failures: int
    ejections: int
    ejected_until: float
    readmitted_at: float


def ejected_count(endpoints: Sequence[Tracked], now: float) -> int:
    return sum(1 for e in endpoints if e.ejected_until > now)


def record(
    policy: OutlierPolicy, ep: Tracked, endpoints: Sequence[Tracked], ok: bool
) -> float | None:
    """Count one result of `ep`; the ejection's seconds if it was just ejected, else None."""
    if ok:
        ep.failures = 0
        return None
    ep.failures += 1
    if not policy.consecutive_failures or ep.failures < policy.consecutive_failures:
        return None
    now = trio.current_time()
    if ep.ejected_until > now:
        return None
    if ejected_count(endpoints, now) + 1 > len(endpoints) * policy.max_ejected_percent / 100:
        return None  # the cap: this one stays in
    if ep.ejections and now - ep.readmitted_at >= policy.max_ejection_seconds:
        ep.ejections = 0  # in long enough: the back-off starts again
    ep.ejections += 1
    seconds = min(
        policy.base_ejection_seconds * 2 ** (ep.ejections - 1), policy.max_ejection_seconds
    )
    ep.ejected_until = now + seconds
    ep.readmitted_at = ep.ejected_until
    ep.failures = 0
    return seconds
