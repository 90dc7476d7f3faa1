"""Egress: what the sidecar does with a request or connection for a host outside the mesh.

`outbound.egress: deny` (the config's default) answers it 502 naming the setting, so a
hand-written config is never an open proxy. `outbound.egress: allow` (what `meshcar inject`
renders unless told otherwise, like Istio's `ALLOW_ANY` and Linkerd) forwards it as the app
sent it, in plain HTTP (or, captured transparently, as plain TCP to its original
destination): no mTLS, no identity, exactly what the app could do without the sidecar. The
proxy listener is loopback-only, so only the pod's own processes reach it. With
`outbound.egress_proxy: HOST:PORT` (the HTTP_PROXY the app had before injection) such
requests go to that proxy in absolute form instead of directly.

CONNECT (HTTPS_PROXY) on the HTTP proxy listener, with egress allow, to a port in
`outbound.connect_ports` (default [443], like Squid's SSL_ports): a byte tunnel to the host
(or through `outbound.egress_proxy`, the CONNECT forwarded) under the upgraded-connection
idle timeout; never to a mesh upstream's name (`connect_decision`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio

from meshcar.admin.metrics import Metrics
from meshcar.common.config import HostPort
from meshcar.errors import MeshcarError, UpstreamError
from meshcar.net import sockio
from meshcar.net.connect import open_tcp
from meshcar.net.errors import CONNECTION_ERRORS
from meshcar.net.forward import Timeouts, request_bytes
from meshcar.net.httpconn import HttpConn
from meshcar.net.pipeline import Forward, Outcome, fail
from meshcar.net.pool import Pool, Pooled
from meshcar.net.respond import Refuse
from meshcar.net.upgrade import UpgradeObserver, new_relay, relay_streams
from meshcar.proto.headers import IDENTITY_HEADERS, clean_headers
from meshcar.proto.http1 import RequestHead
from meshcar.sidecar.config import SidecarConfig

DENIED = "outbound.egress is deny"
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def split_authority(authority: str) -> tuple[str, int] | None:
    """(host, port) of `host[:port]` (port 80 by default), None when it is not one."""
    host, sep, port = authority.strip().rpartition(":")
    if not sep:
        host, port = authority.strip(), "80"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return host, int(port)


class Egress:
    """The pool and dialing of `outbound.egress: allow` (one per Outbound)."""

    def __init__(self, cfg: SidecarConfig, metrics: Metrics, connect_timeout: float = 5.0) -> None:
        self.proxy = cfg.egress_proxy
        self.connect_timeout = connect_timeout
        self.pool = Pool(
            self._dial,
            idle_timeout=cfg.pool_idle_seconds,
            max_connections=cfg.limits.max_upstream_connections,
            on_refused=lambda g: metrics.upstream_refusals.labels("egress").inc(),
        )

    def decide(self, req: RequestHead, target: bytes, authority: str | None) -> Forward | None:
        """The forward of a request for a host outside the mesh (`target` normalised,
        `authority` that of an absolute-form target), or None when it names no host."""
        host = req.header(b"host")
        via = authority or (host.decode("latin-1") if host is not None else "")
        key = self.key(via) if via else None
        if key is None:
            return None
        headers = clean_headers(req.headers, drop=IDENTITY_HEADERS)  # no identity leaves
        if authority is not None:  # RFC 9112 3.2.2, as for the mesh
            headers = [h for h in headers if h[0].lower() != b"host"]
            headers.append((b"Host", authority.encode("ascii")))
        head = request_bytes(req, self.target(target, via), headers)
        return Forward(head, self.pool, key, f"egress {via}")

    def key(self, authority: str) -> str | None:
        """The pool key (`host:port` dialed) for a request to `authority`, or None."""
        if self.proxy is not None:
            return f"{self.proxy.host}:{self.proxy.port}"
        hp = split_authority(authority)
        return None if hp is None else f"{hp[0]}:{hp[1]}"

    def target(self, target: bytes, authority: str) -> bytes:
        """The request target to send: absolute form to an egress proxy, else as is."""
        if self.proxy is None or not target.startswith(b"/"):
            return target
        return b"http://" + authority.encode("ascii") + target

    async def _dial(self, key: str) -> Pooled:
        hp = split_authority(key)
        if hp is None:  # pragma: no cover - keys come from key()
            raise UpstreamError(f"bad egress address {key!r}", 502)
        stream = await open_tcp(hp[0], hp[1], self.connect_timeout)
        return Pooled(HttpConn(stream, "response", quickack=True), key, key)

    async def aclose(self) -> None:
        await self.pool.close_all()


@dataclass
class Tunnel:
    """A decision: CONNECT `host:port` allowed (`outbound.egress: allow`, the port in
    `outbound.connect_ports`): dial it (or `via`, the egress proxy, forwarding the CONNECT),
    answer 200 and relay bytes both ways (net/upgrade.py's relay, protocol "connect")."""

    host: str
    port: int
    via: HostPort | None
    observer: UpgradeObserver | None
    connect_timeout: float = 5.0


def connect_decision(
    req: RequestHead, cfg: SidecarConfig, egress: Egress | None, mesh: set[str], observer: Any
) -> Tunnel | Refuse:
    """What the outbound HTTP proxy does with `CONNECT host:port` (like Squid's SSL_ports
    and Envoy's CONNECT matcher): a mesh upstream's name is refused (mesh traffic is plain
    HTTP to the sidecar, which adds mTLS and identity), egress deny refuses every host, a
    port outside `outbound.connect_ports` (default [443]) is refused; all 403."""
    hp = split_authority(req.target.decode("latin-1"))
    if hp is None or ":" not in req.target.decode("latin-1"):
        return Refuse(400, "CONNECT needs an authority-form target host:port", close=True)
    host, port = hp
    if host.lower() in mesh:
        return Refuse(
            403,
            f"CONNECT to mesh upstream {host!r} refused: send plain http:// to the sidecar "
            "(no HTTPS_PROXY for mesh names), so it adds mTLS and the workload identity",
            close=True,
        )
    if egress is None:
        return Refuse(403, f"CONNECT to {host}:{port} refused: {DENIED}", close=True)
    if port not in cfg.connect_ports:
        allowed = ", ".join(str(p) for p in cfg.connect_ports) or "none"
        return Refuse(
            403,
            f"CONNECT to port {port} refused: not in outbound.connect_ports ({allowed})",
            close=True,
        )
    return Tunnel(host, port, cfg.egress_proxy, observer, egress.connect_timeout)


async def _via_proxy(stream: trio.abc.Stream, t: Tunnel, timeouts: Timeouts) -> bytes:
    """Forward the CONNECT to the egress proxy; the bytes past its 2xx answer's head."""
    authority = f"[{t.host}]:{t.port}" if ":" in t.host else f"{t.host}:{t.port}"
    await sockio.send_all(
        stream, f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode("ascii")
    )
    buf = b""
    with trio.move_on_after(timeouts.response_head) as scope:
        while b"\r\n\r\n" not in buf and len(buf) < 65536:
            data = await sockio.receive_some(stream, 65536)
            if not data:
                break
            buf += data
    head, sep, rest = buf.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b""
    if scope.cancelled_caught or not sep or not status.startswith(b"2"):
        line = head.split(b"\r\n", 1)[0].decode("latin-1")[:100] or "no answer"
        raise UpstreamError(f"outbound.egress_proxy refused the CONNECT: {line}", 502)
    return rest


async def run_tunnel(down: HttpConn, req: RequestHead, t: Tunnel, timeouts: Timeouts) -> Outcome:
    """Carry out a Tunnel: dial, 200 Connection established, relay until both ends close
    or `timeouts.upgraded_idle` passes without a byte (access log: status 200, bytes)."""
    name = f"egress {t.host}:{t.port}"
    dial = (t.via.host, t.via.port) if t.via is not None else (t.host, t.port)
    try:
        stream = await open_tcp(dial[0], dial[1], t.connect_timeout)
    except MeshcarError as exc:
        return await fail(down, req, exc, "outbound", name)
    try:
        try:
            upstream_first = b"" if t.via is None else await _via_proxy(stream, t, timeouts)
        except MeshcarError as exc:
            return await fail(down, req, exc, "outbound", name)
        except CONNECTION_ERRORS as exc:
            return await fail(down, req, UpstreamError(f"{name}: {exc}", 502), "outbound", name)
        client_first = down.detach()
        r = new_relay(timeouts.upgraded_idle)
        sent = False
        with trio.move_on_after(timeouts.write):
            try:
                await sockio.send_all(down.stream, ESTABLISHED + upstream_first)
                sent = True
            except CONNECTION_ERRORS:
                pass
        if not sent:  # the client is gone or does not read
            return Outcome(200, keep=False)
        r.counts.down = len(upstream_first)
        await relay_streams(r, down.stream, stream, client_first, "connect", t.observer)
        return Outcome(200, r.counts.up, r.counts.down, keep=False)
    finally:
        await stream.aclose()
