"""One request to an upstream with its traffic policy: circuit breaking, a load-balanced
endpoint per attempt, timeouts, retries within a budget, outlier detection.

Per request (`policy_request`): over `circuit.max_requests` requests in flight, or
`circuit.max_pending` waiting for a connection, it is a fast 503 (`CircuitOpen`, counted;
`circuit.max_connections` is the pool's per-upstream limit, also a CircuitOpen). Each
attempt picks an endpoint (net/balancer.py: P2C, peak EWMA, ejected ones passed over),
dials or reuses a pooled connection to it and forwards with `per_try` as the response-head
timeout. A failure is retried (net/retry.py) when its kind is in `retry_on`, attempts are
left and the budget allows; a retryable status is held back from the client
(net/forward.py's `hold`) only while a retry is still possible, so the last answer always
goes through. The result of each attempt feeds outlier detection (net/outlier.py) and the
endpoint's latency. `request` bounds the whole exchange, retries included: 504 before the
response began, a closed connection after. The response carries `x-meshcar-attempts`; an
error answer after several attempts says how many. A stale pooled keep-alive connection is
retried once on a new connection, outside the budget (as net/proxying.py does).

Events go to `count(event)`: retry, budget_exhausted, circuit_open, ejected, request_timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import trio

from meshcar.errors import (
    BodyTooLarge,
    CircuitOpen,
    DownstreamGone,
    ProtocolError,
    RequestBodyStalled,
    ResponseStarted,
    UpstreamError,
)
from meshcar.net.balancer import Balancer, Endpoint
from meshcar.net.errors import CONNECTION_ERRORS
from meshcar.net.forward import Exchange, Timeouts, forward, request_has_body
from meshcar.net.httpconn import HttpConn
from meshcar.net.outlier import GATEWAY_FAILURES, OutlierPolicy, record
from meshcar.net.pool import Pool, Pooled
from meshcar.net.proxying import IDEMPOTENT, proxy_request
from meshcar.net.retry import RetryBudget, RetryPolicy
from meshcar.net.upgrade import UpgradeObserver
from meshcar.proto.http1 import Data, EndOfMessage, Headers, RequestHead, ResponseHead

ATTEMPTS = b"x-meshcar-attempts"


@dataclass(frozen=True)
class UpstreamTimeouts:
    connect: float = 5.0  # TCP connect, and the TLS handshake, each
    request: float | None = None  # the whole exchange, retries included (None: no limit)
    per_try: float | None = None  # the response head, per attempt (None: timeouts.response_head)
    idle: float | None = None  # a pooled connection's idle life (None: pool_idle_seconds)


@dataclass(frozen=True)
class CircuitLimits:
    max_connections: int | None = None  # None: limits.max_upstream_connections
    max_pending: int = 1024  # requests waiting for a new connection
    max_requests: int = 10000  # requests in flight


@dataclass(frozen=True)
class Resilience:
    """An upstream's traffic policy, as configured (sidecar/config.py)."""

    timeouts: UpstreamTimeouts = field(default_factory=UpstreamTimeouts)
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    outlier: OutlierPolicy = field(default_factory=OutlierPolicy)
    circuit: CircuitLimits = field(default_factory=CircuitLimits)
    dns_refresh: float = 5.0


class UpstreamPolicy:
    """The live state of one upstream's policy: its balancer, budget and counters."""

    def __init__(
        self,
        config: Resilience,
        balancer: Balancer,
        timeouts: Timeouts,
        count: Callable[[str], None] = lambda event: None,
    ) -> None:
        self.config = config
        self.balancer = balancer
        r = config.retries
        self.retries = r
        self.budget = RetryBudget(r.budget_ratio, r.min_per_second, r.window_seconds)
        per_try = config.timeouts.per_try
        self.timeouts = replace(timeouts, response_head=per_try) if per_try else timeouts
        self.count = count
        self.active = 0
        self.pending = 0
        self.headers = [(ATTEMPTS, str(i).encode()) for i in range(r.max_attempts + 1)]

    def outcome(self, ep: Endpoint, ok: bool) -> None:
        if record(self.config.outlier, ep, self.balancer.endpoints, ok) is not None:
            self.count("ejected")

    def may_retry(self, kind: str | None, attempt: int) -> bool:
        """Whether a failure of `kind` after `attempt` attempts is retried (and the retry taken
        from the budget)."""
        if kind is None or kind not in self.retries.retry_on:
            return False
        if attempt >= self.retries.max_attempts:
            return False
        if not self.budget.can_retry():
            self.count("budget_exhausted")
            return False
        self.budget.withdraw()
        self.count("retry")
        return True


