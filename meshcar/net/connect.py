"""Open TCP and TLS connections to upstreams with timeouts, mapping failures to statuses."""

from __future__ import annotations

import ssl

import trio

from meshcar.errors import UpstreamError
from meshcar.net.tls_memory_bio import TLSStream


async def open_tcp(
    host: str, port: int, timeout: float = 5.0, *, local_address: str | None = None
) -> trio.SocketStream:
    try:
        with trio.fail_after(timeout):
            return await trio.open_tcp_stream(host, port, local_address=local_address)
    except trio.TooSlowError:
        raise UpstreamError(f"connect to {host}:{port} timed out", 504) from None
    except OSError as exc:
        raise UpstreamError(
            f"connect to {host}:{port} failed: {exc.strerror or exc}", 503
        ) from None


async def open_tls(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    session: ssl.SSLSession | None = None,
    timeout: float = 5.0,
) -> TLSStream:
    tcp = await open_tcp(host, port, timeout)
    stream = TLSStream(
        tcp, ctx, server_side=False, server_hostname=server_hostname, session=session
    )
    try:
        with trio.fail_after(timeout):
            await stream.do_handshake()
    except trio.TooSlowError:
        await trio.aclose_forcefully(tcp)
        raise UpstreamError(f"TLS handshake with {host}:{port} timed out", 504) from None
    except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
        await trio.aclose_forcefully(tcp)
        cause = exc.__cause__ or exc
        raise UpstreamError(f"TLS handshake with {host}:{port} failed: {cause}", 502) from None
    return stream
