"""Dialers for the sidecar's pools: mTLS to peer sidecars, plain TCP to the local app.

Mesh connections go through the one mTLS dialer both roles share (`common/mtls.py`: current
client context, session resumption per context, SPIFFE ID check, connect timeouts); this
module only picks the endpoint: for a pool key `name@host:port` (an endpoint the upstream's
balancer picked, net/balancer.py) that one, with the upstream's connect timeout; for a plain
upstream name (HTTP/2 streams, TCP tunnels) the next endpoint in turn (round robin).
"""

from __future__ import annotations

import itertools
import ssl
from collections.abc import Awaitable, Callable

from meshcar.admin.metrics import Metrics
from meshcar.common.mtls import MeshPeer, MTLSDialer
from meshcar.net.balancer import Balancer
from meshcar.net.connect import open_tcp
from meshcar.net.httpconn import HttpConn
from meshcar.net.pool import Pooled
from meshcar.sidecar.config import HostPort, Upstream
from meshcar.tls.store import CredentialStore


class MeshDialer:
    """Dial an upstream's endpoints in turn over mTLS (direction "outbound")."""

    def __init__(
        self,
        store: CredentialStore,
        upstreams: dict[str, Upstream],
        metrics: Metrics,
        connect_timeout: float = 5.0,
        *,
        context: Callable[[], ssl.SSLContext] | None = None,  # opaque TCP: its own ALPN
    ) -> None:
        self.mtls = MTLSDialer(store, metrics, "outbound", connect_timeout, context=context)
        self.remember_session = self.mtls.remember_session
        self._rr = {
            name: itertools.cycle(
                [MeshPeer(ep.host, ep.port, u.spiffe_id, name, ep) for ep in u.endpoints]
            )
            for name, u in upstreams.items()
        }
        self._upstreams = upstreams
        self._peers: dict[str, tuple[MeshPeer, float]] = {}  # endpoint key -> peer, timeout
        self._groups: dict[str, str] = {}  # endpoint key -> upstream (the pool's group)

    def balancer(
        self, name: str, old: Balancer | None = None, upstream: Upstream | None = None
    ) -> Balancer:
        """The load balancer of HTTP upstream `name`; its endpoints' keys dial here. `old`
        (a reload of an upstream whose peer identity did not change): the endpoints that
        stay keep their state (latency, outlier ejections). `upstream`: its new config."""
        u = upstream if upstream is not None else self._upstreams[name]

        def make_peer(key: str, host: str, port: int) -> MeshPeer:
            peer = MeshPeer(host, port, u.spiffe_id, name, HostPort(host, port))
            self._peers[key] = (peer, u.traffic.timeouts.connect)
            self._groups[key] = name
            return peer

        targets = [(ep.host, ep.port) for ep in u.endpoints]
        b = Balancer(name, targets, make_peer, u.traffic.dns_refresh)
        if old is not None:
            for key, ep in old.by_key.items():  # names (not yet resolved): keep them all
                if key in b.by_key or not b.endpoints:
                    b.by_key[key] = ep
                    ep.peer = self._peers[key][0] if key in self._peers else ep.peer
            b.endpoints = [b.by_key[e.key] for e in b.endpoints]
        return b

    def update(self, upstreams: dict[str, Upstream]) -> None:
        """A reload: dial `upstreams` from now on (a changed one's round robin anew)."""
        for name, u in upstreams.items():
            if self._upstreams.get(name) != u:
                self._rr[name] = itertools.cycle(
                    [MeshPeer(ep.host, ep.port, u.spiffe_id, name, ep) for ep in u.endpoints]
                )
        for name in set(self._rr) - set(upstreams):
            del self._rr[name]
        self._upstreams = upstreams

    def group(self, key: str) -> str:
        """The upstream a pool key belongs to (its connection limit)."""
        return self._groups.get(key, key)

    def dial(self, key: str) -> Awaitable[Pooled]:
        # returns the shared dialer's coroutine itself: no extra frame per dial
        picked = self._peers.get(key)
        if picked is not None:
            return self.mtls.dial(key, picked[0], picked[1])
        return self.mtls.dial(key, next(self._rr[key]))


class AppDialer:
    """Dial the local app over plain TCP (it is on localhost, inside the pod)."""

    def __init__(self, app: HostPort, connect_timeout: float = 5.0) -> None:
        self.app = app
        self.connect_timeout = connect_timeout

    async def dial(self, key: str) -> Pooled:
        stream = await open_tcp(self.app.host, self.app.port, self.connect_timeout)
        return Pooled(HttpConn(stream, "response", quickack=True), key, self.app)  # app-facing
