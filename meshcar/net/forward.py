"""Forward one HTTP/1.1 exchange between a downstream and an upstream connection.

Theory of operation: the request head (already rewritten by the caller) goes upstream,
then the request body is streamed event by event, re-framed (Content-Length kept, chunked
re-chunked). The response head comes back, interim 1xx answers are passed on, the final
head is rewritten by the caller's callback and sent down, and the body is streamed the
same way. Nothing is buffered beyond one read, so a body of any size passes in bounded
memory. Failures before the response head reach the client become 502/503/504 (by the
caller); after that the only honest signal left is closing the connection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from meshcar.errors import ProtocolError, UpstreamError
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


class DownstreamGone(Exception):
    """The client went away or sent a broken body: close everything, answer nobody."""


class BodyTooLarge(Exception):
    """A streamed request body passed the route's limit: answer 413 and close."""


class ResponseStarted(Exception):
    """The upstream failed after the response head was sent: only closing is left."""


@dataclass
class Exchange:
    status: int = 0
    bytes_up: int = 0  # request body bytes sent upstream
    bytes_down: int = 0  # response body bytes sent downstream
    upstream_reusable: bool = False
    response_started: bool = False


def keep_response_headers(resp: ResponseHead, headers: Headers) -> Headers:
    """The `rewrite_response` for legs that pass response headers on unchanged."""
    return headers


def request_has_body(req: RequestHead) -> bool:
    return req.chunked or bool(req.content_length)


def request_bytes(req: RequestHead, target: bytes, headers: Headers) -> bytes:
    return serialize_request(req.method, target, headers + framing_headers(req.chunked, req.content_length))


COALESCE_LIMIT = 64 * 1024


async def pipe_body(src: HttpConn, dst: trio.abc.Stream, chunked_out: bool, *, src_is_downstream: bool,
                    prefix: bytes = b"", limit: int | None = None) -> int:
    """Stream one message body from src to dst; return the payload bytes moved.

    `prefix` (the message head) is sent together with whatever body the source has
    already delivered, so a small message leaves in one write (one TLS record, one
    syscall) instead of one per piece.
    """
    moved = 0
    pending: list[bytes] = [prefix] if prefix else []
    size = len(prefix)
    while True:
        if pending and (size >= COALESCE_LIMIT or not src.has_buffered_events()):
            await _send(dst, b"".join(pending), dst_is_downstream=not src_is_downstream)
            pending, size = [], 0
        try:
            ev = await src.next_event()
        except ProtocolError as exc:
            if src_is_downstream:
                raise DownstreamGone(str(exc)) from None
            raise UpstreamError(str(exc), 502) from None
        except CONNECTION_ERRORS as exc:
            if src_is_downstream:
                raise DownstreamGone(repr(exc)) from None
            raise UpstreamError(f"upstream connection broke: {exc!r}", 502) from None
        if ev is None:
            if src_is_downstream:
                raise DownstreamGone("client closed in the middle of the body")
            raise UpstreamError("upstream closed in the middle of the body", 502)
        if isinstance(ev, Data):
            moved += len(ev.data)
            if limit is not None and moved > limit:
                raise BodyTooLarge(f"request body larger than {limit} bytes")
            out = chunk(ev.data) if chunked_out else ev.data
            pending.append(out)
            size += len(out)
        elif isinstance(ev, EndOfMessage):
            if chunked_out:
                pending.append(LAST_CHUNK)
            if pending:
                await _send(dst, b"".join(pending), dst_is_downstream=not src_is_downstream)
            return moved
        else:
            raise UpstreamError("unexpected message in the middle of a body", 502)


async def _send(dst: trio.abc.Stream, data: bytes, *, dst_is_downstream: bool) -> None:
    try:
        await dst.send_all(data)
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
) -> Exchange:
    """Send `head` + the request body to `up`, relay the response to `down`."""
    ex = exchange or Exchange()
    if request_has_body(req):
        ex.bytes_up = await pipe_body(down, up.stream, req.chunked, src_is_downstream=True, prefix=head,
                                      limit=max_request_body)
    else:
        await _send(up.stream, head, dst_is_downstream=False)
    if req.method == b"HEAD":
        up.parser.expect_no_body()
    try:
        with trio.fail_after(response_timeout):
            while True:
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
                if 100 <= ev.status < 200:
                    await up.next_event()  # its EndOfMessage
                    if ev.status != 101:
                        await _send_down(down, serialize_response(ev.status, ev.reason, clean_headers(ev.headers)))
                    continue
                resp = ev
                break
    except trio.TooSlowError:
        raise UpstreamError(f"upstream did not answer within {response_timeout:g}s", 504) from None

    no_body = req.method == b"HEAD" or resp.status in (204, 304)
    headers = rewrite_response(resp, clean_headers(resp.headers))
    if no_body:
        cl = resp.header(b"content-length")
        if cl is not None and resp.status != 204:
            headers.append((b"Content-Length", cl))
        chunked_out = False
    else:
        chunked_out = resp.chunked or resp.until_close
        headers += framing_headers(chunked_out, resp.content_length)
    if not req.keep_alive:
        headers.append((b"Connection", b"close"))
    ex.status = resp.status
    resp_head = serialize_response(resp.status, resp.reason, headers)
    if not no_body:
        ex.response_started = True  # from here on, only closing is left on failure
        try:
            ex.bytes_down = await pipe_body(up, down.stream, chunked_out, src_is_downstream=False,
                                            prefix=resp_head)
        except UpstreamError as exc:
            raise ResponseStarted(str(exc)) from None
    else:
        await _send_down(down, resp_head)
        ex.response_started = True
        ev = await up.next_event()
        if not isinstance(ev, EndOfMessage):
            raise ResponseStarted("upstream response framing broken")
    ex.upstream_reusable = resp.keep_alive and not resp.until_close
    return ex


async def _send_down(down: HttpConn, data: bytes) -> None:
    try:
        await down.send(data)
    except CONNECTION_ERRORS as exc:
        raise DownstreamGone(repr(exc)) from None
