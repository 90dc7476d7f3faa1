"""HttpConn (net/httpconn.py) over memory streams: events come out the same however the
bytes are split across reads, EOF between messages is a clean None, EOF inside a message
is a ProtocolError with the side's status hint (400 for requests, 502 for responses)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from meshcar.errors import ProtocolError
from meshcar.net.httpconn import HttpConn
from meshcar.proto.http1 import Data, EndOfMessage, RequestHead, ResponseHead
from tests.support.memhttp import read_message, split_every, trickle

POST = (
    b"POST /upload?x=1 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 11\r\n"
    b"X-Trace: t1\r\n\r\nhello world"
)
CHUNKED = (
    b"POST /c HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
)
GET = b"GET /next HTTP/1.1\r\nHost: a.test\r\n\r\n"


async def events_of(data: bytes, step: int | None, kind: str = "request") -> list:
    client, server = trio.testing.memory_stream_pair()
    conn = HttpConn(server, kind)
    out: list = []

    async def reader() -> None:
        while (ev := await conn.next_event()) is not None:
            out.append(ev)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trickle(client, split_every(data, step) if step else [data])
        await client.send_eof()
    return out


def summary(events: list) -> list:
    """Heads as (method/status, target), bodies joined: comparable across read splits."""
    out: list = []
    for ev in events:
        if isinstance(ev, RequestHead):
            out.append(
                (
                    "req",
                    ev.method,
                    ev.target,
                    ev.headers,
                    ev.keep_alive,
                    ev.chunked,
                    ev.content_length,
                )
            )
        elif isinstance(ev, ResponseHead):
            out.append(("resp", ev.status, ev.headers, ev.chunked, ev.content_length))
        elif isinstance(ev, Data):
            if out and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1] + ev.data)
            else:
                out.append(("data", ev.data))
        else:
            assert isinstance(ev, EndOfMessage)
            out.append(("end",))
    return out


@pytest.mark.parametrize(
    "data", [POST, CHUNKED, POST + GET + CHUNKED], ids=["cl", "chunked", "pipelined"]
)
@pytest.mark.parametrize("step", [1, 3, 7, 16])
async def test_split_reads_give_the_same_events(data: bytes, step: int) -> None:
    whole = summary(await events_of(data, None))
    assert summary(await events_of(data, step)) == whole
    assert whole[0][:3] == ("req", b"POST", data.split(b" ")[1])


async def test_body_bytes_and_pipelined_messages() -> None:
    events = summary(await events_of(POST + GET, None))
    assert [e[0] for e in events] == ["req", "data", "end", "req", "end"]
    assert events[1] == ("data", b"hello world")
    assert (b"X-Trace", b"t1") in events[0][3]


async def test_chunked_body_is_decoded() -> None:
    events = summary(await events_of(CHUNKED, 2))
    assert events[0][5] is True and events[1] == ("data", b"hello world")


async def test_eof_between_messages_is_none_and_stays_none() -> None:
    client, server = trio.testing.memory_stream_pair()
    conn = HttpConn(server, "request")
    await client.send_all(GET)
    await client.send_eof()
    head, body, _ = await read_message(conn)
    assert isinstance(head, RequestHead) and body == b""
    assert await conn.next_event() is None
    assert await conn.next_event() is None  # no second read on a finished stream
    assert conn.eof and conn.bytes_received == len(GET)


async def test_eof_before_anything_is_none() -> None:
    client, server = trio.testing.memory_stream_pair()
    conn = HttpConn(server, "request")
    await client.send_eof()
    assert await conn.next_event() is None
    assert conn.bytes_received == 0


@pytest.mark.parametrize(
    "kind,data,status",
    [
        ("request", POST[:20], 400),  # in the head
        ("request", POST[:-3], 400),  # in a Content-Length body
        ("request", CHUNKED[:-5], 400),  # before the last chunk
        ("response", b"HTTP/1.1 200 OK\r\nContent-Len", 502),
        ("response", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 502),
    ],
    ids=["req-head", "req-cl-body", "req-chunked-body", "resp-head", "resp-body"],
)
async def test_eof_mid_message_is_a_protocol_error(kind: str, data: bytes, status: int) -> None:
    client, server = trio.testing.memory_stream_pair()
    conn = HttpConn(server, kind)
    await client.send_all(data)
    await client.send_eof()
    with pytest.raises(ProtocolError) as info:
        while await conn.next_event() is not None:
            pass
    assert info.value.status == status
    assert "closed in the middle of a message" in str(info.value)


async def test_close_delimited_response_ends_at_eof() -> None:
    client, server = trio.testing.memory_stream_pair()
    conn = HttpConn(server, "response")
    await trickle(client, [b"HTTP/1.1 200 OK\r\n\r\n", b"part one, ", b"part two"])
    await client.send_eof()
    head, body, _ = await read_message(conn)
    assert isinstance(head, ResponseHead) and head.until_close and not head.keep_alive
    assert body == b"part one, part two"
    assert await conn.next_event() is None


async def test_malformed_request_is_400() -> None:
    client, server = trio.testing.memory_stream_pair()
    conn = HttpConn(server, "request")
    await client.send_all(
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    )
    with pytest.raises(ProtocolError) as info:
        await conn.next_event()
    assert info.value.status == 400


async def test_memory_streams_are_never_clean_idle() -> None:
    """Only streams whose socket can be polled are ever pooled (clean_idle is False here)."""
    client, server = trio.testing.memory_stream_pair()
    conn = HttpConn(server, "response")
    await client.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")
    head, _, _ = await read_message(conn)
    assert head is not None and head.status == 204
    assert conn.parser.between_messages() and not conn.clean_idle()


async def test_clean_idle_on_a_socket_sees_late_bytes_and_eof() -> None:
    a, b = trio.socket.socketpair()
    client, server = trio.SocketStream(a), trio.SocketStream(b)
    conn = HttpConn(server, "response")
    await client.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    head, body, _ = await read_message(conn)
    assert body == b"ok" and conn.clean_idle()
    await client.send_all(b"X")  # a byte after the response: nobody's
    assert not conn.clean_idle()
    await client.aclose()
    await conn.aclose()
