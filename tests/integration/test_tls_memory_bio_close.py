"""TLSStream (net/tls_memory_bio.py) ends a read cleanly when the peer sends close_notify: CPython's
SSLObject.read returns b"" for it (no SSLZeroReturnError), and the stream used to go on
waiting for more records, spinning on the socket's EOF forever (an outbound whose peer
sidecar closed mid-response hung at 100 % CPU)."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
import trio.testing
import trustme

from meshcar.net.tls_memory_bio import TLSStream


def _contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context for peer.test and a client context that trusts it."""
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("peer.test").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


async def _client(
    nursery: trio.Nursery, then: Callable[[TLSStream, trio.SocketStream], Awaitable[None]]
) -> TLSStream:
    """A TLSStream client, handshake done and b"hello" sent, to a TLSStream server that reads
    the hello and then runs `then(its TLS stream, the TCP stream under it)`."""
    server_ctx, client_ctx = _contexts()

    async def serve(tcp: trio.SocketStream) -> None:
        tls = TLSStream(tcp, server_ctx, server_side=True)
        await tls.do_handshake()
        await tls.receive_some(100)
        await then(tls, tcp)

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    tcp = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
    tls = TLSStream(tcp, client_ctx, server_side=False, server_hostname="peer.test")
    await tls.do_handshake()
    await tls.send_all(b"hello")
    return tls


async def test_close_notify_ends_a_read(nursery: trio.Nursery) -> None:
    async def partial_then_close(tls: TLSStream, tcp: trio.SocketStream) -> None:
        await tls.send_all(b"partial")
        await tls.aclose()  # close_notify, then FIN

    tls = await _client(nursery, partial_then_close)
    got = b""
    with trio.fail_after(5):
        while True:
            data = await tls.receive_some(65536)
            if not data:
                break
            got += data
    assert got == b"partial"
    assert await tls.receive_some(10) == b""  # and it stays ended
    await tls.aclose()


async def _pair_with_raw_server(
    nursery: trio.Nursery, then: bytes, go: trio.Event, close: trio.Event | None = None
) -> TLSStream:
    """A TLSStream client whose server, after the handshake and one record, writes `then`
    (once `go` is set) as raw bytes on the TCP connection, outside TLS, and closes it without
    close_notify (once `close` is set, if given)."""

    async def raw_then_fin(tls: TLSStream, tcp: trio.SocketStream) -> None:
        await tls.send_all(b"first")
        await go.wait()
        await tcp.send_all(then)
        if close is not None:
            await close.wait()
        await tcp.aclose()  # FIN, no close_notify

    tls = await _client(nursery, raw_then_fin)
    with trio.fail_after(5):
        assert await tls.receive_some(65536) == b"first"
    go.set()
    return tls


async def _read_error(tls: TLSStream) -> trio.BrokenResourceError:
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as info:
        await tls.receive_some(65536)
    return info.value


async def test_eof_without_close_notify_is_a_broken_stream(nursery: trio.Nursery) -> None:
    tls = await _pair_with_raw_server(nursery, b"", trio.Event())
    assert str(await _read_error(tls)) == "peer closed without close_notify"
    with trio.testing.assert_checkpoints():  # an error is a checkpoint too
        await _read_error(tls)
    await tls.aclose()


async def test_bytes_that_are_not_tls_are_a_broken_stream(nursery: trio.Nursery) -> None:
    done = trio.Event()  # the connection stays open: the error is the bad record, not an EOF
    tls = await _pair_with_raw_server(
        nursery, b"\x17\x03\x03\x00\x05not a record", trio.Event(), done
    )
    exc = await _read_error(tls)
    done.set()
    assert str(exc).startswith("TLS error: "), exc
    await tls.aclose()
