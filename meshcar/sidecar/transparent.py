"""Transparent outbound: connections the pod's iptables rules redirected to the sidecar.

An unmodified app dials a peer's address (say `10.77.0.3:9002`); a NAT rule in the pod's
network namespace (as an init container would install) redirects it to this listener. The
original destination is recovered with `SO_ORIGINAL_DST` and matched against each
upstream's `match` list; the connection is then served exactly like the outbound proxy
with that upstream fixed: mTLS to the peer's sidecar, its SPIFFE ID checked. A destination
that is no configured upstream gets 502 with a clear body naming `outbound.egress`; with
`outbound.egress: allow` it is relayed as plain TCP to its original destination instead
(the sidecar's own uid is not redirected, so that connection leaves the pod), which is
what the app would have done without the mesh (sidecar/egress.py).
"""

from __future__ import annotations

import json
import logging

import trio

from meshcar.errors import UpstreamError
from meshcar.net.connect import open_tcp
from meshcar.net.httpconn import HttpConn
from meshcar.net.httpserver import refuse_http, send_error, serve_http
from meshcar.net.limits import ConnectionLimit
from meshcar.net.origdst import original_dst
from meshcar.net.relay import relay
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
        name = upstream_for(self.outbound.cfg, dst) if dst else None  # a reload's too
        if name is not None:
            await self.outbound.serve_connection(stream, fixed=name)
            return
        if dst is not None and tuple(stream.socket.getsockname()[:2]) == dst:
            dst = None  # dialed straight at the listener: never a place to connect to
        where = f"{dst[0]}:{dst[1]}" if dst else "(not a redirected connection)"
        if dst is not None and self.outbound.cfg.egress == "allow":
            await self._pass_through(stream, dst, where)
            return
        log.info(json.dumps({"event": "transparent.no_upstream", "original_dst": where}))

        async def refuse(req: RequestHead, conn: HttpConn) -> bool:
            await send_error(
                conn,
                502,
                f"original destination {where} is not a configured upstream of this sidecar"
                + ("; outbound.egress is deny" if dst is not None else ""),
            )
            return False

        await serve_http(HttpConn(stream, "request", self.cfg.http.headers, quickack=True), refuse)

    async def _pass_through(
        self, stream: trio.SocketStream, dst: tuple[str, int], where: str
    ) -> None:
        """outbound.egress allow: the bytes as they are, to the original destination."""
        try:
            peer = await open_tcp(dst[0], dst[1], 5.0)
        except UpstreamError as exc:
            line = {"event": "transparent.egress_failed", "original_dst": where, "error": str(exc)}
            log.info(json.dumps(line))
            await stream.aclose()
            return
        log.info(json.dumps({"event": "transparent.egress", "original_dst": where}))
        async with peer:
            await relay(stream, peer)
