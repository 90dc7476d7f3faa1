"""proxy_request (net/proxying.py): a pooled keep-alive connection the upstream closed
while idle shows as an upstream error before any response byte; a request without a body
is then retried on another connection, a request with a body never is (it was streamed and
cannot be replayed), nor is one whose first attempt was on a fresh connection or whose
response had started. Upstreams are socket pairs (pool hygiene polls them), the client a
memory stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing

from meshcar.errors import UpstreamError
from meshcar.net.forward import ResponseStarted, keep_response_headers, request_bytes
from meshcar.net.httpconn import HttpConn
from meshcar.net.pool import Pool, Pooled
from meshcar.net.proxying import proxy_request
from meshcar.proto.headers import clean_headers
from meshcar.proto.http1 import RequestHead
from tests.support.memhttp import read_message

Script = Callable[[HttpConn, trio.SocketStream], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"


def serve_ok(name: bytes, times: int = 100) -> Script:
    async def script(conn: HttpConn, stream: trio.SocketStream) -> None:
        for _ in range(times):
            head, _, _ = await read_message(conn)
            if head is None:
                return
            await stream.send_all(OK % (len(name), name))

    return script


def serve_then_drop(name: bytes, served: int) -> Script:
    """Answer `served` requests, then read the next one and close without answering (an
    upstream that timed the keep-alive connection out just as the request arrived)."""

    async def script(conn: HttpConn, stream: trio.SocketStream) -> None:
        await serve_ok(name, served)(conn, stream)
        await read_message(conn)
        await stream.aclose()

    return script


class Upstream:
    """A dialer whose connection i is served by scripts[i] on the far end of a socketpair."""

    def __init__(self, nursery: trio.Nursery, scripts: list[Script]) -> None:
        self.nursery = nursery
        self.scripts = scripts
        self.dials = 0
        self.streams: list[trio.SocketStream] = []
        self.pool = Pool(self.dial)

    async def dial(self, key: str) -> Pooled:
        await trio.lowlevel.checkpoint()
        a, b = trio.socket.socketpair()
        near, far = trio.SocketStream(a), trio.SocketStream(b)
        self.streams += [near, far]
        self.nursery.start_soon(self.scripts[self.dials], HttpConn(far, "request"), far)
        self.dials += 1
        return Pooled(HttpConn(near, "response"), key, endpoint=key)


@pytest.fixture
async def upstream_factory(
    nursery: trio.Nursery,
) -> AsyncIterator[Callable[[list[Script]], Upstream]]:
    made: list[Upstream] = []

    def make(scripts: list[Script]) -> Upstream:
        made.append(Upstream(nursery, scripts))
        return made[-1]

    yield make
    for up in made:
        await up.pool.close_all()
        for s in up.streams:
            await s.aclose()


async def through(up: Upstream, request: bytes) -> tuple[object, bytes]:
    """One request from a fresh client through proxy_request: what it returned or raised,
    and the response body the client got (b"" if none)."""
    client, server = trio.testing.memory_stream_pair()
    down = HttpConn(server, "request")
    await client.send_all(request)
    req = await down.next_event()
    assert isinstance(req, RequestHead)
    head = request_bytes(req, req.target, clean_headers(req.headers))
    try:
        result: object = await proxy_request(down, req, head, up.pool, "k", keep_response_headers)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc, b""
    _, body, _ = await read_message(HttpConn(client, "response"))
    return result, body


GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
POST = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody"


async def test_keep_alive_connection_is_reused(upstream_factory) -> None:  # noqa: ANN001
    up = upstream_factory([serve_ok(b"one")])
    for _ in range(3):
        _, body = await through(up, GET)
        assert body == b"one"
    assert up.dials == 1


async def test_stale_reused_connection_is_retried_for_a_bodiless_request(upstream_factory) -> None:  # noqa: ANN001
    up = upstream_factory([serve_then_drop(b"one", served=1), serve_ok(b"two")])
    assert (await through(up, GET))[1] == b"one"
    ex, body = await through(up, GET)  # conn 1 drops it; retried on a new connection
    assert body == b"two" and up.dials == 2
    assert getattr(ex, "status", None) == 200


async def test_request_with_a_body_is_never_retried(upstream_factory) -> None:  # noqa: ANN001
    up = upstream_factory([serve_then_drop(b"one", served=1), serve_ok(b"two")])
    assert (await through(up, GET))[1] == b"one"
    exc, body = await through(up, POST)
    assert isinstance(exc, UpstreamError) and exc.status == 502 and body == b""
    assert up.dials == 1  # the body went upstream once and is gone: no replay
    assert up.pool.idle_count() == 0 and up.pool.open_count("k") == 0


@pytest.mark.parametrize("method", [b"POST", b"PATCH"])
async def test_a_bodiless_non_idempotent_request_is_never_retried(
    upstream_factory, method: bytes
) -> None:  # noqa: ANN001
    """RFC 9110 9.2.2: only idempotent requests are retried automatically; the upstream may
    have acted on a POST before its connection broke (it was retried before)."""
    up = upstream_factory([serve_then_drop(b"one", served=1), serve_ok(b"two")])
    assert (await through(up, GET))[1] == b"one"
    exc, body = await through(up, method + b" / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(exc, UpstreamError) and exc.status == 502 and body == b""
    assert up.dials == 1


async def test_fresh_connection_failure_is_not_retried(upstream_factory) -> None:  # noqa: ANN001
    up = upstream_factory([serve_then_drop(b"x", served=0), serve_ok(b"two")])
    exc, _ = await through(up, GET)
    assert isinstance(exc, UpstreamError) and exc.status == 502 and up.dials == 1


async def test_retry_that_fails_on_the_fresh_connection_is_502(upstream_factory) -> None:  # noqa: ANN001
    up = upstream_factory(
        [serve_then_drop(b"one", served=1), serve_then_drop(b"x", served=0), serve_ok(b"three")]
    )
    await through(up, GET)
    exc, _ = await through(up, GET)
    assert isinstance(exc, UpstreamError) and exc.status == 502 and up.dials == 2


async def test_no_retry_once_the_response_started(upstream_factory) -> None:  # noqa: ANN001
    async def head_then_drop(conn: HttpConn, stream: trio.SocketStream) -> None:
        await serve_ok(b"one", 1)(conn, stream)
        await read_message(conn)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart")
        await stream.aclose()

    up = upstream_factory([head_then_drop, serve_ok(b"two")])
    await through(up, GET)
    exc, _ = await through(up, GET)
    assert isinstance(exc, ResponseStarted) and up.dials == 1


async def test_stale_idle_connection_closed_by_the_peer_is_skipped(upstream_factory) -> None:  # noqa: ANN001
    """An upstream that closed while the connection sat idle is noticed before use (EOF
    polled by the pool): no request is sent on it at all."""
    up = upstream_factory([serve_ok(b"one", times=1), serve_ok(b"two")])
    assert (await through(up, GET))[1] == b"one"
    await trio.testing.wait_all_tasks_blocked()  # script 1 returned; close its end:
    await up.streams[1].aclose()
    assert (await through(up, POST))[1] == b"two"  # even a request with a body gets through
    assert up.dials == 2


async def test_a_stale_request_is_sent_at_most_twice(upstream_factory) -> None:  # noqa: ANN001
    attempts: list[int] = []

    def counting(i: int) -> Script:
        async def script(conn: HttpConn, stream: trio.SocketStream) -> None:
            await serve_ok(b"one", 1)(conn, stream)
            await read_message(conn)
            attempts.append(i)
            await stream.aclose()

        return script

    up = upstream_factory([counting(0), counting(1), counting(2), serve_ok(b"fresh")])
    idle = [(await up.pool.acquire("k"))[0] for _ in range(3)]  # three connections...
    for p in idle:  # ...each answers one request, then goes idle
        await p.conn.send(GET)
        _, body, _ = await read_message(p.conn)
        assert body == b"one"
        await up.pool.release(p, True)
    _, body = await through(up, GET)
    assert body == b"fresh"
    assert attempts == [2]  # was [2, 1, 0]: resent on every stale idle connection first
