"""One request through a pool: acquire, forward, release, retry a stale keep-alive once.

A pooled keep-alive connection may have been closed by the peer while idle; that shows as
an upstream error before any response byte. Such a request is retried once, on a newly
dialed connection (never on another idle one, which may be just as stale), and only if it
has no body (a streamed body cannot be replayed) and its method is idempotent (RFC 9110
9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE; a POST may have been acted on). Every
error goes up with its status hint; `net/pipeline.py` answers it (`net/respond.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from meshcar.errors import UpstreamError
from meshcar.net.forward import Exchange, Timeouts, forward, request_has_body
from meshcar.net.httpconn import HttpConn
from meshcar.net.pool import Pool, Pooled
from meshcar.net.upgrade import UpgradeObserver, end_upgrade
from meshcar.proto.http1 import Headers, RequestHead, ResponseHead

IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))


async def proxy_request(
    down: HttpConn,
    req: RequestHead,
    head: bytes,
    pool: Pool,
    key: str,
    rewrite_response: Callable[[ResponseHead, Headers], Headers],
    *,
    on_release: Callable[[Pooled], None] | None = None,
    response_timeout: float | None = None,
    max_request_body: int | None = None,
    timeouts: Timeouts | None = None,
    upgrades: UpgradeObserver | None = None,
    exchange: Exchange | None = None,
) -> Exchange:
    """`response_timeout`, when given, overrides `timeouts.response_head`. An upgrade
    request answered 101 is relayed here until it ends (net/upgrade.py; `upgrades` counts
    it); its upstream connection is never reused. `exchange`, if given, is the one each
    attempt fills (the caller sees whether the response began)."""
    t = timeouts or Timeouts()
    if response_timeout is not None and response_timeout != t.response_head:
        t = replace(t, response_head=response_timeout)
    retryable = req.method in IDEMPOTENT and not request_has_body(req)
    fresh = False
    while True:
        p, reused = await pool.acquire(key, fresh=fresh)
        ex = exchange if exchange is not None else Exchange()
        try:
            ex = await forward(
                down,
                req,
                head,
                p.conn,
                rewrite_response,
                exchange=ex,
                max_request_body=max_request_body,
                timeouts=t,
            )
        except UpstreamError:
            await pool.discard(p)
            if reused and retryable and not ex.response_started:
                retryable, fresh = False, True  # once, on a new connection
                continue
            raise
        except BaseException:
            await pool.discard(p)
            raise
        if on_release is not None:
            on_release(p)
        if req.upgrade is not None:  # switched or not, that connection is spent
            return await end_upgrade(down, pool, p, req, ex, rewrite_response, t, upgrades)
        await pool.release(p, ex.upstream_reusable)
        return ex
