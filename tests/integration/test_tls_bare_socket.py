"""net/tls_bare_socket.py: OpenSSL on the socket, driven by trio, against a real TLS client."""

from __future__ import annotations

import hashlib
import socket
import ssl
from functools import partial

import pytest
import trio
import trustme

from meshcar.net.acceptor import serve_sockets
from meshcar.net.tls_bare_socket import SocketTLSStream


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("tls.test").configure_cert(ctx)
    return ctx


async def start(nursery: trio.Nursery, ca: trustme.CA, serve) -> int:  # noqa: ANN001
    ctx = server_context(ca)

    async def handler(sock: socket.socket, addr: tuple) -> None:
        tls = SocketTLSStream(sock, ctx)
        try:
            await tls.do_handshake()
            await serve(tls)
        finally:
            await tls.aclose()

    listeners = await nursery.start(partial(serve_sockets, handler, "127.0.0.1", 0))
    return listeners[0].getsockname()[1]


async def client(ca: trustme.CA, port: int) -> trio.SSLStream:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, ctx, server_hostname="tls.test")
    await tls.do_handshake()
    return tls


async def test_bulk_echo_both_ways(nursery: trio.Nursery, ca: trustme.CA) -> None:
    async def echo(tls: SocketTLSStream) -> None:
        while data := await tls.receive_some(65536):
            await tls.send_all(data)

    port = await start(nursery, ca, echo)
    c = await client(ca, port)
    payload = bytes(range(256)) * 16384  # 4 MiB: many records, the socket buffers fill up

    async def send() -> None:
        await c.send_all(payload)

    got = hashlib.sha256()
    n = 0
    async with trio.open_nursery() as inner:
        inner.start_soon(send)
        with trio.fail_after(20):
            while n < len(payload):
                data = await c.receive_some(65536)
                assert data
                got.update(data)
                n += len(data)
    assert n == len(payload) and got.digest() == hashlib.sha256(payload).digest()
    await c.aclose()


async def test_close_notify_is_end_of_data_but_a_bare_close_is_an_error(
    nursery: trio.Nursery, ca: trustme.CA
) -> None:
    outcomes: list[str] = []

    async def read_to_end(tls: SocketTLSStream) -> None:
        try:
            while await tls.receive_some(1024):
                pass
            outcomes.append("eof")
        except trio.BrokenResourceError as exc:
            outcomes.append(f"broken: {exc}")
        with pytest.raises(trio.ClosedResourceError):
            await tls.aclose()
            await tls.send_all(b"after close")

    port = await start(nursery, ca, read_to_end)
    c = await client(ca, port)
    await c.send_all(b"hello")
    await c.aclose()  # sends close_notify
    c = await client(ca, port)
    await c.send_all(b"hello")
    await trio.aclose_forcefully(c.transport_stream)  # TCP close, no close_notify: truncation
    with trio.fail_after(5):
        while len(outcomes) < 2:
            await trio.sleep(0.01)
    assert outcomes[0] == "eof"
    assert outcomes[1].startswith("broken: ") and "close_notify" in outcomes[1]


async def test_a_healthy_connection_is_closed_with_close_notify(
    nursery: trio.Nursery, ca: trustme.CA
) -> None:
    async def say_bye(tls: SocketTLSStream) -> None:
        await tls.send_all(b"bye")  # then the handler's aclose

    port = await start(nursery, ca, say_bye)
    c = await client(ca, port)
    with trio.fail_after(5):
        assert await c.receive_some(10) == b"bye"
        # trio's SSLStream raises BrokenResourceError on a close without close_notify
        assert await c.receive_some(10) == b""
    await c.aclose()
