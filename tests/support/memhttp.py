"""Helpers for the memory-stream unit tier of `meshcar.net`: HTTP/1.1 over
`trio.testing.memory_stream_pair` (no sockets, no TLS), read back with meshcar's own parser.

`trickle` sends pieces one read at a time: after each piece it waits until every task is
blocked, so the reader has taken that piece alone (split reads, deterministically)."""

from __future__ import annotations

from collections.abc import Iterable

import trio
import trio.testing

from meshcar.net.httpconn import HttpConn
from meshcar.proto.http1 import Data, EndOfMessage, Event, RequestHead, ResponseHead


async def trickle(stream: trio.abc.SendStream, pieces: Iterable[bytes]) -> None:
    for piece in pieces:
        await stream.send_all(piece)
        await trio.testing.wait_all_tasks_blocked()


def split_every(data: bytes, n: int = 1) -> list[bytes]:
    return [data[i : i + n] for i in range(0, len(data), n)]


async def read_message(
    conn: HttpConn,
) -> tuple[RequestHead | ResponseHead | None, bytes, list[Event]]:
    """The next complete message on `conn`: its head (None at a clean EOF), its body, and
    every event seen (interim 1xx heads included)."""
    events: list[Event] = []
    head: RequestHead | ResponseHead | None = None
    body = b""
    while True:
        ev = await conn.next_event()
        if ev is None:
            return head, body, events
        events.append(ev)
        if isinstance(ev, RequestHead | ResponseHead):
            head = ev
        elif isinstance(ev, Data):
            body += ev.data
        elif isinstance(ev, EndOfMessage):
            if isinstance(head, ResponseHead) and 100 <= head.status < 200:
                continue  # interim: the final response follows
            return head, body, events


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    """Every byte until EOF (or until the other side broke the stream)."""
    out = b""
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return out
        if not data:
            return out
        out += data


def header(head: RequestHead | ResponseHead, name: bytes) -> bytes | None:
    return head.header(name)
