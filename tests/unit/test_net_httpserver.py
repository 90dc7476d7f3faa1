"""serve_http (net/httpserver.py) over memory streams, with trio's mock clock for the
timeouts: keep-alive, the head timeout (408 once bytes came, silent close before), the
idle timeout, malformed heads (400/431/501 + close), and a handler that ends the
connection."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from meshcar.net.drain import Drain
from meshcar.net.forward import Timeouts
from meshcar.net.httpconn import HttpConn
from meshcar.net.httpserver import REFUSE_HEAD_SECONDS, refuse_http, serve_http
from meshcar.proto.headers import simple_response
from meshcar.proto.http1 import Data, RequestHead, ResponseHead
from tests.support.memhttp import read_all, read_message

GET = b"GET /%d HTTP/1.1\r\nHost: a.test\r\n\r\n"


class Server:
    """serve_http on one end of a memory stream pair; the test holds the other end."""

    def __init__(self, nursery: trio.Nursery, *, keep: bool = True, **kw: object) -> None:
        self.client, server = trio.testing.memory_stream_pair()
        self.resp = HttpConn(self.client, "response")
        self.seen: list[RequestHead] = []
        self.keep = keep
        self.done = trio.Event()
        self.closed = False
        orig = server.aclose

        async def aclose() -> None:
            self.closed = True
            await orig()

        server.aclose = aclose  # type: ignore[method-assign]
        nursery.start_soon(self._run, HttpConn(server, "request"), kw)

    async def _run(self, conn: HttpConn, kw: dict) -> None:
        await serve_http(conn, self.handle, **kw)
        self.done.set()

    async def handle(self, req: RequestHead, conn: HttpConn) -> bool:
        self.seen.append(req)
        body = b""
        while isinstance(ev := await conn.next_event(), Data):
            body += ev.data
        await conn.send(simple_response(200, b"got " + req.target + b" " + body))
        return self.keep


async def test_keep_alive_serves_requests_on_one_connection(nursery: trio.Nursery) -> None:
    s = Server(nursery)
    for i in range(3):
        await s.client.send_all(GET % i)
        head, body, _ = await read_message(s.resp)
        assert head is not None and head.status == 200 and head.keep_alive
        assert body == b"got /%d " % i
    await s.client.send_all(
        b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc" + GET % 9
    )
    assert (await read_message(s.resp))[1] == b"got /p abc"
    assert (await read_message(s.resp))[1] == b"got /9 "  # pipelined
    assert not s.closed
    await s.client.send_eof()  # the client closes between requests: a quiet end
    await s.done.wait()
    assert s.closed and len(s.seen) == 5
    assert await read_all(s.client) == b""


async def test_connection_close_request_ends_it(nursery: trio.Nursery) -> None:
    s = Server(nursery)
    await s.client.send_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head, body, _ = await read_message(s.resp)
    assert head is not None and body == b"got /x "
    await s.done.wait()
    assert len(s.seen) == 1 and s.closed


# A parse error in a read does not cost the requests completed before it in that read:
# they are served first, then the error is answered (it failed before: 400 for the lot).
async def test_request_with_close_then_pipelined_bytes_is_served(nursery: trio.Nursery) -> None:
    """RFC 9112 9.6: answer the request that carried `close`, ignore what follows (llhttp
    raises "Data after `Connection: close`" for the whole read)."""
    s = Server(nursery)
    await s.client.send_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + GET % 2)
    head, body, _ = await read_message(s.resp)
    assert head is not None and body == b"got /x "
    await s.done.wait()
    assert len(s.seen) == 1 and s.closed


async def test_good_request_then_garbage_in_one_read(nursery: trio.Nursery) -> None:
    s = Server(nursery)
    await s.client.send_all(GET % 1 + b"NOT HTTP\r\n\r\n")
    assert (await read_message(s.resp))[1] == b"got /1 "
    head, body, _ = await read_message(s.resp)  # then the garbage is answered, and closed
    assert head is not None and head.status == 400
    await s.done.wait()
    assert s.closed and len(s.seen) == 1


async def test_handler_false_closes_after_its_response(nursery: trio.Nursery) -> None:
    s = Server(nursery, keep=False)
    await s.client.send_all(GET % 1 + GET % 2)
    head, body, _ = await read_message(s.resp)
    assert body == b"got /1 "
    await s.done.wait()
    assert s.closed and len(s.seen) == 1
    assert await read_all(s.client) == b""


async def test_http10_without_keep_alive_closes(nursery: trio.Nursery) -> None:
    s = Server(nursery)
    await s.client.send_all(b"GET /old HTTP/1.0\r\n\r\n")
    assert (await read_message(s.resp))[1] == b"got /old "
    await s.done.wait()
    assert s.closed


async def error_of(s: Server) -> tuple[int, dict, bytes]:
    head, body, _ = await read_message(s.resp)
    assert head is not None and head.header(b"connection") == b"close"
    assert head.header(b"content-type") == b"application/json"
    await s.done.wait()
    assert s.closed
    return head.status, json.loads(body), await read_all(s.client)


@pytest.mark.parametrize(
    "data,status",
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 17000 + b"\r\n\r\n", 431),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501),
    ],
    ids=["garbage", "no-host", "cl-and-te", "huge-header", "connect"],
)
async def test_malformed_request_gets_an_error_and_close(
    nursery: trio.Nursery, data: bytes, status: int
) -> None:
    s = Server(nursery)
    await s.client.send_all(data)
    got, body, rest = await error_of(s)
    assert (got, body["error"]) == (status, status) and body["message"]
    assert s.seen == [] and rest == b""


async def test_malformed_second_request_after_a_good_one(nursery: trio.Nursery) -> None:
    s = Server(nursery)
    await s.client.send_all(GET % 1)
    assert (await read_message(s.resp))[1] == b"got /1 "
    await s.client.send_all(b"NOT HTTP\r\n\r\n")
    status, _, _ = await error_of(s)
    assert status == 400 and len(s.seen) == 1


async def test_head_timeout_with_a_partial_head_is_408(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    s = Server(nursery, head_timeout=7.0, idle_timeout=100.0)
    t0 = trio.current_time()
    await s.client.send_all(b"GET / HTTP/1.1\r\nHo")
    status, body, _ = await error_of(s)
    assert status == 408 and "request head" in body["message"]
    assert trio.current_time() - t0 == pytest.approx(7.0)
    assert s.seen == []


async def test_head_timeout_without_a_byte_closes_silently(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    s = Server(nursery, timeouts=Timeouts(request_head=3.0, idle=50.0))  # `timeouts` wins
    t0 = trio.current_time()
    await s.done.wait()
    assert trio.current_time() - t0 == pytest.approx(3.0)
    assert s.closed and await read_all(s.client) == b""  # a port scan or preconnect: no answer


async def test_idle_timeout_between_requests(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    s = Server(nursery, head_timeout=1.0, idle_timeout=20.0)
    await s.client.send_all(GET % 1)
    assert (await read_message(s.resp))[1] == b"got /1 "
    t0 = trio.current_time()
    await trio.sleep(19.0)  # virtual time: still inside the idle timeout
    await s.client.send_all(GET % 2)
    assert (await read_message(s.resp))[1] == b"got /2 "
    # The idle timeout closes silently: no unsolicited 408 a pooling client could take for
    # the answer to its next request (it was sent before).
    await s.done.wait()
    assert s.closed and await read_all(s.client) == b""
    assert trio.current_time() - t0 == pytest.approx(19.0 + 20.0)
    assert len(s.seen) == 2


async def test_a_second_head_begun_then_stalled_is_408(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    s = Server(nursery, head_timeout=1.0, idle_timeout=20.0)
    await s.client.send_all(GET % 1)
    assert (await read_message(s.resp))[1] == b"got /1 "
    await s.client.send_all(b"GET /2 HTTP/1.1\r\nHo")
    status, _, _ = await error_of(s)
    assert status == 408 and len(s.seen) == 1


async def test_drain_closes_after_the_request_in_flight(nursery: trio.Nursery) -> None:
    drain = Drain()
    s = Server(nursery, drain=drain)
    await s.client.send_all(GET % 1)
    assert (await read_message(s.resp))[1] == b"got /1 "
    drain.draining = True
    await s.client.send_all(GET % 2)
    assert (await read_message(s.resp))[1] == b"got /2 "
    await s.done.wait()
    assert s.closed and drain.in_flight == 0


async def test_refused_idle_connection_is_closed_after_a_short_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Over a listener's limit, a connection that sends nothing holds its task only
    REFUSE_HEAD_SECONDS, not the full head timeout (30 s here)."""
    client, server = trio.testing.memory_stream_pair()
    t0 = trio.current_time()
    await refuse_http(server, "full", Timeouts(request_head=30.0))
    assert trio.current_time() - t0 == pytest.approx(REFUSE_HEAD_SECONDS)
    assert await read_all(client) == b""


async def test_refused_connection_that_asks_gets_503(nursery: trio.Nursery) -> None:
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(refuse_http, server, "listener full")
    await client.send_all(GET % 1)
    head, body, _ = await read_message(HttpConn(client, "response"))
    assert isinstance(head, ResponseHead) and head.status == 503 and b"listener full" in body
