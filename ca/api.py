"""The CA's HTTPS API on trio + h11: /v1/sign, /v1/bundle, /healthz, /metrics (docs/CA-API.md).

Theory of operation: `serve` binds with `trio.serve_tcp` (so `nursery.start(server.serve,
...)` returns only once the port is bound) and runs `handle_tcp` in its own task per
connection. A connection does the TLS handshake under `handshake_timeout`, then loops over
keep-alive requests with h11: the request head must arrive within `idle_timeout`, the body
(bounded by `max_body`, checked against Content-Length first and while reading) and the
answer within `request_timeout`. Anything a client can do wrong (TLS junk, bad HTTP, a
stalled socket, an oversized body, bad JSON/CSR/credentials) ends in a 4xx JSON answer
and/or a closed connection for that client only; `handle_tcp` never lets an exception
escape into the listener's nursery. `CAError`s become HTTP answers in `_error_response`,
the one place that mapping happens. One JSON log line per request; bodies, tokens and keys
are never logged. Draining (ca/cli.py on SIGTERM): `in_flight` counts requests from their
head to their answer, `wait_idle` waits for none, and once `draining` is set a keep-alive
connection closes after its current request.
"""

from __future__ import annotations

import json
import ssl
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import h11
import trio

from . import metrics
from .errors import CAError, MethodNotAllowed, NotFound, TooLarge
from .issuer import utcnow
from .sign import SignService, parse_sign_request
from .throttle import AuthThrottle

Log = Callable[[dict[str, Any]], None]
JSON = "application/json"
_STATUSES = {s.value for s in HTTPStatus}


def json_log(record: dict[str, Any]) -> None:
    """Default logger: one JSON object per line on stdout."""
    sys.stdout.write(json.dumps(record, separators=(", ", ": ")) + "\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class Limits:
    handshake_timeout: float = 10.0
    idle_timeout: float = 30.0  # waiting for (the head of) the next request
    request_timeout: float = 30.0  # reading the body and answering
    max_body: int = 64 * 1024
    max_header: int = 16 * 1024
    max_requests_per_connection: int = 1000
    max_connections: int = 1024  # open at once; more are closed before the TLS handshake


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()
    log: dict[str, Any] = field(default_factory=dict)


def _json_response(status: int, obj: Any, **log: Any) -> Response:
    return Response(status, json.dumps(obj).encode() + b"\n", JSON, (), log)


def _error_response(exc: CAError) -> Response:
    """The one place a CAError becomes an HTTP answer."""
    extra: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, MethodNotAllowed):
        extra = (("Allow", exc.allow),)
    resp = _json_response(exc.status, {"error": exc.code, "message": exc.message}, error=exc.code)
    return Response(resp.status, resp.body, resp.content_type, extra, resp.log)


ROUTES: dict[str, str] = {
    "/healthz": "GET",
    "/metrics": "GET",
    "/v1/bundle": "GET",
    "/v1/sign": "POST",
}


class _CloseConnection(Exception):
    """Internal: stop serving this connection (after answering if possible)."""


