"""Egress: what the sidecar does with a request or connection for a host outside the mesh.

`outbound.egress: deny` (the config's default) answers it 502 naming the setting, so a
hand-written config is never an open proxy. `outbound.egress: allow` (what `meshcar inject`
renders unless told otherwise, like Istio's `ALLOW_ANY` and Linkerd) forwards it as the app
sent it, in plain HTTP (or, captured transparently, as plain TCP to its original
destination): no mTLS, no identity, exactly what the app could do without the sidecar. The
proxy listener is loopback-only, so only the pod's own processes reach it. With
`outbound.egress_proxy: HOST:PORT` (the HTTP_PROXY the app had before injection) such
requests go to that proxy in absolute form instead of directly.
"""

from __future__ import annotations

from meshcar.admin.metrics import Metrics
from meshcar.errors import UpstreamError
from meshcar.net.connect import open_tcp
from meshcar.net.forward import request_bytes
from meshcar.net.httpconn import HttpConn
from meshcar.net.pipeline import Forward
from meshcar.net.pool import Pool, Pooled
from meshcar.proto.headers import IDENTITY_HEADERS, clean_headers
from meshcar.proto.http1 import RequestHead
from meshcar.sidecar.config import SidecarConfig

DENIED = "outbound.egress is deny"


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
