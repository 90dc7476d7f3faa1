"""Forward one HTTP/1.1 exchange between a downstream and an upstream connection.

Theory of operation: the request head (already rewritten by the caller) goes upstream,
then the request body is streamed event by event, re-framed (Content-Length kept, chunked
re-chunked). The response head comes back, interim 1xx answers are passed on, the final
head is rewritten by the caller's callback and sent down, and the body is streamed the
same way. Nothing is buffered beyond one read, so a body of any size passes in bounded
memory. Failures before the response head reach the client become 502/503/504 (by the
caller); after that the only honest signal left is closing the connection.

Progress timeouts (`Timeouts`): one cancel scope per exchange whose deadline moves before
every read or write that may block, so a stalled peer is noticed without a scope per
operation. No request-body byte for `request_body` seconds: 408 (nothing was sent to the
client yet) and close; the upstream not taking bytes for `write` seconds, or no response
head within `response_head`: 504; after the response head, no upstream body byte for
`response_body` seconds, or the client not taking bytes for `write` seconds: both
connections are closed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from meshcar.errors import (  # the request path's errors, importable from here too
    BodyTooLarge,
    ClientNotReading,
    DownstreamGone,
    ProtocolError,
    RequestBodyStalled,
    ResponseStarted,
    UpstreamError,
)
from meshcar.net import sockio
from meshcar.net.errors import CONNECTION_ERRORS
from meshcar.net.httpconn import HttpConn
from meshcar.proto.headers import (
    LAST_CHUNK,
    chunk,
    clean_headers,
    framing_headers,
    serialize_request,
    serialize_response,
)
from meshcar.proto.http1 import Data, EndOfMessage, Headers, RequestHead, ResponseHead


@dataclass(frozen=True)
class Timeouts:
    """Progress timeouts of a proxied connection and its exchanges, in seconds."""

    request_head: float = 30.0  # the first request head on a new connection
    idle: float = 60.0  # between requests on a keep-alive connection
    request_body: float = 60.0  # no request-body byte from the client
    response_head: float = 60.0  # the upstream's response head, once the request is sent
    response_body: float = 60.0  # no response-body byte from the upstream
    write: float = 60.0  # a write the peer does not take (either direction)
    upgraded_idle: float = 3600.0  # no byte either way on a switched (101) connection


DEFAULT_TIMEOUTS = Timeouts()


class _Clock:
    """The deadline of one exchange, moved before each operation that may block."""

    __slots__ = ("t", "scope", "phase")

    def __init__(self, t: Timeouts) -> None:
        self.t = t
        self.scope = trio.CancelScope()
        self.phase = ""

    def arm(self, phase: str, seconds: float) -> None:
        self.phase = phase
        self.scope.deadline = trio.current_time() + seconds

    def expired(self) -> Exception:
        t = self.t
        if self.phase == "request_body":
            return RequestBodyStalled(f"no request body bytes for {t.request_body:g}s")
        if self.phase == "write_up":
            return UpstreamError(f"upstream did not take the request for {t.write:g}s", 504)
        if self.phase == "response_body":
            return ResponseStarted(f"upstream response body stalled for {t.response_body:g}s")
        if self.phase == "write_down":
            return ClientNotReading(f"client did not read the response for {t.write:g}s")
        return UpstreamError(f"upstream did not answer within {t.response_head:g}s", 504)


@dataclass
class Exchange:
    status: int = 0
    bytes_up: int = 0  # request body bytes sent upstream
    bytes_down: int = 0  # response body bytes sent downstream
    upstream_reusable: bool = False
    response_started: bool = False
    switched: ResponseHead | None = None  # the upstream's 101: net/upgrade.py relays on
    held: bool = False  # a `hold` status came back: nothing sent down (net/resilient.py)


def keep_response_headers(resp: ResponseHead, headers: Headers) -> Headers:
    """The `rewrite_response` for legs that pass response headers on unchanged."""
    return headers


def request_has_body(req: RequestHead) -> bool:
    return req.chunked or bool(req.content_length)


def request_bytes(req: RequestHead, target: bytes, headers: Headers) -> bytes:
    """`headers` (hop-by-hop ones removed) plus framing, and the switch an upgrade asks for."""
    extra = framing_headers(req.chunked, req.content_length)
    if req.upgrade is not None:
        extra += [(b"Connection", b"Upgrade"), (b"Upgrade", req.upgrade)]
    return serialize_request(req.method, target, headers + extra)


COALESCE_LIMIT = 64 * 1024


class _NoClock(_Clock):
    """For a body piped without timeouts: arming does nothing."""

    __slots__ = ()

    def arm(self, phase: str, seconds: float) -> None:
        pass


async def pipe_body(
    src: HttpConn,
    dst: trio.abc.Stream,
    chunked_out: bool,
    *,
    src_is_downstream: bool,
    prefix: bytes = b"",
    limit: int | None = None,
    clock: _Clock | None = None,
) -> int:
    """Stream one message body from src to dst; return the payload bytes moved.

    `prefix` (the message head) is sent together with whatever body the source has
    already delivered, so a small message leaves in one write (one TLS record, one
    syscall) instead of one per piece. A broken or closed source is DownstreamGone (the
    client) or UpstreamError; a broken destination likewise (`_send`)."""
    try:
        return await _pipe(
            src,
            dst,
            chunked_out,
            src_is_downstream,
            prefix,
            limit,
            clock or _NoClock(DEFAULT_TIMEOUTS),
        )
    except ProtocolError as exc:
        if src_is_downstream:
            raise DownstreamGone(str(exc)) from None
        raise UpstreamError(str(exc), 502) from None
    except CONNECTION_ERRORS as exc:
        if src_is_downstream:
            raise DownstreamGone(repr(exc)) from None
        raise UpstreamError(f"upstream connection broke: {exc!r}", 502) from None


# per direction (src_is_downstream): the read phase (also the Timeouts field), the write phase
_PHASES = {True: ("request_body", "write_up"), False: ("response_body", "write_down")}


def _not_a_body(src_is_downstream: bool, ev: object) -> Exception:
    """What a body read that brought no body event means: the source closed mid-body."""
    if ev is not None:  # a head in the middle of a body: the parser cannot produce it
        return UpstreamError("unexpected message in the middle of a body", 502)
    if src_is_downstream:
        return DownstreamGone("client closed in the middle of the body")
    return UpstreamError("upstream closed in the middle of the body", 502)


async def _pipe(
    src: HttpConn,
    dst: trio.abc.Stream,
    chunked_out: bool,
    src_is_downstream: bool,
    prefix: bytes,
    limit: int | None,
    clock: _Clock,
) -> int:
    t = clock.t
    read_phase, write_phase = _PHASES[src_is_downstream]
    read_s = getattr(t, read_phase)
    to_downstream = not src_is_downstream
    moved = 0
    pending: list[bytes] = [prefix] if prefix else []
    size = len(prefix)
    while True:
        if pending and (size >= COALESCE_LIMIT or not src.has_buffered_events()):
            clock.arm(write_phase, t.write)
            await _send(dst, b"".join(pending), dst_is_downstream=to_downstream)
            pending, size = [], 0
        if not src.has_buffered_events():
            clock.arm(read_phase, read_s)
        ev = await src.next_event()
        if type(ev) is Data:
            moved += len(ev.data)
            if limit is not None and moved > limit:
                raise BodyTooLarge(f"request body larger than {limit} bytes")
            out = chunk(ev.data) if chunked_out else ev.data
            pending.append(out)
            size += len(out)
            continue
        if type(ev) is not EndOfMessage:
            raise _not_a_body(src_is_downstream, ev)
        if chunked_out:
            pending.append(LAST_CHUNK)
        if pending:
            clock.arm(write_phase, t.write)
            await _send(dst, b"".join(pending), dst_is_downstream=to_downstream)
        return moved


async def _send(dst: trio.abc.Stream, data: bytes, *, dst_is_downstream: bool) -> None:
    try:
        await sockio.send_all(dst, data)
    except CONNECTION_ERRORS as exc:
        if dst_is_downstream:
            raise DownstreamGone(repr(exc)) from None
        raise UpstreamError(f"upstream connection broke: {exc!r}", 502) from None


async def forward(
    down: HttpConn,
    req: RequestHead,
    head: bytes,
    up: HttpConn,
    rewrite_response: Callable[[ResponseHead, Headers], Headers],
    *,
    response_timeout: float = 60.0,
    exchange: Exchange | None = None,
    max_request_body: int | None = None,
    timeouts: Timeouts | None = None,
    hold: frozenset[int] | None = None,
    body: bytes | None = None,
) -> Exchange:
    """Send `head` + the request body to `up`, relay the response to `down`.

    `timeouts` (else the defaults with `response_timeout` for the response head) bound
    every stall; see the module docstring for what each one ends in. A final status in
    `hold` is not relayed: `ex.held` is set and the upstream connection is spent (a retry
    follows, net/resilient.py). `body`: the request body, already read (buffered for a
    retry), sent after `head` instead of streaming it from `down`."""
    ex = exchange or Exchange()
    clock = _Clock(timeouts or Timeouts(response_head=response_timeout))
    with clock.scope:
        return await _exchange(
            down, req, head, up, rewrite_response, ex, max_request_body, clock, hold, body
        )
    raise clock.expired()


async def _exchange(
    down: HttpConn,
    req: RequestHead,
    head: bytes,
    up: HttpConn,
    rewrite_response: Callable[[ResponseHead, Headers], Headers],
    ex: Exchange,
    max_request_body: int | None,
    clock: _Clock,
    hold: frozenset[int] | None = None,
    body: bytes | None = None,
) -> Exchange:
    if body is not None:
        clock.arm("write_up", clock.t.write)
        await _send(up.stream, head + body, dst_is_downstream=False)
        ex.bytes_up = len(body)
    elif request_has_body(req):
        ex.bytes_up = await pipe_body(
            down,
            up.stream,
            req.chunked,
            src_is_downstream=True,
            prefix=head,
            limit=max_request_body,
            clock=clock,
        )
    else:
        clock.arm("write_up", clock.t.write)
        await _send(up.stream, head, dst_is_downstream=False)
    if req.method == b"HEAD":
        up.parser.expect_no_body()
    resp = await _final_head(down, up, req, ex, clock)
    if resp is None:
        return ex  # switched: nothing sent down, net/upgrade.py goes on
    ex.status = resp.status
    if hold and resp.status in hold:
        ex.held = True
        return ex
    if req.method == b"HEAD" or resp.status in (204, 304):
        await _send_bodyless(down, up, req, resp, rewrite_response, ex, clock)
    else:
        chunked_out = resp.chunked or resp.until_close
        headers = rewrite_response(resp, clean_headers(resp.headers))
        headers += framing_headers(chunked_out, resp.content_length)
        if not req.keep_alive:
            headers.append((b"Connection", b"close"))
        ex.response_started = True  # from here on, only closing is left on failure
        try:
            ex.bytes_down = await pipe_body(
                up,
                down.stream,
                chunked_out,
                src_is_downstream=False,
                prefix=serialize_response(resp.status, resp.reason, headers),
                clock=clock,
            )
        except UpstreamError as exc:
            raise ResponseStarted(str(exc)) from None
    ex.upstream_reusable = resp.keep_alive and not resp.until_close
    return ex


async def _final_head(
    down: HttpConn, up: HttpConn, req: RequestHead, ex: Exchange, clock: _Clock
) -> ResponseHead | None:
    """The upstream's final response head; interim 1xx heads on the way are passed on."""
    while True:
        clock.arm("response_head", clock.t.response_head)
        try:
            ev = await up.next_event()
        except ProtocolError as exc:
            raise UpstreamError(str(exc), 502) from None
        except CONNECTION_ERRORS as exc:
            raise UpstreamError(f"upstream connection broke: {exc!r}", 502) from None
        if ev is None:
            raise UpstreamError("upstream closed the connection without responding", 502)
        if not isinstance(ev, ResponseHead):
            raise UpstreamError("upstream sent data before a response head", 502)
        if not 100 <= ev.status < 200:
            return ev
        if await _interim(down, up, req, ev, ex, clock):
            return None  # switched: nothing sent down, net/upgrade.py goes on


