"""Send and receive on a trio socket stream without its per-call wrapper layers.

`trio.SocketStream.send_all`/`receive_some` wrap every call in an error-translating
generator context manager, a conflict detector and trio's try-sync manager before the
syscall; on the proxy's hot path (four socket operations per request per sidecar) that
Python overhead was a measurable share of a request (docs/PERFORMANCE.md). These functions
do the same syscalls on the non-blocking descriptor with the same trio semantics:
cancellation is checked first, an operation that did not have to wait still yields once
(`cancel_shielded_checkpoint`, as trio does), EAGAIN waits in trio's I/O manager, OS errors
become `BrokenResourceError` and a closed socket `ClosedResourceError`. Not kept: trio's
detection of two tasks sending (or receiving) on one stream at once; meshcar's HTTP
connections have one reader and one writer.

Other stream kinds (TLS, memory streams in tests) are passed to their own methods.
`fd_send_all` and `fd_receive_some` are also how `TLSStream` (tls_memory_bio.py) writes and
reads the socket under it: the one copy of these loops.
"""

from __future__ import annotations

import os

import trio


def socket_fd(stream: trio.abc.Stream) -> int | None:
    """The descriptor of a plain trio socket stream (asked per call: never a cached number
    that a closed socket's successor could reuse); None for other stream kinds."""
    if type(stream) is trio.SocketStream:
        return stream.socket.fileno()
    return None


async def fd_send_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    if fd < 0:
        raise trio.ClosedResourceError("socket was closed")
    await trio.lowlevel.checkpoint_if_cancelled()
    view = memoryview(data)
    waited = False
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            waited = True
            continue
        except OSError as exc:
            raise trio.BrokenResourceError(repr(exc)) from exc
        view = view[n:]
    if not waited:
        await trio.lowlevel.cancel_shielded_checkpoint()


async def fd_receive_some(fd: int, max_bytes: int) -> bytes:
    if fd < 0:
        raise trio.ClosedResourceError("socket was closed")
    await trio.lowlevel.checkpoint_if_cancelled()
    waited = False
    while True:
        try:
            data = os.read(fd, max_bytes)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
            waited = True
            continue
        except OSError as exc:
            raise trio.BrokenResourceError(repr(exc)) from exc
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data


async def send_all(stream: trio.abc.Stream, data: bytes | bytearray | memoryview) -> None:
    """`stream.send_all(data)`, on the socket itself for a plain socket stream."""
    if type(stream) is trio.SocketStream and not stream.socket.did_shutdown_SHUT_WR:
        await fd_send_all(stream.socket.fileno(), data)
    else:
        await stream.send_all(data)


async def receive_some(stream: trio.abc.Stream, max_bytes: int) -> bytes:
    """`stream.receive_some(max_bytes)`, on the socket itself for a plain socket stream."""
    if type(stream) is trio.SocketStream:
        return await fd_receive_some(stream.socket.fileno(), max_bytes)
    return bytes(await stream.receive_some(max_bytes))
