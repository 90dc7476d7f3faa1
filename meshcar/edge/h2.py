"""HTTP/2 at the edge: terminate and bridge routes offer h2 by ALPN (`edge/listener.py`).

A client connection that chose h2 is served by the role-neutral proxy (`common/h2proxy.py`);
each stream goes through `TerminatingProxy.decide`, the function HTTP/1.1 requests go to
(normalisation, routing by Host and path, 421 for a Host the SNI's route does not serve,
WAF, rate limits, forwarded headers, the route's balancer picking an endpoint per request).
A bridge route's stream goes on as h2 over mTLS to the backend's sidecar (ALPN h2 through
the one mTLS dialer, the backend's SPIFFE ID checked), so gRPC with its trailers crosses
the edge; a terminate route's stream goes on as HTTP/1.1 through the edge's backend pool.
"""

from __future__ import annotations

import weakref
from typing import Any

import trio

from meshcar.common.h2proxy import H2ClientContext, H2Proxy, h2_opener
from meshcar.common.mtls import MeshPeer, MTLSDialer
from meshcar.edge.http import Backends, ClientConn, TerminatingProxy, host_of
from meshcar.net.pipeline import Forward
from meshcar.proto.http1 import RequestHead

_PROXIES: weakref.WeakKeyDictionary[TerminatingProxy, H2Proxy] = weakref.WeakKeyDictionary()


class EdgePicker:
    """Bridge routes: h2 over mTLS to the endpoint the route's balancer chose; terminate
    routes: None (HTTP/1.1 through the backend pool)."""

    def __init__(self, backends: Backends) -> None:
        self.backends = backends
        store = backends.store
        self.mtls = (
            MTLSDialer(store, backends.metrics, "bridge", context=H2ClientContext(store))
            if store is not None
            else None
        )
        self._peers: dict[str, MeshPeer] = {}

    def __call__(self, key: str, decision: Forward) -> tuple[Any, Any] | None:
        target, _, ep = key.partition("|")
        route, backend = self.backends.targets[target]
        if route.mode != "bridge" or self.mtls is None or backend.spiffe_id is None:
            return None
        peer = self._peers.get(key)
        if peer is None:
            h, _, p = ep.rpartition(":")
            peer = self._peers[key] = MeshPeer(h, int(p), backend.spiffe_id, route.host, ep)
        return ep, h2_opener(self.mtls, key, peer)


async def serve_h2(proxy: TerminatingProxy, stream: trio.abc.Stream, client: ClientConn) -> None:
    """Serve a client connection that negotiated h2 with the edge."""
    h2 = _PROXIES.get(proxy)
    if h2 is None:
        metrics = proxy.metrics

        def observe(line: dict) -> None:  # the edge's own request metric, as for HTTP/1.1
            route = line.pop("route", "(none)")
            mode = line.get("mode") or "none"
            metrics.observe_edge(route, mode, line["status"], line["bytes_in"], line["bytes_out"])

        picker = EdgePicker(proxy.backends)
        h2 = _PROXIES[proxy] = H2Proxy("edge", picker, metrics, "backend", observe)

    def decide(req: RequestHead) -> tuple[Any, dict]:
        host = host_of(req)
        route = proxy.cfg.route_for(host) if host else client.sni_route
        decision, _path, backend = proxy.decide(req, host, route, client)
        mode = str(route.mode.value) if route else None
        fields: dict[str, object] = {"host": host, "mode": mode, "backend": backend}
        fields["route"] = route.host if route else "(none)"
        fields["plaintext_backend"] = mode == "terminate"
        return decision, fields

    await h2.serve(stream, decide, {"client": client.ip, "sni": client.sni}, proxy.drain)
