"""Transparent outbound: connections the pod's iptables rules redirected to the sidecar.

An unmodified app dials a peer's address (say `10.77.0.3:9002`); a NAT rule in the pod's
network namespace (as an init container would install) redirects it to this listener. The
original destination is recovered with `SO_ORIGINAL_DST` and matched against each
upstream's `match` list; the connection is then served exactly like the outbound proxy
with that upstream fixed: mTLS to the peer's sidecar, its SPIFFE ID checked. A destination
that is no configured upstream gets 502 with a clear body: never an open proxy.
"""

from __future__ import annotations

import json
import logging

import trio

from meshcar.net.httpconn import HttpConn
from meshcar.net.httpserver import refuse_http, send_error, serve_http
from meshcar.net.limits import ConnectionLimit
from meshcar.net.origdst import original_dst
from meshcar.proto.http1 import RequestHead
from meshcar.sidecar.config import SidecarConfig
from meshcar.sidecar.outbound import Outbound

log = logging.getLogger("meshcar.transparent")


def upstream_for(cfg: SidecarConfig, dst: tuple[str, int]) -> str | None:
    """The upstream whose `match` list names this original destination."""
    host, port = dst
    for up in cfg.upstreams:
        if any(m.host == host and m.port == port for m in up.match):
            return up.name
    return None


class Transparent:
    def __init__(self, cfg: SidecarConfig, outbound: Outbound) -> None:
        self.cfg = cfg
        self.outbound = outbound
        self.conn_limit = ConnectionLimit(
            "transparent",
            cfg.limits.max_connections,
            lambda n: outbound.metrics.listener_refusals.labels(n).inc(),
        )

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        if not self.conn_limit.try_enter():
            await refuse_http(
                stream,
                f"transparent listener connection limit ({self.conn_limit.maximum}) reached",
                self.cfg.timeouts,
            )
            return
        try:
            await self._serve_connection(stream)
        finally:
            self.conn_limit.leave()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        dst = original_dst(stream.socket)
        name = upstream_for(self.cfg, dst) if dst else None
        if name is not None:
            await self.outbound.serve_connection(stream, fixed=name)
            return
        where = f"{dst[0]}:{dst[1]}" if dst else "(not a redirected connection)"
        log.info(json.dumps({"event": "transparent.no_upstream", "original_dst": where}))

        async def refuse(req: RequestHead, conn: HttpConn) -> bool:
            await send_error(
                conn,
                502,
                f"original destination {where} is not a configured upstream of this sidecar",
            )
            return False

        await serve_http(HttpConn(stream, "request", self.cfg.http.headers, quickack=True), refuse)
