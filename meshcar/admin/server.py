"""The admin listener (localhost): /live, /ready, /metrics, /certs, POST /renew, POST /shutdown.

Shared by the sidecar and the edge: the process hands in callables for readiness, the
certificate view and the actions, so this module knows nothing about either.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from meshcar.admin.metrics import Metrics
from meshcar.net.forward import request_has_body
from meshcar.net.httpconn import HttpConn
from meshcar.net.httpserver import send_error, serve_http
from meshcar.proto.headers import simple_response
from meshcar.proto.http1 import EndOfMessage, RequestHead


@dataclass
class AdminHooks:
    ready: Callable[[], tuple[bool, str]]
    certs: Callable[[], dict]
    renew: Callable[[], Awaitable[dict]] | None = None
    shutdown: Callable[[], None] | None = None


class AdminServer:
    def __init__(self, metrics: Metrics, hooks: AdminHooks) -> None:
        self.metrics = metrics
        self.hooks = hooks

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        await serve_http(HttpConn(stream, "request"), self.handle_request)

    async def handle_request(self, req: RequestHead, conn: HttpConn) -> bool:
        if request_has_body(req):
            await send_error(conn, 413, "admin endpoints take no request body")
            return False
        ev = await conn.next_event()
        if not isinstance(ev, EndOfMessage):
            return False
        path = req.target.split(b"?", 1)[0]
        method = req.method
        if method in (b"GET", b"HEAD") and path == b"/live":
            await self._json(conn, 200, {"live": True})
        elif method in (b"GET", b"HEAD") and path == b"/ready":
            ok, why = self.hooks.ready()
            await self._json(conn, 200 if ok else 503, {"ready": ok, "reason": why})
        elif method in (b"GET", b"HEAD") and path == b"/metrics":
            body = self.metrics.render()
            await conn.send(simple_response(200, body, content_type=b"text/plain; version=0.0.4"))
        elif method in (b"GET", b"HEAD") and path == b"/certs":
            await self._json(conn, 200, self.hooks.certs())
        elif method == b"POST" and path == b"/renew" and self.hooks.renew:
            await self._json(conn, 200, await self.hooks.renew())
        elif method == b"POST" and path == b"/shutdown" and self.hooks.shutdown:
            await self._json(conn, 202, {"shutting_down": True})
            self.hooks.shutdown()
            return False
        else:
            await send_error(conn, 404, f"no admin endpoint {method.decode()} {path.decode('latin-1')}",
                             close=False)
        return True

    async def _json(self, conn: HttpConn, status: int, obj: object) -> None:
        body = json.dumps(obj, default=str).encode() + b"\n"
        await conn.send(simple_response(status, body, content_type=b"application/json"))
