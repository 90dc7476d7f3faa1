"""A socket stream that calls the kernel directly and parks in trio only when it must.

Theory of operation: `trio.SocketStream` yields to the scheduler on every operation, even
when the kernel answers at once. On the edge's TLS path (accept, ClientHello, handshake
flights, one request, close) those yields are a large share of a new connection's cost.
`DirectStream` tries `recv`/`send` on the non-blocking socket first and waits with
`wait_readable`/`wait_writable` only on EAGAIN; every `CHECKPOINT_EVERY` operations that
did not wait it yields anyway, so a busy connection cannot starve the others and
cancellation is still noticed.
"""

from __future__ import annotations

import os

import trio

CHECKPOINT_EVERY = 16


class DirectStream(trio.abc.HalfCloseableStream):
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.socket = stream.socket
        self._fd = stream.socket.fileno()  # non-blocking (trio made it so)
        self._ops = 0

    async def _maybe_checkpoint(self) -> None:
        self._ops += 1
        if self._ops >= CHECKPOINT_EVERY:
            self._ops = 0
            await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        n = max_bytes or 65536
        while True:
            try:
                data = os.read(self._fd, n)
            except BlockingIOError:
                self._ops = 0
                await trio.lowlevel.wait_readable(self._fd)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(repr(exc)) from exc
            await self._maybe_checkpoint()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                try:
                    sent += os.write(self._fd, view[sent:])
                except BlockingIOError:
                    self._ops = 0
                    await trio.lowlevel.wait_writable(self._fd)
                except OSError as exc:
                    raise trio.BrokenResourceError(repr(exc)) from exc
        await self._maybe_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self._fd)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()
