"""HTTP/2 through a role: h2c from the app, h2 (ALPN) between sidecars and from the edge's
clients, h2c or HTTP/1.1 onward (the sidecar's `sidecar/h2.py`, the edge's `edge/h2.py`).

Theory of operation
-------------------
`H2Proxy.serve(stream)` serves one downstream HTTP/2 connection (`net/h2conn.py`). Each
stream's head becomes a `RequestHead` (pseudo-headers to method, target and Host) and goes
to the role's own `decide()`, the same function its HTTP/1.1 requests go to: target
normalisation, the allow list, identity-header stripping and XFCC are one code path. A
`Refuse` is answered on the stream; a `Forward`'s rewritten head (`Forward.head`, HTTP/1.1
bytes) is turned back into HTTP/2 headers, so what is forwarded is exactly what was decided.

Upstream connections belong to the downstream connection (one per endpoint, opened on first
use, closed with it); each request takes the next endpoint of its upstream (round robin per
request, not per connection, so one long-lived gRPC channel spreads over every endpoint).
Bodies and trailers are relayed chunk by chunk with end-to-end flow control (`pump`).
A `grpc-timeout` bounds the exchange: at the deadline the upstream stream is cancelled and
the caller gets `grpc-status: 4` (DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from meshcar.admin.metrics import Metrics
from meshcar.common.accesslog import log_request
from meshcar.errors import BodyTooLarge, MeshcarError, UpstreamError
from meshcar.net.drain import Drain
from meshcar.net.errors import CONNECTION_ERRORS
from meshcar.net.forward import keep_response_headers
from meshcar.net.h2conn import CANCEL, H2Conn, H2Stream, StreamGone, check_limit, pump
from meshcar.net.pipeline import Forward
from meshcar.net.respond import Refuse, error_body, grpc_refusal, reason_of
from meshcar.proto.http1 import RequestHead, ResponseHead
from meshcar.proto.trace import stamp

Headers = list[tuple[bytes, bytes]]
# connection-specific headers (RFC 9113 8.2.2) never sent on HTTP/2
NOT_H2 = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)
GRPC_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}

Decide = Callable[[RequestHead], tuple[Any, Any]]  # the role's decide(): (Decision, label)
# (key, decision) -> (endpoint, opener): the endpoint the request goes to, and how to open
# a stream to it when the downstream connection has none yet (the role's dialer); or None:
# the request goes on as HTTP/1.1 through the decision's pool
Pick = Callable[[str, Forward], tuple[Any, Callable[[], Awaitable[trio.abc.Stream]]] | None]
Rewrite = Callable[[ResponseHead, Headers], Headers]


def _reason(status: int, req: RequestHead | str, decision: object) -> str | None:
    """A stream's access-log reason: a malformed stream's (protocol), a refusal's; once
    forwarded, `upstream` for a 5xx (the upstream's answer or our error answering for it) and
    `upstream_status` for a 3xx/4xx the upstream sent."""
    if isinstance(req, str):
        return "protocol"
    if status < 300 or not isinstance(decision, Forward):
        return reason_of(status, decision, None)
    return "upstream" if status >= 500 else "upstream_status"


def request_head(headers: Headers, ended: bool) -> RequestHead | str:
    """The HTTP/1.1-shaped head `decide()` takes, or why the stream is malformed."""
    pseudo: dict[bytes, bytes] = {}
    regular: Headers = []
    for k, v in headers:
        if k.startswith(b":"):
            pseudo[k] = v
        elif k != b"host":
            regular.append((k, v))
        elif b":authority" not in pseudo:
            pseudo[b":authority"] = v
    method = pseudo.get(b":method", b"")
    if method == b"CONNECT":
        return "CONNECT over HTTP/2 is not supported"
    path = pseudo.get(b":path")
    if not path:
        return "missing :path"
    cl = next((v for k, v in regular if k == b"content-length"), None)
    length = int(cl) if cl is not None and cl.isdigit() else None
    hs: Headers = [(b"host", pseudo[b":authority"])] if b":authority" in pseudo else []
    hs += regular
    chunked = length is None and not ended  # a body of unknown length (HTTP/1.1: chunked)
    return RequestHead(method, path, "2", hs, True, chunked, length)


def h2_headers(head: bytes, scheme: bytes, te_trailers: bool) -> Headers:
    """HTTP/2 request headers from a decided HTTP/1.1 request head."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    method, target, _ = lines[0].split(b" ", 2)
    out: Headers = [(b":method", method), (b":scheme", scheme), (b":path", target)]
    rest: Headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"host":
            out.append((b":authority", value.strip()))
        elif name not in NOT_H2:
            rest.append((name, value.strip()))
    if te_trailers:
        rest.append((b"te", b"trailers"))
    return out + rest


def grpc_timeout(headers: Headers) -> float | None:
    """Seconds of a `grpc-timeout` header (gRPC over HTTP/2: 1-8 digits and a unit)."""
    for k, v in headers:
        if k == b"grpc-timeout" and 2 <= len(v) <= 9 and v[:-1].isdigit():
            unit = GRPC_UNITS.get(v[-1:])
            if unit is not None:
                return int(v[:-1]) * unit
    return None


def is_grpc(headers: Headers) -> bool:
    return any(k == b"content-type" and v.startswith(b"application/grpc") for k, v in headers)


async def respond(down: H2Conn, s: H2Stream, status: int, message: str, extra: Any = ()) -> None:
    """A refusal on stream `s`: the JSON error body with its HTTP status, or for gRPC
    (content-type application/grpc*) a Trailers-Only answer: HTTP 200, grpc-status and
    grpc-message (`net/respond.py`'s map), no body, as gRPC's HTTP/2 protocol says."""
    more = [(k.lower(), v) for k, v in extra]
    if s.headers and is_grpc(s.headers):
        hs = grpc_refusal(status, message)
        await down.send_headers(s.id, hs[:2] + more + hs[2:], end=True)
        return
    hs = [(b":status", str(status).encode()), *more]
    body = error_body(status, message)
    hs += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await down.send_headers(s.id, hs)
    await down.send_data(s.id, body, end=True)


class H2Proxy:
    """HTTP/2 connections of one role side: `decide` is the role's, `dial` its upstreams'."""

    def __init__(
        self,
        direction: str,
        pick: Pick,
        metrics: Metrics,
        label_key: str = "upstream",
        observe: Callable[[dict], None] | None = None,
    ) -> None:
        # what the second value decide() returns is, in the log (a dict: several fields)
        self.label_key = label_key
        self.observe = observe  # sees each stream's log line before it is written
        self.direction = direction
        self.pick = pick
        self.metrics = metrics

    async def serve(
        self, stream: trio.abc.Stream, decide: Decide, fields: dict, drain: Drain | None = None
    ) -> None:
        """Serve one HTTP/2 connection; `fields` go into each stream's access-log line. With
        `drain` (the process's), each stream counts as a request in flight, and once the
        process drains, the first stream to end sends a graceful GOAWAY and the connection
        closes when its last stream has ended."""
        down = H2Conn(stream, client=False, label=self.direction)
        async with trio.open_nursery() as nursery:
            ups = _Upstreams(nursery)
            try:
                await down.start()
            except BaseException:  # before run() owns the stream
                await trio.aclose_forcefully(stream)
                raise
            await down.run(lambda s: self._drained(down, s, decide, ups, fields, drain))
            nursery.cancel_scope.cancel()

    async def _drained(
        self,
        down: H2Conn,
        s: H2Stream,
        decide: Decide,
        ups: _Upstreams,
        fields: dict,
        drain: Drain | None,
    ) -> None:
        if drain is None:
            await self._stream(down, s, decide, ups, fields)
            return
        with drain:
            await self._stream(down, s, decide, ups, fields)
        if drain.draining:
            await down.goaway_graceful()
            if len(down.streams) <= 1:  # this one is forgotten after we return
                await down.close(0, "draining")

    async def _stream(
        self, down: H2Conn, s: H2Stream, decide: Decide, ups: _Upstreams, fields: dict
    ) -> None:
        start = time.perf_counter()
        stats = [0, 0, 0]  # status, bytes in, bytes out
        headers = s.headers or []
        # a body that already arrived whole, with no content-length, still goes on chunked
        req = request_head(headers, s.ended and not s.chunks)
        hop = None if isinstance(req, str) else stamp(req.headers)  # proto/trace.py
        label: Any = None
        decision: Any = None
        try:
            if isinstance(req, str):
                stats[0] = 400
                await respond(down, s, 400, req)
                return
            decision, label = decide(req)
            if isinstance(decision, Refuse):
                stats[0] = decision.status
                await respond(down, s, decision.status, decision.message, decision.headers)
                return
            await self._forward(down, s, req, decision, ups, stats)
        except StreamGone:
            pass
        finally:
            dur = time.perf_counter() - start
            self.metrics.observe_request(self.direction, stats[0], dur)
            line = {
                "direction": self.direction,
                "protocol": "h2",
                **fields,
                "method": dict(headers).get(b":method", b"").decode("latin-1"),
                "path": req.target.decode("latin-1") if not isinstance(req, str) else "",
                **(hop.fields() if hop is not None else {}),
            }
            if isinstance(label, dict):
                line.update(label)
            elif label:
                line[self.label_key] = label
            line.update(
                status=stats[0],
                reason=_reason(stats[0], req, decision),
                bytes_in=stats[1],
                bytes_out=stats[2],
                duration_ms=round(dur * 1000, 3),
            )
            if self.observe is not None:
                self.observe(line)
            log_request(**line)

    async def _forward(
        self,
        down: H2Conn,
        s: H2Stream,
        req: RequestHead,
        decision: Forward,
        ups: _Upstreams,
        stats: list[int],
    ) -> None:
        headers = s.headers or []
        scheme = dict(headers).get(b":scheme", b"http")
        te = any(k == b"te" and b"trailers" in v for k, v in headers)
        out = h2_headers(decision.head, scheme, te)
        deadline = grpc_timeout(headers)
        try:
            try:
                target = self.pick(decision.key, decision)
                if target is None:  # HTTP/1.1 onward, through the decision's pool
                    await self._http1(down, s, req, decision, stats, deadline)
                    return
                up = await ups.get(*target)
            except MeshcarError as exc:
                stats[0] = exc.status
                await respond(down, s, exc.status, f"{decision.upstream}: {exc}")
                return
            limit = decision.max_request_body
            big: list[BaseException] = []
            try:
                with trio.move_on_after(
                    deadline if deadline is not None else float("inf")
                ) as scope:
                    await relay(down, s, up, out, stats, decision.rewrite_response, limit)
            except* BodyTooLarge as eg:  # a streamed body past max_body_bytes
                big.append(eg.exceptions[0])
            ups.answered(up)  # a new connection's TLS session, kept once it has answered
            if big:
                await too_large(down, s, big[0], stats)
            elif scope.cancelled_caught:
                stats[0] = stats[0] or 200
                await deadline_exceeded(down, s)
        finally:
            if decision.on_done is not None:
                decision.on_done()

    async def _http1(
        self,
        down: H2Conn,
        s: H2Stream,
        req: RequestHead,
        decision: Forward,
        stats: list[int],
        deadline: float | None,
    ) -> None:
        failed: list[BaseException] = []
        try:
            with trio.move_on_after(deadline if deadline is not None else float("inf")) as sc:
                await relay_http1(down, s, req, decision, stats)
        except* HTTP1_FAILURES as eg:
            failed.append(eg.exceptions[0])
        if failed:
            exc = failed[0]
            status = exc.status if isinstance(exc, MeshcarError) else 502
            if isinstance(exc, BodyTooLarge):
                await too_large(down, s, exc, stats)
            elif s.head_sent:
                await down.reset(s.id, CANCEL)
            else:
                stats[0] = status
                await respond(down, s, status, f"{decision.upstream}: {exc}")
        elif sc.cancelled_caught:
            await deadline_exceeded(down, s)


async def too_large(down: H2Conn, s: H2Stream, exc: BaseException, stats: list[int]) -> None:
    """A streamed request body passed the route's max_body_bytes: 413 on the stream if no
    response head went out yet (then RST_STREAM NO_ERROR for the rest of the body, as
    `forget` does), else RST_STREAM CANCEL; other streams go on."""
    if s.head_sent:
        await down.reset(s.id, CANCEL)
        return
    stats[0] = 413
    await respond(down, s, 413, str(exc))


async def deadline_exceeded(down: H2Conn, s: H2Stream) -> None:
    """gRPC's DEADLINE_EXCEEDED: in trailers, or trailers-only if no head went out yet."""
    trailers = [(b"grpc-status", b"4"), (b"grpc-message", b"deadline exceeded (grpc-timeout)")]
    try:
        if s.head_sent:
            await down.end_stream(s.id, trailers)
        else:
            hs = [(b":status", b"200"), (b"content-type", b"application/grpc")]
            await down.send_headers(s.id, hs + trailers, end=True)
    except StreamGone:
        pass


class _Upstreams:
    """The downstream connection's upstream connections, one per endpoint, dialed on use."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.conns: dict[Any, H2Conn] = {}
        self.locks: dict[Any, trio.Lock] = {}
        # new connections whose opener keeps their TLS session once they answered (TLS 1.3
        # tickets arrive after the handshake): the callback, called once
        self.fresh: dict[H2Conn, Callable[[], None]] = {}

    def answered(self, conn: H2Conn) -> None:
        remember = self.fresh.pop(conn, None)
        if remember is not None:
            remember()

    async def get(self, endpoint: Any, opener: Callable[[], Awaitable[trio.abc.Stream]]) -> H2Conn:
        conn = self.conns.get(endpoint)
        if conn is not None and conn.usable:
            return conn
        lock = self.locks.setdefault(endpoint, trio.Lock())
        async with lock:
            conn = self.conns.get(endpoint)
            if conn is None or not conn.usable:
                stream = await opener()
                conn = H2Conn(stream, client=True, label="upstream")
                try:
                    await conn.start()
                except BaseException:  # cancelled (or failed) before run() owns the stream
                    await trio.aclose_forcefully(stream)
                    raise
                self.nursery.start_soon(conn.run)
                self.conns[endpoint] = conn
                remember = getattr(opener, "remember", None)
                if remember is not None:
                    self.fresh[conn] = lambda: remember(stream)
        return conn


def rewritten(head: Headers, rewrite: Rewrite) -> Headers:
    """Response headers for the stream: connection-specific ones dropped, the role's rewrite
    (the edge's HSTS) applied."""
    pseudo = [(k, v) for k, v in head if k.startswith(b":")]
    regular = [(k, v) for k, v in head if not k.startswith(b":") and k not in HOP_RESPONSE]
    if rewrite is not keep_response_headers:
        status = int(dict(pseudo).get(b":status", b"0") or 0)
        resp = ResponseHead(status, b"", "2", regular, True, False, None, False)
        regular = [(k.lower(), v) for k, v in rewrite(resp, regular)]
    return pseudo + regular


async def relay(
    down: H2Conn,
    ds: H2Stream,
    up: H2Conn,
    headers: Headers,
    stats: list[int],
    rewrite: Rewrite = keep_response_headers,
    limit: int | None = None,
) -> None:
    """One exchange: request (headers, body, trailers) up, response down; a reset on either
    side resets the other. A request body past `limit` bytes: BodyTooLarge."""
    bodiless = ds.ended and not ds.chunks and ds.trailers is None
    us = await up.request(headers, end=bodiless)
    done = False
    try:
        async with trio.open_nursery() as nursery:

            async def request_body() -> None:
                try:
                    stats[1] = await pump(down, ds, up, us.id, limit)
                except StreamGone:
                    if ds.gone is not None:  # the caller gave up: so does the upstream
                        raise
                    # the upstream ended the stream: its response says how

            if not bodiless:
                nursery.start_soon(request_body)
            head = await us.head()
            stats[0] = int(dict(head).get(b":status", b"0") or 0)
            head = rewritten(head, rewrite)
            if us.ended and not us.chunks and us.trailers is None:
                await down.send_headers(ds.id, head, end=True)
            else:
                await down.send_headers(ds.id, head)
                ds.head_sent = True
                stats[2] = await pump(up, us, down, ds.id)
            done = True
            if ds.gone is None and not ds.ended:
                nursery.cancel_scope.cancel()  # answered before the body was read: RFC 9113 8.1
                await down.reset(ds.id, 0)
    except* StreamGone:
        if not done:
            await _reset_both(down, ds, up, us)
    finally:
        if not done:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await up.reset(us.id, CANCEL)
        up.forget(us)


async def _reset_both(down: H2Conn, ds: H2Stream, up: H2Conn, us: H2Stream) -> None:
    await up.reset(us.id, CANCEL)
    await down.reset(ds.id, us.gone if us.gone is not None else CANCEL)


class H2ClientContext:
    """The mesh client context offering h2 (then http/1.1), made once per credential: keyed
    by the store's current client context, so a renewal makes a new one."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._contexts: dict[int, Any] = {}

    def __call__(self) -> Any:
        from meshcar.tls.contexts import mesh_client_context

        base = self.store.client_context()
        ctx = self._contexts.get(id(base))
        if ctx is None:
            cred = self.store.credential
            ctx = mesh_client_context(self.store.chain_file, self.store.key_file, cred.bundle_pem)
            ctx.set_alpn_protocols(["h2", "http/1.1"])
            self._contexts = {id(base): ctx}  # the previous credential's is dropped
        return ctx


class h2_opener:  # noqa: N801 (a callable, as it was a function)
    """How to open an mTLS connection to `peer` that speaks h2 (502 if it does not), and
    `remember(stream)`: keep its TLS session in the dialer's session cache (the same
    `remember_session` the HTTP/1.1 pool calls on release), so the next connection to the
    endpoint resumes it."""

    __slots__ = ("mtls", "key", "peer", "pooled")

    def __init__(self, mtls: Any, key: str, peer: Any) -> None:
        self.mtls = mtls
        self.key = key
        self.peer = peer
        self.pooled: Any = None

    async def __call__(self) -> trio.abc.Stream:
        pooled = await self.mtls.dial(self.key, self.peer)
        stream = pooled.conn.stream
        if stream.selected_alpn_protocol() != "h2":
            await trio.aclose_forcefully(stream)
            raise UpstreamError(f"peer at {self.peer.endpoint} does not speak h2", 502)
        self.pooled = pooled
        return stream

    def remember(self, stream: trio.abc.Stream) -> None:
        if self.pooled is not None and self.pooled.conn.stream is stream:
            self.mtls.remember_session(self.pooled)


class MeshPicker:
    """Outbound: each request to an upstream goes to its next endpoint (round robin per
    request); a new connection is mTLS with ALPN h2 through the one mTLS dialer."""

    def __init__(self, store: Any, metrics: Metrics, upstreams: dict[str, Any], pool: Any):
        from meshcar.common.mtls import MeshPeer, MTLSDialer

        self.pool = pool  # the outbound's HTTP/1.1 pool: its Forwards are mesh upstreams
        self.mtls = MTLSDialer(store, metrics, "outbound", context=H2ClientContext(store))
        self._rr = {
            name: itertools.cycle(
                [MeshPeer(ep.host, ep.port, u.spiffe_id, name, ep) for ep in u.endpoints]
            )
            for name, u in upstreams.items()
        }

    def __call__(self, key: str, decision: Forward) -> tuple[Any, Any]:
        if decision.pool is not self.pool or key not in self._rr:
            raise UpstreamError("HTTP/2 goes to mesh upstreams only (no h2 egress)", 502)
        peer = next(self._rr[key])
        return peer.endpoint, h2_opener(self.mtls, key, peer)


async def relay_http1(
    down: H2Conn, ds: H2Stream, req: RequestHead, decision: Forward, stats: list[int]
) -> None:
    """One HTTP/2 stream to an HTTP/1.1 app (`app.protocol: http1`) through the role's
    keep-alive pool: the decided head as is (a body of unknown length goes chunked), the
    response's head, body and end back on the stream. Trailers do not cross HTTP/1.1."""
    pooled, _ = await decision.pool.acquire(decision.key)
    conn = pooled.conn
    reusable = False
    try:
        await conn.send(decision.head)
        async with trio.open_nursery() as nursery:
            request_done: list[bool] = [ds.ended and not ds.chunks]
            if not request_done[0]:
                limit = decision.max_request_body
                args = (down, ds, conn, req.chunked, stats, request_done, limit)
                nursery.start_soon(_body_to_http1, *args)
            if req.method == b"HEAD":
                conn.parser.expect_no_body()
            reusable = await _response_from_http1(down, ds, conn, stats, decision.rewrite_response)
            if not request_done[0]:
                nursery.cancel_scope.cancel()  # answered before the body was read
                reusable = False
                await down.reset(ds.id, 0)
    finally:
        await decision.pool.release(pooled, reusable)


async def _body_to_http1(
    down: H2Conn,
    ds: H2Stream,
    conn: Any,
    chunked: bool,
    stats: list[int],
    done: list[bool],
    limit: int | None,
) -> None:
    while True:
        item = await ds.receive()
        if item is None:
            if chunked:
                await conn.send(b"0\r\n\r\n")
            done[0] = True
            return
        data, fc = item
        check_limit(down, ds, stats[1] + len(data), fc, limit)
        if data:
            await conn.send(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
            stats[1] += len(data)
        down.ack(ds.id, fc)
        await down.flush()


async def _response_from_http1(
    down: H2Conn, ds: H2Stream, conn: Any, stats: list[int], rewrite: Rewrite
) -> bool:
    """Relay the app's response; True if its connection may be reused."""
    from meshcar.proto.http1 import Data, EndOfMessage, ResponseHead

    while True:
        ev = await conn.next_event()
        if ev is None:
            raise UpstreamError("the app closed the connection before its response", 502)
        if isinstance(ev, ResponseHead) and ev.status >= 200:
            break
    head = ev
    stats[0] = head.status
    regular = rewrite(head, [(k.lower(), v) for k, v in head.headers])
    hs = [(b":status", str(head.status).encode())]
    hs += [(k.lower(), v) for k, v in regular if k.lower() not in HOP_RESPONSE]
    ev = await conn.next_event()
    if isinstance(ev, EndOfMessage):
        await down.send_headers(ds.id, hs, end=True)
        ds.head_sent = True
        return head.keep_alive
    await down.send_headers(ds.id, hs)
    ds.head_sent = True
    while not isinstance(ev, EndOfMessage):
        if ev is None:  # a body delimited by close ends here
            await down.end_stream(ds.id)
            return False
        if isinstance(ev, Data):
            await down.send_data(ds.id, ev.data)
            stats[2] += len(ev.data)
        ev = await conn.next_event()
    await down.end_stream(ds.id)
    return head.keep_alive


# what ends an exchange with the HTTP/1.1 app: answered (502/503/504) if no head went out yet
HTTP1_FAILURES: tuple[type[Exception], ...] = (
    MeshcarError,
    *(e for e in CONNECTION_ERRORS if issubclass(e, Exception)),
)
# connection-specific response headers of HTTP/1.1 that HTTP/2 forbids
HOP_RESPONSE = NOT_H2 | {b"trailer", b"proxy-authenticate"}