async def _send_bodyless(
    down: HttpConn,
    up: HttpConn,
    req: RequestHead,
    resp: ResponseHead,
    rewrite_response: Callable[[ResponseHead, Headers], Headers],
    ex: Exchange,
    clock: _Clock,
) -> None:
    """A response without a body (to HEAD, or 204/304): its head, then its end."""
    headers = rewrite_response(resp, clean_headers(resp.headers))
    cl = resp.header(b"content-length")
    if cl is not None and resp.status != 204:
        headers.append((b"Content-Length", cl))
    if not req.keep_alive:
        headers.append((b"Connection", b"close"))
    clock.arm("write_down", clock.t.write)
    await _send_down(down, serialize_response(resp.status, resp.reason, headers))
    ex.response_started = True
    clock.arm("response_body", clock.t.response_body)
    ev = await up.next_event()
    if not isinstance(ev, EndOfMessage):
        raise ResponseStarted("upstream response framing broken")


async def _interim(
    down: HttpConn, up: HttpConn, req: RequestHead, ev: ResponseHead, ex: Exchange, clock: _Clock
) -> bool:
    """A 1xx: passed on, except 101, which answers only an upgrade request (True: `ex`
    records the switch)."""
    await up.next_event()  # its EndOfMessage
    if ev.status == 101:
        if req.upgrade is None:
            return False  # the parser refuses whatever follows it
        ex.status, ex.switched = 101, ev
        return True
    clock.arm("write_down", clock.t.write)
    await _send_down(down, serialize_response(ev.status, ev.reason, clean_headers(ev.headers)))
    return False


async def _send_down(down: HttpConn, data: bytes) -> None:
    try:
        await down.send(data)
    except CONNECTION_ERRORS as exc:
        raise DownstreamGone(repr(exc)) from None
