"""Per-request load balancing over an upstream's endpoints: P2C with peak EWMA (as Linkerd).

Each pick draws two endpoints at random and takes the cheaper one, cost being the peak-EWMA
latency times (requests in flight + 1); an ejected endpoint (net/outlier.py) is passed over
while another is in, and so is, for a retry, the endpoint that just failed. Failures do not
count as latency (a fast-failing endpoint looks cheap, as in Linkerd): consecutive failures
eject it instead (net/outlier.py). The EWMA follows a slower response at once (peak) and decays toward
faster ones with time constant `DECAY` seconds, so a slow endpoint loses traffic quickly
and wins it back gradually.

Endpoints may be DNS names (compose service names, Kubernetes Services): they are resolved
when first needed and again every `dns_refresh` seconds at the next request (one request
resolves, the others keep the last answer; a failed resolution keeps the last answer too),
each address becoming an endpoint of its own with its own latency and health. Endpoints
given as IP addresses are never resolved (nor any, with `resolve=False`: the edge dials its
backends' names as given). An endpoint an active health check marked down (`healthy`,
the edge's edge/health.py) is passed over as an ejected one is.
"""

from __future__ import annotations

import ipaddress
import math
import random
import socket
from collections.abc import Callable
from typing import Any

import trio

from meshcar.errors import UpstreamError

DECAY = 10.0  # seconds: the EWMA's time constant
_rand = random.random


class Endpoint:
    __slots__ = (
        "key",
        "host",
        "port",
        "peer",
        "ewma",
        "stamp",
        "pending",
        "failures",
        "ejections",
        "ejected_until",
        "readmitted_at",
        "healthy",
    )

    def __init__(self, key: str, host: str, port: int, peer: Any) -> None:
        self.key = key  # the pool key of its connections
        self.host = host
        self.port = port
        self.peer = peer  # what the dialer dials (e.g. common/mtls.py's MeshPeer)
        self.ewma = 0.0
        self.stamp = 0.0
        self.pending = 0
        self.failures = 0
        self.ejections = 0
        self.ejected_until = -math.inf
        self.readmitted_at = -math.inf
        self.healthy = True  # an active health check's verdict (the edge's); in only if both

    def observe(self, seconds: float, now: float) -> None:
        """One response's latency into the peak EWMA."""
        if seconds > self.ewma:
            self.ewma = seconds
        else:
            w = math.exp(-(now - self.stamp) / DECAY)
            self.ewma = self.ewma * w + seconds * (1.0 - w)
        self.stamp = now


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Balancer:
    """The endpoints of one upstream; `make_peer(key, host, port)` builds what is dialed."""

    def __init__(
        self,
        name: str,
        targets: list[tuple[str, int]],
        make_peer: Callable[[str, str, int], Any],
        dns_refresh: float = 5.0,
        *,
        resolve: bool = True,
    ) -> None:
        self.name = name
        self.targets = targets
        self.make_peer = make_peer
        self.dns_refresh = dns_refresh
        self.by_key: dict[str, Endpoint] = {}
        self.endpoints: list[Endpoint] = []
        self._resolving = False
        self.next_refresh = -math.inf
        if not resolve or all(_is_ip(h) for h, _ in targets):  # names dialed as they are
            self._install([(h, p) for h, p in targets])
            self.next_refresh = math.inf

    def _install(self, addrs: list[tuple[str, int]]) -> None:
        eps: list[Endpoint] = []
        for host, port in addrs:
            key = f"{self.name}@{host}:{port}"
            ep = self.by_key.get(key)
            if ep is None:
                ep = self.by_key[key] = Endpoint(key, host, port, self.make_peer(key, host, port))
            if ep not in eps:
                eps.append(ep)
        self.endpoints = eps

    async def refresh(self) -> None:
        """Resolve the names again if `dns_refresh` has passed (first call: now)."""
        if trio.current_time() < self.next_refresh or self._resolving:
            return
        self._resolving = True
        try:
            addrs: list[tuple[str, int]] = []
            for host, port in self.targets:
                if _is_ip(host):
                    addrs.append((host, port))
                    continue
                try:
                    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                except OSError:  # keep what this name resolved to last time
                    addrs.extend((e.host, e.port) for e in self.endpoints if e.port == port)
                    continue
                addrs.extend((str(info[4][0]), port) for info in infos)
            if addrs:
                self._install(addrs)
            self.next_refresh = trio.current_time() + self.dns_refresh
        finally:
            self._resolving = False

    async def pick(self, avoid: Endpoint | None = None) -> Endpoint:
        """An endpoint; a retry passes the endpoint that just failed as `avoid`."""
        if trio.current_time() >= self.next_refresh:
            await self.refresh()
        eps = self.endpoints
        n = len(eps)
        if n == 1:
            return eps[0]
        if n == 0:
            names = ", ".join(f"{h}:{p}" for h, p in self.targets)
            raise UpstreamError(f"no endpoint: {names} did not resolve", 503)
        i = int(_rand() * n)
        j = int(_rand() * (n - 1))
        return _choose(eps, eps[i], eps[j + 1 if j >= i else j], avoid, trio.current_time())


def _choose(
    eps: list[Endpoint], a: Endpoint, b: Endpoint, avoid: Endpoint | None, now: float
) -> Endpoint:
    """The better of the pair `a`, `b`: in (not ejected), not `avoid`, then the cheaper."""
    a_in = a.ejected_until <= now and a.healthy
    b_in = b.ejected_until <= now and b.healthy
    if avoid is a or avoid is b:
        other = b if avoid is a else a
        return other if (b_in if avoid is a else a_in) else avoid
    if a_in != b_in:
        return a if a_in else b
    if not a_in:
        return _fallback(eps, a, b, now)
    return a if a.ewma * (a.pending + 1) <= b.ewma * (b.pending + 1) else b


def _fallback(eps: list[Endpoint], a: Endpoint, b: Endpoint, now: float) -> Endpoint:
    """Both of the pair out: any endpoint still in, else the one of the pair back sooner."""
    for e in eps:
        if e.ejected_until <= now and e.healthy:
            return e
    return a if a.ejected_until <= b.ejected_until else b
