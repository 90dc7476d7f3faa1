"""An HTTP/1.1 connection: a trio stream plus a sans-IO parser, read as a queue of events."""

from __future__ import annotations

from collections import deque

import trio

from meshcar.net.tlsstream import TLSStream, socket_readable
from meshcar.proto.http1 import DEFAULT_HEADER_POLICY, Event, HeaderPolicy, Http1Parser

READ_SIZE = 64 * 1024


def stream_has_unread(stream: trio.abc.Stream) -> bool:
    """Without blocking: does `stream` hold or await anything unread (data, EOF, an error)?
    Streams of unknown kinds count as unread: they are never pooled."""
    if isinstance(stream, TLSStream):
        return stream.has_unread()
    sock = getattr(stream, "socket", None)
    if sock is None:
        return True
    fd = sock.fileno()
    return fd < 0 or socket_readable(fd)


class HttpConn:
    def __init__(self, stream: trio.abc.Stream, kind: str,
                 policy: HeaderPolicy = DEFAULT_HEADER_POLICY) -> None:
        self.stream = stream
        self.parser = Http1Parser(kind, policy)
        self._pending: deque[Event] = deque()
        self.eof = False
        self.bytes_received = 0

    async def next_event(self) -> Event | None:
        """The next event; None when the peer closed cleanly between messages."""
        while not self._pending:
            if self.eof:
                return None
            data = await self.stream.receive_some(READ_SIZE)
            if not data:
                self.eof = True
                self._pending.extend(self.parser.feed_eof())
            else:
                self.bytes_received += len(data)
                self._pending.extend(self.parser.feed(data))
        return self._pending.popleft()

    def has_buffered_events(self) -> bool:
        return bool(self._pending)

    def clean_idle(self) -> bool:
        """May this connection carry another exchange? Only when its last exchange is provably
        complete and nothing unread waits on it: no buffered event, no parser leftover, no
        message half-parsed, and nothing (data or EOF) in the TLS object or the socket. Never
        blocks; a connection that fails this is to be closed, never reused."""
        if self.eof or self._pending or self.parser.leftover or not self.parser.between_messages():
            return False
        return not stream_has_unread(self.stream)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
