"""An upstream's traffic policy keys (timeouts, retries, outlier, circuit, dns_refresh_seconds):
their schema (common/schema.py) and their checker, which reports every problem with its key.

The behaviour is net/resilient.py's (with net/retry.py, net/outlier.py, net/balancer.py).
"""

from __future__ import annotations

from typing import Any

from meshcar.common.config import Checker
from meshcar.common.schema import ListOf, Section, key, number
from meshcar.net.outlier import OutlierPolicy
from meshcar.net.resilient import CircuitLimits, Resilience, UpstreamTimeouts
from meshcar.net.retry import RETRY_ON, RetryPolicy

_R = RetryPolicy()
_O = OutlierPolicy()
_C = CircuitLimits()

UPSTREAM_TIMEOUTS = Section(
    "Timeouts of this upstream, in seconds",
    {
        "connect_seconds": key(number(0.1, 3600), "TCP connect and TLS handshake, each", 5),
        "request_seconds": key(
            number(0.1, 86400), "the whole exchange, retries included (default: no limit)"
        ),
        "per_try_seconds": key(
            number(0.1, 86400),
            "the response head, per attempt (default: timeouts.response_head_seconds)",
        ),
        "idle_seconds": key(
            number(0.1, 3600),
            "a pooled connection's idle life (default: outbound.pool_idle_seconds)",
        ),
    },
)
RETRY_CONDITION: dict[str, Any] = {
    "anyOf": [
        {"enum": list(RETRY_ON) + ["5xx"]},
        {"type": "integer", "minimum": 500, "maximum": 599},
    ]
}
RETRIES = Section(
    "Retries of this upstream, within a budget (net/retry.py)",
    {
        "retry_on": key(
            ListOf(RETRY_CONDITION),
            "connect-failure, reset, timeout, 5xx or statuses (500-599)",
            ["connect-failure"],
        ),
        "max_attempts": key(number(1, 10, integer=True), "attempts in all", _R.max_attempts),
        "budget_ratio": key(number(0, 1), "retries per request in the window", _R.budget_ratio),
        "min_per_second": key(
            number(0, 10000), "retries per second allowed at any traffic", _R.min_per_second
        ),
        "window_seconds": key(number(1, 600), "the budget's window", _R.window_seconds),
        "buffer_bytes": key(
            number(0, 1024 * 1024, integer=True),
            "request bodies (Content-Length) up to this size are buffered, so they can be retried",
            _R.buffer_bytes,
        ),
    },
)
OUTLIER = Section(
    "Passive outlier detection (net/outlier.py)",
    {
        "consecutive_failures": key(
            number(0, 1000, integer=True),
            "gateway failures in a row that eject an endpoint (0: never)",
            _O.consecutive_failures,
        ),
        "base_ejection_seconds": key(
            number(0.1, 86400), "first ejection; doubles each time", _O.base_ejection_seconds
        ),
        "max_ejection_seconds": key(
            number(0.1, 86400), "longest ejection", _O.max_ejection_seconds
        ),
        "max_ejected_percent": key(
            number(0, 100), "at most this share of endpoints ejected", _O.max_ejected_percent
        ),
    },
)
CIRCUIT = Section(
    "Circuit breaking: over a limit, a fast 503",
    {
        "max_connections": key(
            number(1, 1_000_000, integer=True),
            "open connections (default: limits.max_upstream_connections)",
        ),
        "max_pending": key(
            number(1, 1_000_000, integer=True),
            "requests waiting for a new connection",
            _C.max_pending,
        ),
        "max_requests": key(
            number(1, 1_000_000, integer=True), "requests in flight", _C.max_requests
        ),
    },
)
TRAFFIC_KEYS = {
    "timeouts": key(UPSTREAM_TIMEOUTS, UPSTREAM_TIMEOUTS.doc),
    "retries": key(RETRIES, RETRIES.doc),
    "outlier": key(OUTLIER, OUTLIER.doc),
    "circuit": key(CIRCUIT, CIRCUIT.doc),
    "dns_refresh_seconds": key(
        number(0.1, 86400), "endpoints given as names are resolved again after", 5
    ),
}


