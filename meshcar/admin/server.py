"""The admin listener: /live, /ready, /metrics, /certs, POST /renew, POST /shutdown.

Shared by the sidecar and the edge: the process hands in callables for readiness, the
certificate view and the actions, so this module knows nothing about either.

Lockdown: the listener may be bound to the pod IP so the kubelet and Prometheus can reach
the probes (`meshcar inject` does). Only the public paths (`admin.public_paths`, default
`PUBLIC_PATHS`: /live, /ready, /metrics; at most the read-only `MAY_BE_PUBLIC`) are served
to a peer that is not on loopback; everything that reveals certificate details, the
authorization rules (GET /authz/explain), the recent requests (GET /requests/recent), the
edge's routes (GET /routes), the config status (GET /config/status) or changes state (/certs,
POST /renew, POST /shutdown) answers 403 unless the TCP peer address is in
127.0.0.0/8 or ::1, i.e. the process's own pod or host. The peer address is the socket's,
never a header.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs

import trio

from meshcar.admin import recent
from meshcar.admin.metrics import Metrics
from meshcar.admin.paths import MAY_BE_PUBLIC, PUBLIC_PATHS
from meshcar.net.forward import request_has_body
from meshcar.net.httpconn import HttpConn
from meshcar.net.httpserver import refuse_http, send_error, serve_http
from meshcar.net.limits import ConnectionLimit
from meshcar.proto.headers import simple_response
from meshcar.proto.http1 import EndOfMessage, RequestHead


@dataclass
class AdminHooks:
    ready: Callable[[], tuple[bool, str]]
    certs: Callable[[], dict]
    renew: Callable[[], Awaitable[dict]] | None = None
    shutdown: Callable[[], None] | None = None
    metrics: Callable[[], Awaitable[bytes]] | None = None  # workers: N (admin/workers.py)
    # GET /authz/explain?caller=&method=&path=&host= (loopback only): (status, JSON body)
    explain: Callable[[dict[str, str]], tuple[int, dict]] | None = None
    # GET /config/status (loopback only): the running config's hash, the last reload's result
    config_status: Callable[[], dict] | None = None
    # GET /routes (the edge, loopback only): its routes with mode and backend endpoints
    routes: Callable[[], list[dict]] | None = None


def is_loopback_peer(stream: trio.abc.Stream) -> bool:
    """True when the stream's TCP peer is a loopback address (False if it cannot be told)."""
    sock = getattr(stream, "socket", None)
    try:
        host = sock.getpeername()[0] if sock is not None else None
    except OSError:
        return False
    if not isinstance(host, str):
        return False
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool((mapped or addr).is_loopback)


def _recent_entries(query: bytes) -> dict:
    """GET /requests/recent?after=SEQ&limit=N: the access-log entries kept (admin/recent.py)."""
    args = parse_qs(query.decode("latin-1"))
    try:
        after = int(args.get("after", ["0"])[-1])
        limit = int(args.get("limit", [str(recent.RECENT_MAX)])[-1])
    except ValueError:
        after, limit = 0, recent.RECENT_MAX
    return {"entries": recent.recent(after, limit), "max": recent.RECENT_MAX}


# Probes and scrapes need a handful of connections; a flood of them must not grow without
# bound (each holds a task until its head timeout).
ADMIN_MAX_CONNECTIONS = 256


class AdminServer:
    def __init__(
        self,
        metrics: Metrics,
        hooks: AdminHooks,
        public_paths: frozenset[bytes] = PUBLIC_PATHS,
        max_connections: int = ADMIN_MAX_CONNECTIONS,
    ) -> None:
        if not public_paths <= MAY_BE_PUBLIC:
            raise ValueError(f"admin paths {sorted(public_paths - MAY_BE_PUBLIC)} cannot be public")
        self.metrics = metrics
        self.hooks = hooks
        self.public_paths = public_paths
        self.conn_limit = ConnectionLimit(
            "admin", max_connections, lambda n: metrics.listener_refusals.labels(n).inc()
        )

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        if not self.conn_limit.try_enter():
            await refuse_http(
                stream, f"admin listener connection limit ({self.conn_limit.maximum}) reached"
            )
            return
        try:
            local = is_loopback_peer(stream)
            await serve_http(
                HttpConn(stream, "request"),
                lambda req, conn: self.handle_request(req, conn, local=local),
            )
        finally:
            self.conn_limit.leave()

    async def handle_request(
        self, req: RequestHead, conn: HttpConn, *, local: bool = False
    ) -> bool:
        if request_has_body(req):
            await send_error(conn, 413, "admin endpoints take no request body")
            return False
        ev = await conn.next_event()
        if not isinstance(ev, EndOfMessage):
            return False
        path = req.target.split(b"?", 1)[0]
        method = req.method
        if not local and path not in self.public_paths:
            await send_error(
                conn,
                403,
                f"admin endpoint {path.decode('latin-1')} is served on loopback only",
                close=False,
            )
            return True
        if method in (b"GET", b"HEAD"):
            served = await self._read_endpoint(conn, path, req.target.partition(b"?")[2])
        elif method == b"POST":
            served = await self._action(conn, path)
        else:
            served = None
        if served is None:
            await send_error(
                conn,
                404,
                f"no admin endpoint {method.decode()} {path.decode('latin-1')}",
                close=False,
            )
            return True
        return served

    async def _read_endpoint(self, conn: HttpConn, path: bytes, query: bytes = b"") -> bool | None:
        """GET/HEAD endpoints: True once answered, None if there is no such endpoint."""
        if path == b"/live":
            await self._json(conn, 200, {"live": True})
        elif path == b"/ready":
            ok, why = self.hooks.ready()
            await self._json(conn, 200 if ok else 503, {"ready": ok, "reason": why})
        elif path == b"/metrics":
            body = await self.hooks.metrics() if self.hooks.metrics else self.metrics.render()
            await conn.send(simple_response(200, body, content_type=b"text/plain; version=0.0.4"))
        elif path == b"/certs":
            await self._json(conn, 200, self.hooks.certs())
        elif path == b"/authz/explain" and self.hooks.explain:
            args = parse_qs(query.decode("latin-1"), keep_blank_values=True)
            await self._json(conn, *self.hooks.explain({k: v[-1] for k, v in args.items()}))
        elif path == b"/config/status" and self.hooks.config_status:
            await self._json(conn, 200, self.hooks.config_status())
        elif (view := self._dashboard_view(path, query)) is not None:
            await self._json(conn, 200, view)
        else:
            return None
        return True

    def _dashboard_view(self, path: bytes, query: bytes) -> dict | None:
        """GET /routes (the edge's) and GET /requests/recent, both loopback only (never in
        MAY_BE_PUBLIC): what `meshcar dashboard` reads; None if not one of them."""
        if path == b"/routes" and self.hooks.routes:
            return {"routes": self.hooks.routes()}
        if path == b"/requests/recent":
            return _recent_entries(query)
        return None

    async def _action(self, conn: HttpConn, path: bytes) -> bool | None:
        """POST endpoints: whether the connection stays open, None if there is no such endpoint."""
        if path == b"/renew" and self.hooks.renew:
            await self._json(conn, 200, await self.hooks.renew())
            return True
        if path == b"/shutdown" and self.hooks.shutdown:
            await self._json(conn, 202, {"shutting_down": True})
            self.hooks.shutdown()
            return False
        return None

    async def _json(self, conn: HttpConn, status: int, obj: object) -> None:
        body = json.dumps(obj, default=str).encode() + b"\n"
        await conn.send(simple_response(status, body, content_type=b"application/json"))
