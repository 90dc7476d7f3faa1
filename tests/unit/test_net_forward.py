"""forward (net/forward.py) between two memory-stream legs: client -> downstream HttpConn,
upstream HttpConn -> a scripted origin. Bodies are re-framed (Content-Length kept,
chunked re-chunked, close-delimited sent chunked), 1xx answers passed on, HEAD/204/304
carry no body, and each failure ends in the error the callers map to a status (502/504
before the response head, ResponseStarted / DownstreamGone after). Timeouts run on trio's
mock clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from meshcar.errors import UpstreamError
from meshcar.net.forward import (
    BodyTooLarge,
    DownstreamGone,
    Exchange,
    ResponseStarted,
    Timeouts,
    forward,
    keep_response_headers,
    request_bytes,
)
from meshcar.net.httpconn import HttpConn
from meshcar.proto.headers import clean_headers
from meshcar.proto.http1 import RequestHead, ResponseHead
from tests.support.memhttp import read_all, read_message, trickle

Origin = Callable[[HttpConn, trio.abc.Stream], Awaitable[None]]


class Leg:
    """client <-> down (the proxy's server side) ... up (the proxy's client side) <-> origin."""

    def __init__(self) -> None:
        self.client, down = trio.testing.memory_stream_pair()
        up, self.origin = trio.testing.memory_stream_pair()
        self.down = HttpConn(down, "request")
        self.up = HttpConn(up, "response")
        self.client_conn = HttpConn(self.client, "response")
        self.origin_conn = HttpConn(self.origin, "request")


async def run(
    leg: Leg,
    request: bytes,
    origin: Origin,
    *,
    timeouts: Timeouts | None = None,
    max_request_body: int | None = None,
) -> tuple[Exchange | BaseException, Exchange]:
    """Send `request`, forward it, let `origin` answer; the result of forward (or what it
    raised) and the Exchange it filled in."""
    await leg.client.send_all(request)
    req = await leg.down.next_event()
    assert isinstance(req, RequestHead)
    head = request_bytes(req, req.target, clean_headers(req.headers))
    ex = Exchange()
    result: list[Exchange | BaseException] = []

    async def proxy() -> None:
        try:
            result.append(
                await forward(
                    leg.down,
                    req,
                    head,
                    leg.up,
                    keep_response_headers,
                    exchange=ex,
                    timeouts=timeouts,
                    max_request_body=max_request_body,
                )
            )
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            result.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(origin, leg.origin_conn, leg.origin)
        await proxy()
        nursery.cancel_scope.cancel()  # the origin script may still wait for more
    return result[0], ex


def answer(response: bytes, *, pieces: list[bytes] | None = None) -> Origin:
    async def origin(conn: HttpConn, stream: trio.abc.Stream) -> None:
        head, body, _ = await read_message(conn)
        origin.got = (head, body)  # type: ignore[attr-defined]
        await trickle(stream, pieces or [response])
        await trio.sleep_forever()

    return origin


GET = b"GET /g HTTP/1.1\r\nHost: a.test\r\n\r\n"


async def test_content_length_bodies_keep_their_length() -> None:
    leg = Leg()
    origin = answer(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-O: 1\r\n\r\nok")
    res, ex = await run(
        leg, b"PUT /p HTTP/1.1\r\nHost: a.test\r\nContent-Length: 11\r\n\r\nhello world", origin
    )
    assert res is ex and (ex.status, ex.bytes_up, ex.bytes_down) == (201, 11, 2)
    assert ex.upstream_reusable and ex.response_started
    req, body = origin.got  # type: ignore[attr-defined]
    assert (req.content_length, req.chunked, body) == (11, False, b"hello world")
    head, body, _ = await read_message(leg.client_conn)
    assert isinstance(head, ResponseHead) and head.status == 201 and body == b"ok"
    assert head.content_length == 2 and not head.chunked and head.header(b"x-o") == b"1"
    assert leg.up.parser.between_messages()


async def test_chunked_bodies_are_rechunked() -> None:
    leg = Leg()
    origin = answer(
        b"",
        pieces=[
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"3\r\nabc\r\n",
            b"4\r\ndefg\r\n0\r\n\r\n",
        ],
    )
    res, ex = await run(
        leg,
        b"POST /c HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nxy\r\n1;ext=1\r\nz\r\n0\r\nTrailer: t\r\n\r\n",
        origin,
    )
    assert res is ex and (ex.bytes_up, ex.bytes_down) == (3, 7) and ex.upstream_reusable
    req, body = origin.got  # type: ignore[attr-defined]
    assert req.chunked and req.content_length is None and body == b"xyz"
    head, body, _ = await read_message(leg.client_conn)
    assert head is not None and head.chunked and head.header(b"content-length") is None
    assert body == b"abcdefg"


async def test_close_delimited_response_goes_down_chunked_and_is_not_reused() -> None:
    leg = Leg()

    async def origin(conn: HttpConn, stream: trio.abc.Stream) -> None:
        await read_message(conn)
        await trickle(stream, [b"HTTP/1.1 200 OK\r\n\r\n", b"until ", b"close"])
        await stream.send_eof()

    res, ex = await run(leg, GET, origin)
    assert res is ex and ex.bytes_down == len(b"until close") and not ex.upstream_reusable
    head, body, _ = await read_message(leg.client_conn)
    assert head is not None and head.chunked and body == b"until close"
    assert head.keep_alive  # the client's connection lives on


async def test_interim_responses_are_passed_on() -> None:
    leg = Leg()
    origin = answer(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone"
    )
    res, ex = await run(leg, b"POST /e HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx", origin)
    assert res is ex and ex.status == 200
    head, body, events = await read_message(leg.client_conn)
    statuses = [e.status for e in events if isinstance(e, ResponseHead)]
    assert statuses == [100, 103, 200] and body == b"done"
    early = [e for e in events if isinstance(e, ResponseHead) and e.status == 103][0]
    assert early.header(b"link") == b"</s.css>; rel=preload"


async def test_head_response_has_no_body_but_keeps_its_length() -> None:
    leg = Leg()
    origin = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    res, ex = await run(leg, b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n", origin)
    assert res is ex and ex.bytes_down == 0 and ex.upstream_reusable
    leg.client_conn.parser.expect_no_body()
    head, body, _ = await read_message(leg.client_conn)
    assert head is not None and head.header(b"content-length") == b"5" and body == b""
    assert leg.up.parser.between_messages() and not leg.up.parser.leftover


@pytest.mark.parametrize("status,cl_down", [(204, None), (304, b"7")])
async def test_204_and_304_have_no_body(status: int, cl_down: bytes | None) -> None:
    leg = Leg()
    origin = answer(b'HTTP/1.1 %d X\r\nContent-Length: 7\r\nETag: "e"\r\n\r\n' % status)
    res, ex = await run(leg, GET, origin)
    assert res is ex and ex.status == status and ex.bytes_down == 0 and ex.upstream_reusable
    head, body, _ = await read_message(leg.client_conn)
    assert head is not None and head.status == status and body == b""
    assert head.header(b"content-length") == cl_down and head.header(b"etag") == b'"e"'


async def test_connection_close_from_the_client_is_passed_down() -> None:
    leg = Leg()
    origin = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    res, ex = await run(leg, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", origin)
    head, _, _ = await read_message(leg.client_conn)
    assert head is not None and head.header(b"connection") == b"close"
    req, _ = origin.got  # type: ignore[attr-defined]
    assert req.header(b"connection") is None  # hop-by-hop: not sent upstream


async def test_upstream_closes_before_the_head_is_502() -> None:
    leg = Leg()

    async def origin(conn: HttpConn, stream: trio.abc.Stream) -> None:
        await read_message(conn)
        await stream.aclose()

    res, ex = await run(leg, GET, origin)
    assert isinstance(res, UpstreamError) and res.status == 502
    assert "without responding" in str(res) and not ex.response_started
    await leg.down.stream.aclose()
    assert await read_all(leg.client) == b""  # nothing was sent down: the caller answers 502


@pytest.mark.parametrize(
    "response",
    [
        b"NOT HTTP\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Le",  # then EOF mid-head
    ],
    ids=["garbage", "double-cl", "eof-mid-head"],
)
async def test_broken_response_head_is_502(response: bytes) -> None:
    leg = Leg()

    async def origin(conn: HttpConn, stream: trio.abc.Stream) -> None:
        await read_message(conn)
        await stream.send_all(response)
        await stream.send_eof()

    res, ex = await run(leg, GET, origin)
    assert isinstance(res, UpstreamError) and res.status == 502 and not ex.response_started


async def test_slow_upstream_is_504_on_the_mock_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    leg = Leg()

    async def origin(conn: HttpConn, stream: trio.abc.Stream) -> None:
        await read_message(conn)
        await trio.sleep(10)  # virtual: longer than the response head timeout
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    t0 = trio.current_time()
    res, ex = await run(leg, GET, origin, timeouts=Timeouts(response_head=4))
    assert isinstance(res, UpstreamError) and res.status == 504, res
    assert "within 4s" in str(res) and not ex.response_started
    assert trio.current_time() - t0 == pytest.approx(4)


async def test_upstream_within_its_timeout_is_fine(autojump_clock: trio.testing.MockClock) -> None:
    leg = Leg()

    async def origin(conn: HttpConn, stream: trio.abc.Stream) -> None:
        await read_message(conn)
        await trio.sleep(3.9)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    res, ex = await run(leg, GET, origin, timeouts=Timeouts(response_head=4))
    assert res is ex and ex.status == 200


async def test_upstream_closes_mid_body_is_response_started() -> None:
    leg = Leg()

    async def origin(conn: HttpConn, stream: trio.abc.Stream) -> None:
        await read_message(conn)
        await trickle(stream, [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"0123456789"])
        await stream.aclose()

    res, ex = await run(leg, GET, origin)
    assert isinstance(res, ResponseStarted) and ex.response_started and ex.status == 200
    assert "closed in the middle" in str(res)
    head = await leg.client_conn.next_event()
    assert isinstance(head, ResponseHead) and head.content_length == 100


async def test_downstream_gone_mid_body() -> None:
    leg = Leg()
    client_read = trio.Event()

    async def origin(conn: HttpConn, stream: trio.abc.Stream) -> None:
        await read_message(conn)
        await trickle(stream, [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"])
        await client_read.wait()
        await stream.send_all(b"more")

    async def client_goes() -> None:
        ev = await leg.client_conn.next_event()
        assert isinstance(ev, ResponseHead)
        await leg.client.aclose()
        client_read.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_goes)
        res, ex = await run(leg, GET, origin)
    assert isinstance(res, DownstreamGone) and ex.response_started
    assert ex.bytes_down == 0  # counted only once the body is through


async def test_client_closes_mid_request_body() -> None:
    leg = Leg()
    await leg.client.send_all(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabcd")
    await leg.client.send_eof()
    req = await leg.down.next_event()
    assert isinstance(req, RequestHead)
    with pytest.raises(DownstreamGone):
        await forward(
            leg.down,
            req,
            request_bytes(req, req.target, clean_headers(req.headers)),
            leg.up,
            keep_response_headers,
        )
    got = await leg.origin.receive_some(1000)
    assert got.startswith(b"POST /p HTTP/1.1") and got.endswith(b"abcd")  # streamed, not buffered


async def test_request_body_over_the_limit() -> None:
    leg = Leg()
    res, ex = await run(
        leg,
        b"POST /big HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n",
        answer(b""),
        max_request_body=10,
    )
    assert isinstance(res, BodyTooLarge) and not ex.response_started
