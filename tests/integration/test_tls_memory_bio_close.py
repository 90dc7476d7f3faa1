"""TLSStream (net/tls_memory_bio.py) ends a read cleanly when the peer sends close_notify: CPython's
SSLObject.read returns b"" for it (no SSLZeroReturnError), and the stream used to go on
waiting for more records, spinning on the socket's EOF forever (an outbound whose peer
sidecar closed mid-response hung at 100 % CPU)."""

from __future__ import annotations

import ssl
from functools import partial

import trio
import trustme

from meshcar.net.tls_memory_bio import TLSStream


async def test_close_notify_ends_a_read(nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("peer.test").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def serve(tcp: trio.SocketStream) -> None:
        tls = TLSStream(tcp, server_ctx, server_side=True)
        await tls.do_handshake()
        await tls.receive_some(100)
        await tls.send_all(b"partial")
        await tls.aclose()  # close_notify, then FIN

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = TLSStream(tcp, client_ctx, server_side=False, server_hostname="peer.test")
    await tls.do_handshake()
    await tls.send_all(b"hello")
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
