"""Which route and which backend a request goes to: wildcard hosts, request matches (path
prefix/exact/regex, method, headers) and weighted splits. Pure: no I/O.

Hosts: a route's `host` is a name (`api.demo.test`) or a wildcard (`*.demo.test`: any name
*below* demo.test, at any depth, not demo.test itself). For the SNI and for the Host
header alike the exact name wins, then the most specific wildcard (`*.a.demo.test` before
`*.demo.test`), then `default_route` (SNI only, as before).

Rules (`routes[i].rules`): in order, the first whose `match` the request matches (every
given part must: `path_prefix` / `path_exact` / `path_regex` on the *normalised* path,
`methods`, `headers` with an exact `value` or a `pattern` searched in any value of that
header; an absent part matches anything) sends it to its own backend or weighted split;
no rule matching: the route's own `path_prefix` / `path_exact` and `backend` / `backends`,
as before (404 when its path does not match).

Splits (`backends: [{weight, endpoints, ...}]`): each request picks a backend with
probability weight / sum of weights (a weight of 0 takes no traffic: drained), then an
endpoint of that backend with its balancer; the edge draws from one `random.Random` per
process (`Splitter`), which a test may seed.
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshcar.edge.routes.base import Backend


def host_table(hosts: Iterable[str]) -> tuple[dict[str, int], dict[str, int]]:
    """(exact names, wildcard suffixes like ".demo.test") -> the index of their route."""
    exact: dict[str, int] = {}
    wild: dict[str, int] = {}
    for i, h in enumerate(hosts):
        if h.startswith("*."):
            wild.setdefault(h[1:], i)
        else:
            exact.setdefault(h, i)
    return exact, wild


def find_host(table: tuple[dict[str, int], dict[str, int]], host: str) -> int | None:
    """The route index for `host`: exact first, then the longest wildcard suffix."""
    exact, wild = table
    found = exact.get(host)
    if found is not None or not wild:
        return found
    dot = host.find(".")
    while dot >= 0:
        found = wild.get(host[dot:])
        if found is not None:
            return found
        dot = host.find(".", dot + 1)
    return None


@dataclass(frozen=True)
class HeaderMatch:
    name: str  # lowercase
    value: str | None = None  # exact
    pattern: re.Pattern[str] | None = None  # searched

    def matches(self, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        for k, v in headers:
            if k.decode("latin-1").lower() != self.name:
                continue
            text = v.decode("latin-1").strip()
            if self.value is not None and text == self.value:
                return True
            if self.pattern is not None and self.pattern.search(text):
                return True
            if self.value is None and self.pattern is None:
                return True  # present
        return False


@dataclass(frozen=True)
class Match:
    path_prefix: str | None = None
    path_exact: str | None = None
    path_regex: re.Pattern[str] | None = None  # fullmatch on the normalised path
    methods: tuple[str, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()

    def matches(self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        if self.path_exact is not None and path != self.path_exact:
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        if self.path_regex is not None and not self.path_regex.fullmatch(path):
            return False
        if self.methods and method not in self.methods:
            return False
        return all(h.matches(headers) for h in self.headers)


@dataclass(frozen=True)
class Split:
    """Weighted backends; `keys` name each one's balancer and pool group."""

    keys: tuple[str, ...]
    backends: tuple[Backend, ...]
    weights: tuple[int, ...]

    def __post_init__(self) -> None:
        total, cum = 0, []
        for w in self.weights:
            total += w
            cum.append(total)
        object.__setattr__(self, "_cum", tuple(cum))

    def pick(self, draw: float) -> str:
        """The key for a draw in [0, 1)."""
        cum: tuple[int, ...] = self._cum  # type: ignore[attr-defined]
        if len(cum) == 1:
            return self.keys[0]
        i = bisect.bisect_right(cum, draw * cum[-1])
        return self.keys[min(i, len(cum) - 1)]


@dataclass(frozen=True)
class RouteRule:
    match: Match
    split: Split


class Splitter:
    """The edge's one source of split draws (seedable for tests)."""

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    def pick(self, split: Split) -> str:
        return split.keys[0] if len(split.keys) == 1 else split.pick(self.rng.random())
