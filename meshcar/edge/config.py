"""Edge configuration: YAML in, frozen dataclasses out, every problem reported at once.

The format is documented in docs/EDGE.md. Each route names one host (the SNI and the Host
header), its mode (`terminate`, `bridge`, `passthrough`) and its backend; terminate and
bridge routes carry the L7 features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshcar.admin.paths import PUBLIC_PATHS
from meshcar.common.config import (
    ACCESS_LOG,
    ADMIN,
    DRAIN_SECONDS,
    HTTP,
    IDENTITY,
    LIMITS,
    LOG_LEVEL,
    RELOAD,
    TIMEOUTS,
    WORKERS_KEY,
    Checker,
    HostPort,
    HttpPolicy,
    IdentityConfig,
    load_yaml,
    parse_access_log,
    parse_admin,
    parse_http,
    parse_identity,
    parse_reload,
    parse_workers,
    top_level,
)
from meshcar.common.schema import HOSTPORT, ListOf, Section, key, number
from meshcar.edge.routes import (  # noqa: F401 (re-exported: the route types)
    MODES,
    ROUTE,
    Backend,
    BridgeRoute,
    ClientAuth,
    DenyRule,
    HealthCheck,
    Mode,
    PassthroughRoute,
    RateLimit,
    Route,
    TerminateRoute,
    parse_route,
)
from meshcar.edge.routes.match import find_host, host_table
from meshcar.errors import ConfigError
from meshcar.net.forward import Timeouts
from meshcar.net.limits import Limits, parse_limits, parse_timeouts

# The keys of the edge config (meshcar/common/schema.py): the checks take the allowed keys of
# each section from here, and `meshcar config schema edge` renders them. A route's keys are in
# routes/base.py.
LISTEN = Section(
    "The public listeners",
    {
        "https": key(HOSTPORT, "HOST:PORT of the TLS listener", required=True),
        "http": key(HOSTPORT, "HOST:PORT of the plain-HTTP listener (redirects to https)"),
    },
)
EDGE = Section(
    "meshcar edge configuration (docs/EDGE.md)",
    {
        "listen": key(LISTEN, LISTEN.doc, required=True),
        "admin": key(ADMIN, ADMIN.doc, required=True),
        "routes": key(ListOf(ROUTE, min_items=1), "one route per host or *.domain", required=True),
        "identity": key(IDENTITY, "the edge's mesh identity (needed by bridge routes)"),
        "trusted_hops": key(
            number(0, integer=True), "proxies in front whose X-Forwarded-For is kept", 0
        ),
        "default_route": key({"type": "string"}, "host of the route for a missing or unknown SNI"),
        "log_level": LOG_LEVEL,
        "hello_timeout": key(number(exclusive_minimum=0), "seconds for the ClientHello", 10.0),
        "handshake_timeout": key(
            number(exclusive_minimum=0), "seconds for the TLS handshake", 10.0
        ),
        "pool_idle_seconds": key(
            number(0.1, 3600), "idle pooled backend connections closed after", 30.0
        ),
        "drain_seconds": DRAIN_SECONDS,
        "workers": WORKERS_KEY,
        "access_log": key(ACCESS_LOG, ACCESS_LOG.doc),
        "reload": key(RELOAD, RELOAD.doc),
        "timeouts": key(TIMEOUTS, TIMEOUTS.doc),
        "limits": key(LIMITS, LIMITS.doc),
        "http": key(HTTP, HTTP.doc),
    },
)


@dataclass(frozen=True)
class EdgeConfig:
    https_listen: HostPort
    http_listen: HostPort | None
    admin_listen: HostPort
    routes: tuple[Route, ...]
    identity: IdentityConfig | None  # needed by bridge routes
    trusted_hops: int = 0
    default_route: str | None = None  # host of the route for a missing/unknown SNI
    log_level: str = "info"
    hello_timeout: float = 10.0
    handshake_timeout: float = 10.0
    admin_public_paths: frozenset[bytes] = PUBLIC_PATHS  # served off loopback (admin/paths.py)
    pool_idle_seconds: float = 30.0  # an idle pooled backend connection is closed after this
    drain_seconds: float = 10.0  # on SIGTERM: how long requests in flight may finish (net/shell.py)
    timeouts: Timeouts = Timeouts()  # head, body, write and idle progress (net/forward.py)
    limits: Limits = Limits()  # connections per listener and per route backend (net/limits.py)
    http: HttpPolicy = HttpPolicy()  # request-target normalisation and header policy
    workers: int = 1  # worker processes (net/workers.py); 1: this process serves everything
    access_log_fields: tuple[str, ...] | None = None  # access_log.fields (None: all)
    reload_watch_seconds: float = 0.0  # reload.watch_seconds (common/reload.py); 0: off

    def route_for(self, host: str | None) -> Route | None:
        """The route of an SNI or Host name: exact, else the most specific *.domain route
        (edge/routes/match.py), else default_route."""
        if host is not None:
            table = self.__dict__.get("_hosts")
            if table is None:
                table = host_table(r.host for r in self.routes)
                object.__setattr__(self, "_hosts", table)  # once; frozen otherwise
            i = find_host(table, host)
            if i is not None:
                return self.routes[i]
        if self.default_route is not None:
            for r in self.routes:
                if r.host == self.default_route:
                    return r
        return None


def _listen(c: Checker, data: dict) -> tuple[HostPort | None, HostPort | None]:
    listen = c.section(data, "listen")
    c.unknown(listen, "listen.", LISTEN)
    https = c.hostport(listen.get("https"), "listen.https") if "listen" in data else None
    http = c.hostport(listen["http"], "listen.http") if listen.get("http") is not None else None
    return https, http


def _routes(c: Checker, data: dict) -> list[Route]:
    routes: list[Route] = []
    raw_routes = data.get("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        c.bad("routes", "must be a non-empty list")
        return routes
    seen: set[str] = set()
    for i, r in enumerate(raw_routes):
        route = parse_route(c, r, i)
        if route is None:
            continue
        if route.host in seen:
            c.bad(f"routes[{i}].host", f"{route.host} has two routes")
        seen.add(route.host)
        routes.append(route)
    return routes


def _seconds(
    c: Checker, data: dict, name: str, default: float, ok: Callable[[float], bool], msg: str
) -> float:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
        c.bad(name, msg)
        return float(default)
    return float(value)


def _scalars(c: Checker, data: dict, routes: list[Route]) -> dict[str, Any]:
    """The top-level scalar keys, as EdgeConfig keyword arguments."""
    hops = data.get("trusted_hops", 0)
    if isinstance(hops, bool) or not isinstance(hops, int) or hops < 0:
        c.bad("trusted_hops", "must be an integer >= 0")
        hops = 0
    default = data.get("default_route")
    if default is not None and default not in {r.host for r in routes}:
        c.bad("default_route", f"{default!r} is not the host of a route")
    level = data.get("log_level", "info")
    if level not in ("debug", "info", "warning", "error"):
        c.bad("log_level", "must be one of debug, info, warning, error")
    out: dict[str, Any] = {"trusted_hops": hops, "default_route": default, "log_level": level}
    for name in ("hello_timeout", "handshake_timeout"):
        out[name] = _seconds(
            c, data, name, 10.0, lambda v: v > 0, "must be a number of seconds > 0"
        )
    out["pool_idle_seconds"] = _seconds(
        c,
        data,
        "pool_idle_seconds",
        30.0,
        lambda v: 0.1 <= v <= 3600,
        "must be a number of seconds between 0.1 and 3600",
    )
    out["drain_seconds"] = _seconds(
        c,
        data,
        "drain_seconds",
        10,
        lambda v: 0 <= v <= 3600,
        "must be a number of seconds between 0 and 3600",
    )
    out["workers"] = parse_workers(c, data)
    out["access_log_fields"] = parse_access_log(c, data)
    out["reload_watch_seconds"] = parse_reload(c, data)
    return out


def parse_edge_config(
    data: Any, source: str = "<config>", base_dir: Path | None = None
) -> EdgeConfig:
    c = top_level(data, source, base_dir, EDGE)
    http_policy = parse_http(c, data.get("http"))
    https, http = _listen(c, data)
    admin_listen, public_paths = parse_admin(c, data)
    routes = _routes(c, data)
    identity = parse_identity(c, data) if "identity" in data else None
    net_timeouts = parse_timeouts(data.get("timeouts"), c.bad)
    net_limits = parse_limits(data.get("limits"), c.bad)
    if any(r.mode is Mode.BRIDGE for r in routes) and "identity" not in data:
        c.bad("identity", "bridge routes need the edge's mesh identity")
    scalars = _scalars(c, data, routes)
    if c.problems:
        raise ConfigError(c.problems)
    assert https and admin_listen
    return EdgeConfig(
        https,
        http,
        admin_listen,
        tuple(routes),
        identity,
        **scalars,
        admin_public_paths=PUBLIC_PATHS if public_paths is None else public_paths,
        timeouts=net_timeouts,
        limits=net_limits,
        http=http_policy,
    )


def load_edge_config(path: Path) -> EdgeConfig:
    return parse_edge_config(load_yaml(path), str(path), path.parent)
