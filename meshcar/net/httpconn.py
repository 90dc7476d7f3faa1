"""An HTTP/1.1 connection: a trio stream plus a sans-IO parser, read as a queue of events."""

from __future__ import annotations

import socket
from collections import deque
from typing import Any, cast

import trio

from meshcar.errors import ProtocolError
from meshcar.net import sockio
from meshcar.net.tls_memory_bio import TLSStream, socket_readable
from meshcar.proto.http1 import DEFAULT_HEADER_POLICY, Event, HeaderPolicy, Http1Parser

READ_SIZE = 64 * 1024
# Linux only; elsewhere `quickack=True` is a no-op.
TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def tcp_socket(stream: trio.abc.Stream) -> Any | None:
    """The TCP socket under a plain or `TLSStream` stream (None for other kinds)."""
    if isinstance(stream, TLSStream):
        stream = stream.transport
    return getattr(stream, "socket", None)


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
    def __init__(
        self,
        stream: trio.abc.Stream,
        kind: str,
        policy: HeaderPolicy = DEFAULT_HEADER_POLICY,
        *,
        quickack: bool = False,
    ) -> None:
        """`quickack`: for sockets facing an app (which may keep Nagle on and write a head and
        a body separately, its second write waiting for our ACK of the first): ACK what each
        read took at once. Linux drops quick-ACK mode again as soon as we answer, so it is
        re-armed after every read (one setsockopt, ~1 us; docs/PERFORMANCE.md)."""
        self.stream = stream
        self._quickack = tcp_socket(stream) if quickack and TCP_QUICKACK is not None else None
        self.parser = Http1Parser(kind, policy)
        self._pending: deque[Event] = deque()
        self.eof = False
        self.bytes_received = 0
        self._error: ProtocolError | None = None  # raised once the events before it are read

    async def next_event(self) -> Event | None:
        """The next event; None when the peer closed cleanly between messages."""
        while not self._pending:
            if self._error is not None:
                raise self._error
            if self.eof:
                return None
            data = await sockio.receive_some(self.stream, READ_SIZE)
            if not data:
                self.eof = True
                self._pending.extend(self.parser.feed_eof())
            else:
                if self._quickack is not None:
                    try:
                        self._quickack.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
                    except OSError:
                        self._quickack = None
                self.bytes_received += len(data)
                try:
                    self._pending.extend(self.parser.feed(data))
                except ProtocolError as exc:
                    if not exc.partial:
                        raise
                    # what came before the error in this read is delivered first; the
                    # error is raised when the caller asks for more
                    self._pending.extend(cast(list[Event], exc.partial))
                    exc.partial = []
                    self._error = exc
        return self._pending.popleft()

    def has_buffered_events(self) -> bool:
        return bool(self._pending)

    def detach(self) -> bytes:
        """After a protocol switch (the parser delivered the switching message and stopped):
        the bytes read past that message, the new protocol's first. The HTTP/1.1 side of
        the connection is done; only its stream is used from here on."""
        self._pending.clear()  # at most the switching message's EndOfMessage
        return self.parser.upgrade_tail

    def clean_idle(self) -> bool:
        """May this connection carry another exchange? Only when its last exchange is provably
        complete and nothing unread waits on it: no buffered event, no parser leftover, no
        message half-parsed, and nothing (data or EOF) in the TLS object or the socket. Never
        blocks; a connection that fails this is to be closed, never reused."""
        if (
            self.eof
            or self._pending
            or self._error is not None
            or self.parser.leftover
            or not self.parser.between_messages()
        ):
            return False
        return not stream_has_unread(self.stream)

    async def send(self, data: bytes) -> None:
        await sockio.send_all(self.stream, data)

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
