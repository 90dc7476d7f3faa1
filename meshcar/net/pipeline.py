"""The request pipeline every role runs: a role decides, the pipeline carries it out.

A role (sidecar inbound and outbound, the edge) looks at a request head and returns a
decision: `Refuse(status, message)` (answered here, `net/respond.py`) or `Forward(...)`
(the request goes through a pool to an upstream, `net/proxying.py`). `carry_out` does it,
maps whatever error comes up to the one answer it hints (`respond.refusal_for`), and
returns an `Outcome` (status, bytes, whether the connection may carry another request)
for the role's access log and metrics. No role writes a response itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from meshcar.errors import MeshcarError, ResponseStarted, UpstreamError
from meshcar.net.forward import Exchange, Timeouts, keep_response_headers
from meshcar.net.httpconn import HttpConn
from meshcar.net.pool import Pool, Pooled
from meshcar.net.proxying import proxy_request
from meshcar.net.resilient import UpstreamPolicy, policy_request
from meshcar.net.respond import Refuse, answer, refusal_for
from meshcar.net.upgrade import UpgradeObserver
from meshcar.proto.http1 import Headers, RequestHead, ResponseHead

log = logging.getLogger("meshcar.http")


@dataclass(slots=True)  # not frozen: one is made per request, and frozen init is slower
class Forward:
    """A decision: send `head` (the rewritten request head) and the request body through
    `pool` to the upstream `key`. `upstream` names it in the answer to an upstream error;
    `on_done` runs when the exchange ends, however it ends."""

    head: bytes
    pool: Pool
    key: str
    upstream: str
    rewrite_response: Callable[[ResponseHead, Headers], Headers] = keep_response_headers
    on_release: Callable[[Pooled], None] | None = None
    max_request_body: int | None = None
    response_timeout: float | None = None  # overrides the timeouts' response_head
    on_done: Callable[[], None] | None = None
    upgrades: UpgradeObserver | None = None  # counts switched protocols (net/upgrade.py)
    policy: UpstreamPolicy | None = None  # retries, balancing, breakers (net/resilient.py)
    request_timeout: float | None = None  # bounds the whole exchange (504, or a close)


Decision = Refuse | Forward


@dataclass(slots=True)
class Outcome:
    """What became of a request: the status sent (or the error's hint), the body bytes
    moved, whether the connection may carry another request, and the error, if any."""

    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    keep: bool = True
    error: MeshcarError | None = None


async def carry_out(
    down: HttpConn, req: RequestHead, decision: Decision, timeouts: Timeouts, role: str
) -> Outcome:
    """Answer or forward `req` as `decision` says; `role` names the aborted-request log."""
    if isinstance(decision, Refuse):
        return Outcome(decision.status, keep=await answer(down, decision, req))
    try:
        if decision.policy is not None:  # `key` is the upstream; the policy picks endpoints
            ex = await policy_request(
                down,
                req,
                decision.head,
                decision.pool,
                decision.policy,
                decision.rewrite_response,
                on_release=decision.on_release,
                max_request_body=decision.max_request_body,
                upgrades=decision.upgrades,
            )
            return Outcome(ex.status, ex.bytes_up, ex.bytes_down)
        if decision.request_timeout is not None:
            ex = await _bounded(down, req, decision, timeouts, decision.request_timeout)
            return Outcome(ex.status, ex.bytes_up, ex.bytes_down)
        ex = await _proxy(down, req, decision, timeouts, None)
    except MeshcarError as exc:
        return await fail(down, req, exc, role, decision.upstream)
    finally:
        if decision.on_done is not None:
            decision.on_done()
    return Outcome(ex.status, ex.bytes_up, ex.bytes_down)


async def _bounded(
    down: HttpConn, req: RequestHead, d: Forward, timeouts: Timeouts, limit: float
) -> Exchange:
    """proxy_request within `limit` seconds: a 504 before the response began, else a close."""
    ex = Exchange()
    with trio.move_on_after(limit):
        return await _proxy(down, req, d, timeouts, ex)
    if ex.response_started:
        raise ResponseStarted(f"request timeout ({limit:g}s) in the response body")
    raise UpstreamError(f"no response within the request timeout ({limit:g}s)", 504)


async def fail(
    down: HttpConn, req: RequestHead, exc: MeshcarError, role: str, upstream: str = ""
) -> Outcome:
    """The answer an error hints, written downstream when one can still be written."""
    refusal = refusal_for(exc, upstream)
    if refusal is None:  # the client is gone or the response began: only closing is left
        log.info(json.dumps({"event": f"{role}.aborted", "reason": exc.reason, "error": str(exc)}))
        return Outcome(exc.status, keep=False, error=exc)
    keep = await answer(down, refusal, req)
    return Outcome(exc.status, keep=keep, error=exc)


async def _proxy(
    down: HttpConn, req: RequestHead, d: Forward, timeouts: Timeouts, ex: Exchange | None
) -> Exchange:
    """proxy_request with what the decision `d` carries; `ex`, if given, records it."""
    return await proxy_request(
        down,
        req,
        d.head,
        d.pool,
        d.key,
        d.rewrite_response,
        on_release=d.on_release,
        max_request_body=d.max_request_body,
        response_timeout=d.response_timeout,
        timeouts=timeouts,
        upgrades=d.upgrades,
        exchange=ex,
    )
