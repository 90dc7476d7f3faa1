"""A passthrough backend for edge tests: its own TLS server that reads an optional PROXY
header first, can demand a client certificate, and answers one HTTP request with JSON
describing what it saw (PROXY addresses, client certificate subject). Runs in trio."""

from __future__ import annotations

import json
import ssl
from functools import partial

import trio

from meshcar.net.tls_memory_bio import TLSStream
from meshcar.proto import proxy_protocol as pp
from tests.support.prefixed import PrefixedStream


async def _handle(ctx: ssl.SSLContext, seen: list[dict], tcp: trio.SocketStream) -> None:
    info: dict = {"proxy": None}
    try:
        buf = b""
        while True:
            res = pp.parse_proxy_header(buf)
            if isinstance(res, pp.Incomplete):
                data = await tcp.receive_some(4096)
                if not data:
                    return
                buf += data
                continue
            break
        if isinstance(res, pp.ProxyHeader):
            info["proxy"] = {
                "version": res.version,
                "src": f"{res.src_addr}:{res.src_port}",
                "dst": f"{res.dst_addr}:{res.dst_port}",
            }
            buf = buf[res.consumed :]
        tls = TLSStream(PrefixedStream(tcp, buf), ctx, server_side=True)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            info["tls_error"] = str(exc)
            seen.append(info)
            return
        cert = tls.getpeercert()
        info["client_subject"] = dict(x[0] for x in cert["subject"]) if cert else None
        seen.append(info)
        await tls.receive_some(65536)  # the request (one read is enough for these tests)
        body = json.dumps(info).encode()
        await tls.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        await tls.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(tcp)


async def serve_tls_backend(nursery: trio.Nursery, ctx: ssl.SSLContext, seen: list[dict]) -> int:
    listeners = await nursery.start(
        partial(trio.serve_tcp, partial(_handle, ctx, seen), 0, host="127.0.0.1")
    )
    return listeners[0].socket.getsockname()[1]
