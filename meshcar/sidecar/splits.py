"""Weighted traffic splits in the sidecar's outbound (`outbound.splits`), as SMI TrafficSplit:
the app calls a service name (`http://api/...`, Host `api`, or the absolute-form target)
and each request goes to one of the listed upstreams with probability weight / total
(weight 0: drained), over that upstream's own endpoints, SPIFFE ID and pool. A split's name
is not an upstream itself; its backends are http upstreams. Per request, not sticky; the
access log names the upstream chosen."""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Any

from meshcar.common.config import Checker
from meshcar.common.schema import STRING, Section, key, number

SPLIT_TO = Section(
    "One backend of a split: an http upstream and its share",
    {
        "upstream": key(STRING, "the name of an http upstream", required=True),
        "weight": key(number(0, 1000000, integer=True), "relative share (0: no traffic)", 1),
    },
)


@dataclass(frozen=True)
class TrafficSplit:
    name: str
    upstreams: tuple[str, ...]
    cumulative: tuple[int, ...]

    def pick(self, draw: float) -> str:
        """The upstream for a draw in [0, 1)."""
        i = bisect.bisect_right(self.cumulative, draw * self.cumulative[-1])
        return self.upstreams[min(i, len(self.upstreams) - 1)]


class Splitter:
    """The outbound's splits by service name, with one seedable random source."""

    def __init__(self, splits: tuple[TrafficSplit, ...], seed: int | None = None) -> None:
        self.splits = {s.name: s for s in splits}
        self.rng = random.Random(seed)

    def resolve(self, service: str | None) -> str | None:
        """The upstream for `service`: itself, or one of its split's by weight."""
        split = self.splits.get(service) if service is not None and self.splits else None
        return service if split is None else split.pick(self.rng.random())


def _entry(c: Checker, item: Any, where: str, http_ups: set[str]) -> tuple[str, int] | None:
    """One {upstream, weight} of a split."""
    if not isinstance(item, dict):
        c.bad(where, "must be a mapping {upstream, weight}")
        return None
    c.unknown(item, where + ".", SPLIT_TO)
    up = item.get("upstream")
    if not isinstance(up, str) or up.lower() not in http_ups:
        c.bad(where + ".upstream", f"must name an http upstream, got {up!r}")
        return None
    w = item.get("weight", 1)
    if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 1_000_000:
        c.bad(where + ".weight", "must be an integer 0-1000000")
        return None
    return up.lower(), w


def _one(
    c: Checker, name: Any, raw: Any, http_ups: set[str], all_ups: set[str]
) -> TrafficSplit | None:
    p = f"outbound.splits.{name}"
    if not isinstance(name, str) or not name or name.lower() in all_ups:
        c.bad(p, "a split's name is the service the app calls, and no upstream of its own")
        return None
    if not isinstance(raw, list) or not raw:
        c.bad(p, "must be a non-empty list of {upstream, weight}")
        return None
    ups: list[str] = []
    cum: list[int] = []
    total = 0
    for i, item in enumerate(raw):
        found = _entry(c, item, f"{p}[{i}]", http_ups)
        if found is not None:
            total += found[1]
            ups.append(found[0])
            cum.append(total)
    if len(ups) != len(raw):
        return None
    if total == 0:
        c.bad(p, "the weights sum to 0: no upstream would take traffic")
        return None
    return TrafficSplit(name.lower(), tuple(ups), tuple(cum))


def parse_splits(
    c: Checker, raw: Any, http_ups: set[str], all_ups: set[str]
) -> tuple[TrafficSplit, ...]:
    """`outbound.splits`: service name -> [{upstream, weight}], every problem reported."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        c.bad("outbound.splits", "must be a mapping of service name to [{upstream, weight}]")
        return ()
    found = [_one(c, name, v, http_ups, all_ups) for name, v in raw.items()]
    return tuple(s for s in found if s is not None)
