"""net/pipeline.py (issue 11): a role's decision carried out, every error answered the way
its status hint says (memory streams and socketpairs, no TLS, trio's MockClock for time)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing

from meshcar.errors import UpstreamError
from meshcar.net.forward import Timeouts, request_bytes
from meshcar.net.httpconn import HttpConn
from meshcar.net.pipeline import Forward, Outcome, carry_out
from meshcar.net.pool import Pool, Pooled
from meshcar.net.respond import Refuse
from meshcar.proto.headers import clean_headers
from meshcar.proto.http1 import RequestHead, ResponseHead
from tests.support.memhttp import read_message

GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
POST = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n"


async def _app(conn: HttpConn, stream: trio.SocketStream) -> None:
    head, _, _ = await read_message(conn)
    if head is not None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    await trio.sleep_forever()  # the connection stays open (and pooled) until the end


App = Callable[[HttpConn, trio.SocketStream], Awaitable[None]]


@pytest.fixture
async def pools(nursery: trio.Nursery) -> AsyncIterator[Callable[[App | None], Pool]]:
    """Pools whose every dial is served by `app` on the far end of a socketpair (None: the
    dial fails with 503); all closed at the end."""
    made: list[Pool] = []
    streams: list[trio.SocketStream] = []

    def make(app: App | None) -> Pool:
        async def dial(key: str) -> Pooled:
            await trio.lowlevel.checkpoint()
            if app is None:
                raise UpstreamError("connection refused", 503)
            a, b = trio.socket.socketpair()
            near, far = trio.SocketStream(a), trio.SocketStream(b)
            streams.extend((near, far))
            nursery.start_soon(app, HttpConn(far, "request"), far)
            return Pooled(HttpConn(near, "response"), key, endpoint=key)

        made.append(Pool(dial))
        return made[-1]

    yield make
    for pool in made:
        await pool.close_all()
    for s in streams:
        await s.aclose()


async def _run(
    request: bytes, decide: Callable[[RequestHead], Refuse | Forward], *, more: bytes = b""
) -> tuple[Outcome, ResponseHead | None, bytes, trio.testing.MemorySendStream | object]:
    client, server = trio.testing.memory_stream_pair()
    down = HttpConn(server, "request")
    await client.send_all(request + more)
    req = await down.next_event()
    assert isinstance(req, RequestHead)
    out = await carry_out(down, req, decide(req), Timeouts(request_body=5.0), "test")
    await server.aclose()
    head, body, _ = await read_message(HttpConn(client, "response"))
    assert head is None or isinstance(head, ResponseHead)
    return out, head, body, client


def _forward(pool: Pool, done: list[int]) -> Callable[[RequestHead], Forward]:
    def decide(req: RequestHead) -> Forward:
        head = request_bytes(req, req.target, clean_headers(req.headers))
        return Forward(head, pool, "app", "app at here", on_done=lambda: done.append(1))

    return decide


async def test_a_refusal_is_answered_and_keeps_a_bodiless_connection() -> None:
    out, head, body, _ = await _run(GET, lambda req: Refuse(403, "not you"))
    assert (out.status, out.keep, out.error) == (403, True, None)
    assert head is not None and head.status == 403
    assert json.loads(body) == {"error": 403, "message": "not you"}


async def test_a_forward_relays_the_response(pools: Callable[[App | None], Pool]) -> None:
    done: list[int] = []
    out, head, body, _ = await _run(GET, _forward(pools(_app), done))
    assert (out.status, out.bytes_out, out.keep) == (200, 2, True)
    assert head is not None and head.status == 200 and body == b"hi" and done == [1]


async def test_an_upstream_error_is_answered_with_its_hint_and_upstream(
    pools: Callable[[App | None], Pool],
) -> None:
    done: list[int] = []
    out, head, body, _ = await _run(GET, _forward(pools(None), done))
    assert out.status == 503 and out.keep and isinstance(out.error, UpstreamError)
    assert head is not None and head.status == 503
    assert json.loads(body)["message"] == "app at here: connection refused"
    assert done == [1]


async def test_a_stalled_request_body_is_408_and_closes(
    pools: Callable[[App | None], Pool], autojump_clock: trio.testing.MockClock
) -> None:
    async def app(conn: HttpConn, stream: trio.SocketStream) -> None:
        await trio.sleep_forever()  # never answers: the body stalls first

    done: list[int] = []
    out, head, body, _ = await _run(POST, _forward(pools(app), done), more=b"bo")
    assert (out.status, out.keep) == (408, False)
    assert head is not None and head.status == 408 and not head.keep_alive
    assert "no request body bytes" in json.loads(body)["message"] and done == [1]


async def test_a_client_gone_mid_body_gets_no_answer(pools: Callable[[App | None], Pool]) -> None:
    async def app(conn: HttpConn, stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    client, server = trio.testing.memory_stream_pair()
    down = HttpConn(server, "request")
    await client.send_all(POST + b"bo")
    req = await down.next_event()
    assert isinstance(req, RequestHead)
    await client.aclose()  # the client leaves with half its body sent
    done: list[int] = []
    decision = _forward(pools(app), done)(req)
    out = await carry_out(down, req, decision, Timeouts(), "test")
    assert (out.status, out.keep, out.error is not None) == (499, False, True)
    assert out.error is not None and out.error.reason == "client_gone" and done == [1]