class _Request:
    __slots__ = ("ex", "attempt", "rewrite", "headers")

    def __init__(self, rewrite: Callable[[ResponseHead, Headers], Headers], headers: list) -> None:
        self.ex: Exchange | None = None
        self.attempt = 0
        self.rewrite = rewrite
        self.headers = headers

    def rewrite_response(self, resp: ResponseHead, headers: Headers) -> Headers:
        out = self.rewrite(resp, headers)
        out.append(self.headers[self.attempt])
        return out


async def policy_request(
    down: HttpConn,
    req: RequestHead,
    head: bytes,
    pool: Pool,
    pol: UpstreamPolicy,
    rewrite_response: Callable[[ResponseHead, Headers], Headers],
    *,
    on_release: Callable[[Pooled], None] | None = None,
    max_request_body: int | None = None,
    upgrades: UpgradeObserver | None = None,
) -> Exchange:
    c = pol.config.circuit
    if pol.active >= c.max_requests:
        pol.count("circuit_open")
        raise CircuitOpen(f"circuit open: {c.max_requests} requests in flight (max_requests)")
    if req.upgrade is not None:  # a switched connection: one attempt, as without a policy
        ep = await pol.balancer.pick()
        return await proxy_request(
            down,
            req,
            head,
            pool,
            ep.key,
            rewrite_response,
            on_release=on_release,
            max_request_body=max_request_body,
            timeouts=pol.timeouts,
            upgrades=upgrades,
        )
    st = _Request(rewrite_response, pol.headers)
    pol.active += 1
    try:
        limit = pol.config.timeouts.request
        if limit is None:
            return await _attempts(down, req, head, pool, pol, st, on_release, max_request_body)
        with trio.move_on_after(limit):
            return await _attempts(down, req, head, pool, pol, st, on_release, max_request_body)
        pol.count("request_timeout")
        if st.ex is not None and st.ex.response_started:
            raise ResponseStarted(f"request timeout ({limit:g}s) in the response body")
        raise UpstreamError(
            f"no response within the request timeout ({limit:g}s, {st.attempt} attempts)", 504
        )
    finally:
        pol.active -= 1


async def _read_body(down: HttpConn, t: Timeouts) -> bytes:
    """A whole (small, Content-Length) request body, read before the first attempt."""
    parts: list[bytes] = []
    try:
        while True:
            with trio.move_on_after(t.request_body) as scope:
                ev = await down.next_event()
            if scope.cancelled_caught:
                raise RequestBodyStalled(f"no request body bytes for {t.request_body:g}s")
            if type(ev) is Data:
                parts.append(ev.data)
            elif type(ev) is EndOfMessage:
                return b"".join(parts)
            else:
                raise DownstreamGone("client closed in the middle of the body")
    except ProtocolError as exc:
        raise DownstreamGone(str(exc)) from None
    except CONNECTION_ERRORS as exc:
        raise DownstreamGone(repr(exc)) from None


def _failure_kind(exc: UpstreamError) -> str:
    return "timeout" if exc.status == 504 else "reset"


async def _replay_body(
    down: HttpConn, req: RequestHead, pol: UpstreamPolicy, max_request_body: int | None
) -> tuple[bool, bytes | None]:
    """(whether the request may be sent again, its buffered body if it has one)."""
    idempotent = req.method in IDEMPOTENT
    if not request_has_body(req):
        return idempotent, None
    size = req.content_length or 0
    if not idempotent or req.chunked or size > pol.retries.buffer_bytes:
        return False, None  # streamed: never sent twice
    if max_request_body is not None and size > max_request_body:
        raise BodyTooLarge(f"request body larger than {max_request_body} bytes")
    return True, await _read_body(down, pol.timeouts)