def _num(
    c: Checker,
    raw: dict,
    name: str,
    p: str,
    lo: float,
    hi: float,
    default: Any,
    *,
    integer: bool = False,
) -> Any:
    if name not in raw:
        return default
    val = raw[name]
    ok_type = isinstance(val, int) if integer else isinstance(val, int | float)
    if isinstance(val, bool) or not ok_type or not (lo <= val <= hi):
        kind = "a whole number" if integer else "a number"
        c.bad(f"{p}.{name}", f"must be {kind} between {lo:g} and {int(hi) if hi >= 1 else hi}")
        return default
    return val if integer else float(val)


def _sub(c: Checker, raw: dict, name: str, p: str, section: Section) -> dict:
    val = raw.get(name)
    if val is None:
        return {}
    if not isinstance(val, dict):
        c.bad(f"{p}.{name}", "must be a mapping")
        return {}
    c.unknown(val, f"{p}.{name}.", section)
    return val


def _retry_on(c: Checker, raw: Any, p: str) -> tuple[frozenset[str], frozenset[int]]:
    if raw is None:
        return _R.retry_on, _R.statuses
    if not isinstance(raw, list):
        c.bad(p, "must be a list of connect-failure, reset, timeout, 5xx or statuses")
        return _R.retry_on, _R.statuses
    names: set[str] = set()
    statuses: set[int] = set()
    for i, item in enumerate(raw):
        if item in RETRY_ON:
            names.add(item)
        elif item == "5xx":
            statuses.update(range(500, 600))
        elif isinstance(item, int) and not isinstance(item, bool) and 500 <= item <= 599:
            statuses.add(item)
        else:
            c.bad(
                f"{p}[{i}]",
                f"{item!r} is not connect-failure, reset, timeout, 5xx or a status 500-599",
            )
    return frozenset(names), frozenset(statuses)


def parse_traffic(c: Checker, raw: dict, p: str) -> Resilience:
    """The traffic policy keys of the upstream mapping `raw` at key path `p`."""
    t = _sub(c, raw, "timeouts", p, UPSTREAM_TIMEOUTS)
    tp = p + ".timeouts"
    timeouts = UpstreamTimeouts(
        _num(c, t, "connect_seconds", tp, 0.1, 3600, 5.0),
        _num(c, t, "request_seconds", tp, 0.1, 86400, None),
        _num(c, t, "per_try_seconds", tp, 0.1, 86400, None),
        _num(c, t, "idle_seconds", tp, 0.1, 3600, None),
    )
    r = _sub(c, raw, "retries", p, RETRIES)
    rp = p + ".retries"
    retry_on, statuses = _retry_on(c, r.get("retry_on"), rp + ".retry_on")
    retries = RetryPolicy(
        retry_on,
        statuses,
        _num(c, r, "max_attempts", rp, 1, 10, _R.max_attempts, integer=True),
        _num(c, r, "budget_ratio", rp, 0, 1, _R.budget_ratio),
        _num(c, r, "min_per_second", rp, 0, 10000, _R.min_per_second),
        _num(c, r, "window_seconds", rp, 1, 600, _R.window_seconds),
        _num(c, r, "buffer_bytes", rp, 0, 1024 * 1024, _R.buffer_bytes, integer=True),
    )
    o = _sub(c, raw, "outlier", p, OUTLIER)
    op = p + ".outlier"
    outlier = OutlierPolicy(
        _num(c, o, "consecutive_failures", op, 0, 1000, _O.consecutive_failures, integer=True),
        _num(c, o, "base_ejection_seconds", op, 0.1, 86400, _O.base_ejection_seconds),
        _num(c, o, "max_ejection_seconds", op, 0.1, 86400, _O.max_ejection_seconds),
        _num(c, o, "max_ejected_percent", op, 0, 100, _O.max_ejected_percent),
    )
    if outlier.max_ejection_seconds < outlier.base_ejection_seconds:
        c.bad(op + ".max_ejection_seconds", "must not be less than base_ejection_seconds")
    b = _sub(c, raw, "circuit", p, CIRCUIT)
    bp = p + ".circuit"
    circuit = CircuitLimits(
        _num(c, b, "max_connections", bp, 1, 1_000_000, None, integer=True),
        _num(c, b, "max_pending", bp, 1, 1_000_000, _C.max_pending, integer=True),
        _num(c, b, "max_requests", bp, 1, 1_000_000, _C.max_requests, integer=True),
    )
    dns = _num(c, raw, "dns_refresh_seconds", p, 0.1, 86400, 5.0)
    return Resilience(timeouts, retries, outlier, circuit, dns)
