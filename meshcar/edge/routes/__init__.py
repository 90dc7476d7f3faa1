"""Edge routes, one type and one module per mode: terminate.py, bridge.py, passthrough.py
(l7.py holds the L7 settings terminate and bridge share; base.py the mode enum, the route
base type, the backend and the key description). `parse_route` dispatches on `mode`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from meshcar.common.config import Checker
from meshcar.edge.routes.base import (
    MODES,
    ROUTE,
    ROUTE_KEYS,
    Backend,
    ClientAuth,
    DenyRule,
    HealthCheck,
    Mode,
    RateLimit,
    Route,
)
from meshcar.edge.routes.bridge import BridgeRoute, parse_bridge
from meshcar.edge.routes.passthrough import PassthroughRoute, parse_passthrough
from meshcar.edge.routes.rules import parse_targets
from meshcar.edge.routes.terminate import TerminateRoute, parse_terminate

__all__ = [
    "MODES",
    "ROUTE",
    "Backend",
    "BridgeRoute",
    "ClientAuth",
    "DenyRule",
    "HealthCheck",
    "Mode",
    "PassthroughRoute",
    "RateLimit",
    "Route",
    "TerminateRoute",
    "parse_route",
]

# mode -> (route type, parser of the mode's own keys)
ROUTE_TYPES: dict[Mode, tuple[type[Route], Callable[[Checker, dict, str], dict[str, Any]]]] = {
    Mode.TERMINATE: (TerminateRoute, parse_terminate),
    Mode.BRIDGE: (BridgeRoute, parse_bridge),
    Mode.PASSTHROUGH: (PassthroughRoute, parse_passthrough),
}
_HOST = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?")  # a name or *.domain


def parse_route(c: Checker, raw: Any, i: int) -> Route | None:
    p = f"routes[{i}]"
    if not isinstance(raw, dict):
        c.bad(p, "must be a mapping")
        return None
    c.unknown(raw, p + ".", ROUTE_KEYS)
    host = raw.get("host")
    if not isinstance(host, str) or not _HOST.fullmatch(host or ""):
        c.bad(p + ".host", f"must be a lowercase host name or *.domain, got {host!r}")
        host = None
    mode = raw.get("mode")
    if mode not in MODES:
        c.bad(p + ".mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
        return None
    route_type, parse_own = ROUTE_TYPES[Mode(mode)]
    backend, split, rules = parse_targets(c, raw, p, host or "?", route_type.mode)
    kw = parse_own(c, raw, p)
    if host is None or backend is None:
        return None
    return route_type(host, backend, rules=rules, split=split, **kw)