def _hold(pol: UpstreamPolicy, st: _Request, replayable: bool) -> frozenset[int] | None:
    """The statuses to hold back for a retry in this attempt (None: the answer goes through)."""
    r = pol.retries
    if replayable and r.statuses and st.attempt < r.max_attempts and pol.budget.can_retry():
        return r.statuses
    return None


async def _acquire(
    pool: Pool, pol: UpstreamPolicy, ep: Endpoint, fresh: bool, st: _Request
) -> tuple[Pooled, bool] | None:
    """A connection to `ep`, or None when its dial failed and is retried."""
    c = pol.config.circuit
    if pol.pending >= c.max_pending:
        pol.count("circuit_open")
        raise CircuitOpen(
            f"circuit open: {c.max_pending} requests waiting for a connection (max_pending)"
        )
    pol.pending += 1
    try:
        return await pool.acquire(ep.key, fresh=fresh)
    except CircuitOpen:
        pol.count("circuit_open")
        raise
    except UpstreamError as exc:  # nothing was sent: any request may go again
        pol.outcome(ep, False)
        if pol.may_retry("connect-failure", st.attempt):
            return None
        raise _final(exc, st.attempt) from None
    finally:
        pol.pending -= 1


async def _attempts(
    down: HttpConn,
    req: RequestHead,
    head: bytes,
    pool: Pool,
    pol: UpstreamPolicy,
    st: _Request,
    on_release: Callable[[Pooled], None] | None,
    max_request_body: int | None,
) -> Exchange:
    pol.budget.deposit()
    replayable, body = await _replay_body(down, req, pol, max_request_body)
    stale_retry = replayable
    fresh = False
    ep: Endpoint | None = None
    while True:
        st.attempt += 1
        ep = await pol.balancer.pick(ep if st.attempt > 1 else None)
        hold = _hold(pol, st, replayable)
        got = await _acquire(pool, pol, ep, fresh, st)
        if got is None:
            continue
        p, reused = got
        fresh = False
        start = trio.current_time()
        ep.pending += 1
        ex = st.ex = Exchange()
        try:
            ex = await forward(
                down,
                req,
                head,
                p.conn,
                st.rewrite_response,
                exchange=ex,
                max_request_body=max_request_body,
                timeouts=pol.timeouts,
                hold=hold,
                body=body,
            )
        except UpstreamError as exc:
            await pool.discard(p)
            if reused and stale_retry:  # a stale keep-alive connection: once, outside the budget
                stale_retry, fresh = False, True
                st.attempt -= 1
                continue
            pol.outcome(ep, False)
            if replayable and pol.may_retry(_failure_kind(exc), st.attempt):
                continue
            raise _final(exc, st.attempt) from None
        except BaseException:
            await pool.discard(p)
            raise
        finally:
            ep.pending -= 1
        if await _settled(pol, ep, ex, start, hold, replayable, st):
            if on_release is not None:
                on_release(p)
            await pool.release(p, ex.upstream_reusable)
            return ex
        await pool.discard(p)


async def _settled(
    pol: UpstreamPolicy,
    ep: Endpoint,
    ex: Exchange,
    start: float,
    hold: frozenset[int] | None,
    replayable: bool,
    st: _Request,
) -> bool:
    """Record an answered attempt; False when its status was held back for a retry."""
    now = trio.current_time()
    ep.observe(now - start, now)
    pol.outcome(ep, ex.status not in GATEWAY_FAILURES)
    r = pol.retries
    if ex.held:
        pol.budget.withdraw()
        pol.count("retry")
        return False
    if hold is None and replayable and ex.status in r.statuses and st.attempt < r.max_attempts:
        pol.count("budget_exhausted")  # a retryable status went through: no budget left
    return True


def _final(exc: UpstreamError, attempts: int) -> UpstreamError:
    if attempts <= 1:
        return exc
    return UpstreamError(f"{exc} ({attempts} attempts)", exc.status)
