"""One request through a pool: acquire, forward, release, retry a stale keep-alive once.

A pooled keep-alive connection may have been closed by the peer while idle; that shows as
an upstream error before any response byte. Such a request is retried once on a fresh
connection, but only if it has no body (a streamed body cannot be replayed).
"""

from __future__ import annotations

from collections.abc import Callable

from meshcar.errors import UpstreamError
from meshcar.net.forward import (
    DownstreamGone,
    Exchange,
    ResponseStarted,
    forward,
    request_has_body,
)
from meshcar.net.httpconn import HttpConn
from meshcar.net.pool import Pool, Pooled
from meshcar.proto.http1 import Headers, RequestHead, ResponseHead


async def proxy_request(
    down: HttpConn, req: RequestHead, head: bytes, pool: Pool, key: str,
    rewrite_response: Callable[[ResponseHead, Headers], Headers], *,
    on_release: Callable[[Pooled], None] | None = None, response_timeout: float = 60.0,
    max_request_body: int | None = None,
) -> Exchange:
    retryable = not request_has_body(req)
    while True:
        p, reused = await pool.acquire(key)
        ex = Exchange()
        try:
            ex = await forward(down, req, head, p.conn, rewrite_response, exchange=ex,
                               response_timeout=response_timeout, max_request_body=max_request_body)
        except UpstreamError:
            await p.conn.aclose()
            if reused and retryable and not ex.response_started:
                continue
            raise
        except (DownstreamGone, ResponseStarted, BaseException):
            await p.conn.aclose()
            raise
        if on_release is not None:
            on_release(p)
        await pool.release(p, ex.upstream_reusable)
        return ex