class CAServer:
    """Serves one CA (a SignService) over TLS: an SSLContext from `tls.server_context`, or a
    function returning the context to use for each new connection (so a root rotation can
    change the server certificate and the trusted roots without a restart)."""

    def __init__(
        self,
        service: SignService,
        ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext],
        limits: Limits | None = None,
        log: Log = json_log,
    ) -> None:
        self.service = service
        self._context = ssl_context
        self.limits = limits or Limits()
        self.log = log
        self.internal_errors = 0  # connections ended by a bug (logged with traceback)
        self.auth_throttle = AuthThrottle()
        self.in_flight = 0  # requests between their head and their answer
        self.draining = False
        self._idle: trio.Event | None = None
        self.open_connections = 0
        self.refused_connections = 0  # closed unserved: max_connections were open

    @contextmanager
    def _counted(self) -> Iterator[None]:
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            if not self.in_flight and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def wait_idle(self) -> None:
        while self.in_flight:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The context for the next connection."""
        ctx = self._context
        return ctx if isinstance(ctx, ssl.SSLContext) else ctx()

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on host:port until cancelled; `nursery.start` returns the bound listeners."""
        await trio.serve_tcp(self.handle_tcp, port, host=host, task_status=task_status)

    async def serve_listeners(
        self,
        listeners: list[trio.SocketListener],
        *,
        handler_nursery: trio.Nursery | None = None,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on already-bound listeners until cancelled (connections in `handler_nursery`
        if given, so cancelling this closes the listeners but not accepted connections)."""
        await trio.serve_listeners(
            self.handle_tcp, listeners, handler_nursery=handler_nursery, task_status=task_status
        )

    async def handle_tcp(self, tcp: trio.SocketStream) -> None:
        """One connection, start to end. Never raises (except cancellation)."""
        peer = _peer(tcp)
        if self.open_connections >= self.limits.max_connections:
            # before any TLS work: a flood of connections costs the CA a file descriptor
            # each, not a handshake, and the clients already connected are served
            self.refused_connections += 1
            self.log(
                {
                    "event": "ca.connection_refused",
                    "peer": peer,
                    "max_connections": self.limits.max_connections,
                }
            )
            await trio.aclose_forcefully(tcp)
            return
        self.open_connections += 1
        try:
            await self._connection(tcp, peer)
        except Exception as exc:  # a bug must cost one connection, never the server
            self.log(
                {
                    "event": "ca.internal_error",
                    "peer": peer,
                    "error": type(exc).__name__,
                    "traceback": _frames(exc),
                }
            )
            self.internal_errors += 1
        finally:
            self.open_connections -= 1
            await trio.aclose_forcefully(tcp)

    async def _connection(self, tcp: trio.SocketStream, peer: str) -> None:
        stream = trio.SSLStream(tcp, self.ssl_context, server_side=True, https_compatible=True)
        try:
            with trio.fail_after(self.limits.handshake_timeout):
                await stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            self.log({"event": "ca.tls_error", "peer": peer, "error": _tls_reason(exc)})
            return
        peer_der: bytes | None = stream.getpeercert(binary_form=True)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header)
        try:
            for _ in range(self.limits.max_requests_per_connection):
                if not await self._one_request(stream, conn, peer, peer_der):
                    break
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            return
        with trio.move_on_after(1):
            try:
                await stream.aclose()
            except trio.BrokenResourceError:
                pass

    def _throttled(self, path: str, peer: str, peer_der: bytes | None) -> Response | None:
        """429 for /v1/sign from a source with too many failed authentications (token callers)."""
        source = peer.rsplit(":", 1)[0]
        wait = self.auth_throttle.retry_after(source) if peer_der is None else 0
        if not (wait and path == "/v1/sign"):
            return None
        self.auth_throttle.refused += 1
        response = _json_response(
            429,
            {
                "error": "rate_limited",
                "message": f"too many failed authentications from {source}; retry in {wait} s",
            },
            error="rate_limited",
        )
        return Response(429, response.body, JSON, (("Retry-After", str(wait)),), response.log)

    async def _respond(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        conn: h11.Connection,
        event: h11.Request,
        method: str,
        path: str,
        peer: str,
        peer_der: bytes | None,
    ) -> tuple[Response, bool]:
        """The response to one request and whether the connection may stay open; protocol
        errors and timeouts propagate to `_one_request`."""
        try:
            body = await self._read_body(stream, conn, event)
            response = self._throttled(path, peer, peer_der)
            if response is None:
                response = await self._dispatch(method, path, body, peer_der)
            return response, True
        except CAError as exc:
            if exc.status in (401, 403) and peer_der is None:
                self.auth_throttle.failed(peer.rsplit(":", 1)[0])
            return _error_response(exc), not isinstance(exc, TooLarge)
        except (
            h11.RemoteProtocolError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
        ):
            raise
        except Exception as exc:  # a bug: answer 500 to this request, keep serving others
            self.log(
                {
                    "event": "ca.internal_error",
                    "peer": peer,
                    "error": type(exc).__name__,
                    "traceback": _frames(exc),
                }
            )
            self.internal_errors += 1
            return _json_response(
                500, {"error": "internal", "message": "internal error"}, error="internal"
            ), False

    async def _one_request(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        conn: h11.Connection,
        peer: str,
        peer_der: bytes | None,
    ) -> bool:
        """Serve one request; return True to keep the connection for another."""
        keep = True
        method = path = "-"
        start = trio.current_time()
        try:
            with trio.move_on_after(self.limits.idle_timeout) as idle:
                event = await _next_event(stream, conn)
            if idle.cancelled_caught or isinstance(event, h11.ConnectionClosed):
                return False
            assert isinstance(event, h11.Request)
            start = trio.current_time()
            method = event.method.decode("ascii", "replace")
            path = event.target.split(b"?", 1)[0].decode("ascii", "replace")[:200]
            with trio.fail_after(self.limits.request_timeout), self._counted():
                response, keep = await self._respond(
                    stream, conn, event, method, path, peer, peer_der
                )
                await self._send(stream, conn, response, close=not keep, head=method == "HEAD")
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            code = "too_large" if status in (413, 431) else "bad_request"
            response = _json_response(
                status, {"error": code, "message": f"malformed HTTP request: {exc}"}, error=code
            )
            keep = False
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with trio.move_on_after(self.limits.request_timeout):
                    await self._send(stream, conn, response, close=True)
        except trio.TooSlowError:
            response = Response(408, b"", log={"error": "timeout"})
            keep = False
        self.log(
            {
                "event": "ca.request",
                "peer": peer,
                "method": method,
                "path": path,
                "status": response.status,
                "duration_ms": round((trio.current_time() - start) * 1000, 1),
                **response.log,
            }
        )
        return (
            keep
            and not self.draining
            and conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
        )

    async def _read_body(
        self, stream: trio.SSLStream[trio.SocketStream], conn: h11.Connection, request: h11.Request
    ) -> bytes:
        limit = self.limits.max_body
        for name, value in request.headers:
            if name == b"content-length" and int(value) > limit:
                raise TooLarge(f"the body is over {limit} bytes")
        if conn.they_are_waiting_for_100_continue:
            await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = bytearray()
        while True:
            event = await _next_event(stream, conn)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise TooLarge(f"the body is over {limit} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:  # ConnectionClosed mid-body
                raise trio.BrokenResourceError("client went away mid-body")

    async def _dispatch(
        self, method: str, path: str, body: bytes, peer_der: bytes | None
    ) -> Response:
        allowed = ROUTES.get(path)
        if allowed is None:
            raise NotFound(f"no such endpoint: {path}")
        if method != allowed and not (allowed == "GET" and method == "HEAD"):
            raise MethodNotAllowed(f"{path} accepts {allowed} only", allow=allowed)
        if path == "/healthz":
            return _json_response(200, {"status": "ok"})
        if path == "/metrics":  # read-only, unauthenticated (ca/metrics.py)
            body = await trio.to_thread.run_sync(
                lambda: metrics.render(
                    self.service.issuer, utcnow(), self.internal_errors, self.refused_connections
                )
            )
            return Response(200, body, "text/plain; version=0.0.4")
        if path == "/v1/bundle":
            bundle = self.service.issuer.bundle()
            return Response(
                200,
                bundle.pem.encode(),
                "application/x-pem-file",
                (("X-Meshcar-Bundle-Version", str(bundle.version)),),
                {"bundle_version": bundle.version},
            )
        req = parse_sign_request(body)
        result = await trio.to_thread.run_sync(self.service.sign, req, peer_der)
        return _json_response(
            200,
            result.response,
            spiffe_id=result.identity.spiffe_id,
            auth=result.identity.method,
            serial=result.issued.serial_hex,
            not_after=result.response["not_after"],
        )

    async def _send(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        conn: h11.Connection,
        response: Response,
        close: bool,
        head: bool = False,
    ) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
            ("Date", formatdate(usegmt=True)),  # `meshcar check` measures clock skew by it
            *response.headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        reason = (
            HTTPStatus(response.status).phrase.encode() if response.status in _STATUSES else b""
        )
        data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        if response.body and not head:
            data += conn.send(h11.Data(data=response.body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)


async def _next_event(stream: trio.SSLStream[trio.SocketStream], conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(65536)
        conn.receive_data(bytes(data))


def _frames(exc: BaseException) -> list[str]:
    """Where a bug happened (file:line in function), without the exception's message or
    source lines, which may carry request data or secrets."""
    return [f"{f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_tb(exc.__traceback__)]


def _peer(tcp: trio.SocketStream) -> str:
    try:
        host, port = tcp.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "-"


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "handshake_timeout"
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        return str(cause.reason or cause.__class__.__name__).lower()
    return type(cause or exc).__name__
