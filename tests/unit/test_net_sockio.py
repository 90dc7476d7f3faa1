"""net/sockio: trio's socket-stream semantics without SocketStream's wrapper layers."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from meshcar.net import sockio


def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = socket.socketpair()
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
    )


async def test_round_trip_and_eof() -> None:
    a, b = _pair()
    payload = b"x" * (1 << 20)  # more than a socket buffer: the send has to wait

    async def reader() -> bytes:
        got = bytearray()
        while data := await sockio.receive_some(b, 65536):
            got += data
        return bytes(got)

    async with trio.open_nursery() as n:
        result: list[bytes] = []

        async def run_reader() -> None:
            result.append(await reader())

        n.start_soon(run_reader)
        await sockio.send_all(a, payload)
        await a.send_eof()
    assert result == [payload]
    await a.aclose()
    await b.aclose()


async def test_every_call_is_a_checkpoint() -> None:
    a, b = _pair()
    with trio.testing.assert_checkpoints():
        await sockio.send_all(a, b"hi")  # did not have to wait
    with trio.testing.assert_checkpoints():
        assert await sockio.receive_some(b, 10) == b"hi"  # the data was there already
    await a.aclose()
    await b.aclose()


async def test_cancelled_receive_leaves_the_data() -> None:
    a, b = _pair()
    await sockio.send_all(a, b"keep me")
    with trio.CancelScope() as scope:
        scope.cancel()
        await sockio.receive_some(b, 100)
    assert scope.cancelled_caught
    assert await sockio.receive_some(b, 100) == b"keep me"
    await a.aclose()
    await b.aclose()


async def test_closed_and_broken() -> None:
    a, b = _pair()
    await b.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await sockio.receive_some(b, 10)
    with pytest.raises(trio.ClosedResourceError):
        await sockio.fd_send_all(-1, b"x")
    # a peer that resets: the write fails as BrokenResourceError, not a bare OSError
    c, d = socket.socketpair()
    d.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    d.close()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(c))
    with pytest.raises(trio.BrokenResourceError):
        await sockio.send_all(stream, b"x")
    await stream.aclose()
    await a.aclose()


async def test_other_streams_use_their_own_methods() -> None:
    a, b = trio.testing.memory_stream_pair()
    await sockio.send_all(a, b"mem")
    assert await sockio.receive_some(b, 10) == b"mem"
    assert sockio.socket_fd(a) is None
