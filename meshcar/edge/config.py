"""Edge configuration: YAML in, frozen dataclasses out, every problem reported at once.

The format is documented in docs/EDGE.md. Each route names one host (the SNI and the Host
header), its mode (`terminate`, `bridge`, `passthrough`) and its backend; terminate and
bridge routes carry the L7 features.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meshcar.admin.paths import PUBLIC_PATHS, parse_public_paths
from meshcar.common.config import (
    ADMIN,
    DRAIN_SECONDS,
    HTTP,
    IDENTITY,
    LIMITS,
    LOG_LEVEL,
    TIMEOUTS,
    Checker,
    HostPort,
    HttpPolicy,
    IdentityConfig,
    parse_http,
    parse_identity,
)
from meshcar.common.schema import (
    BOOL,
    HOSTPORT,
    SPIFFE_ID,
    STRING,
    ListOf,
    MapOf,
    Section,
    key,
    number,
    one_of,
)
from meshcar.errors import ConfigError
from meshcar.net.forward import Timeouts
from meshcar.net.limits import Limits, parse_limits, parse_timeouts

MODES = ("terminate", "bridge", "passthrough")
_PATH = {"type": "string", "pattern": "^/"}

# The keys of the edge config (meshcar/common/schema.py): the checks below take the allowed
# keys of each section from here, and `meshcar config schema edge` renders them.
HEALTH = Section("Active health checks of the backend's endpoints", {
    "interval": key(number(0.05), "seconds between checks", 2.0),
    "timeout": key(number(0.01), "seconds a check may take", 1.0),
    "path": key({"type": "string"}, "HTTP path checked (L7 backends)", "/"),
    "fall": key(number(1, integer=True), "failures in a row that eject an endpoint", 2),
    "rise": key(number(1, integer=True), "successes in a row that readmit it", 1),
})
BACKEND = Section("Where a route's traffic goes", {
    "endpoints": key(ListOf(HOSTPORT, min_items=1), "HOST:PORT of each endpoint", required=True),
    "balance": key(one_of("round_robin", "least_connections"), "load balancing", "round_robin"),
    "spiffe_id": key(SPIFFE_ID, "bridge: the backend sidecar's identity"),
    "health": key(HEALTH, HEALTH.doc),
})
TLS = Section("The route's certificate (terminate and bridge)", {
    "cert": key(STRING, "certificate chain file (PEM)", required=True),
    "key": key(STRING, "private key file (PEM)", required=True),
})
RATE_LIMIT = Section("Per-client token bucket", {
    "per_second": key(number(0.001), "requests per second", required=True),
    "burst": key(number(1, integer=True), "bucket size", 1),
})
CLIENT_AUTH = Section("Client certificates on the public listener", {
    "mode": key(one_of("optional", "required"), "ask for or require a client certificate",
                required=True),
    "ca": key(STRING, "CA file client certificates must chain to", required=True),
})
ROUTE_HEADERS = Section("Request headers added or removed before the backend", {
    "add": key(MapOf({"type": "string", "pattern": "^[^\\r\\n]*$"}), "NAME: VALUE added", {}),
    "remove": key(ListOf({"type": "string"}), "header names removed", []),
})
DENY_HEADER = Section("A header that must match", {
    "name": key({"type": "string"}, "header name", required=True),
    "pattern": key({"type": "string"}, "regular expression searched in its values", required=True),
})
DENY = Section("A WAF rule: requests matching every given part are refused with 403", {
    "name": key({"type": "string"}, "rule name (logs, metrics)"),
    "methods": key(ListOf({"type": "string"}), "methods (any if empty)", []),
    "path": key({"type": "string"}, "regular expression searched in the path"),
    "header": key(DENY_HEADER, DENY_HEADER.doc),
})
ROUTE = Section("One host's route", {
    "host": key({"type": "string", "pattern": "^[a-z0-9*]([a-z0-9.-]*[a-z0-9])?$"},
                "the SNI and Host this route serves", required=True),
    "mode": key(one_of(*MODES), "terminate, bridge (mTLS to a sidecar) or passthrough (TCP)",
                required=True),
    "backend": key(BACKEND, BACKEND.doc, required=True),
    "tls": key(TLS, "terminate and bridge: the route's certificate"),
    "path_prefix": key(_PATH, "only paths with this prefix", "/"),
    "path_exact": key(_PATH, "only this path"),
    "hsts": key({"anyOf": [BOOL, {"type": "string", "pattern": "^max-age="}]},
                "true or a Strict-Transport-Security value"),
    "rate_limit": key(RATE_LIMIT, RATE_LIMIT.doc),
    "max_body_bytes": key(number(0, integer=True), "request bodies over this: 413"),
    "client_auth": key(CLIENT_AUTH, CLIENT_AUTH.doc),
    "headers": key(ROUTE_HEADERS, ROUTE_HEADERS.doc),
    "deny": key(ListOf(DENY), "WAF rules", []),
    "proxy_protocol": key(one_of("v1", "v2"), "passthrough: send a PROXY protocol header"),
    "source_address": key({"type": "string"}, "passthrough: local IP backend connections come from"),
})
LISTEN = Section("The public listeners", {
    "https": key(HOSTPORT, "HOST:PORT of the TLS listener", required=True),
    "http": key(HOSTPORT, "HOST:PORT of the plain-HTTP listener (redirects to https)"),
})
EDGE = Section("meshcar edge configuration (docs/EDGE.md)", {
    "listen": key(LISTEN, LISTEN.doc, required=True),
    "admin": key(ADMIN, ADMIN.doc, required=True),
    "routes": key(ListOf(ROUTE, min_items=1), "one route per host", required=True),
    "identity": key(IDENTITY, "the edge's mesh identity (needed by bridge routes)"),
    "trusted_hops": key(number(0, integer=True), "proxies in front whose X-Forwarded-For is kept", 0),
    "default_route": key({"type": "string"}, "host of the route for a missing or unknown SNI"),
    "log_level": LOG_LEVEL,
    "hello_timeout": key(number(exclusive_minimum=0), "seconds for the ClientHello", 10.0),
    "handshake_timeout": key(number(exclusive_minimum=0), "seconds for the TLS handshake", 10.0),
    "pool_idle_seconds": key(number(0.1, 3600), "idle pooled backend connections closed after", 30.0),
    "drain_seconds": DRAIN_SECONDS,
    "timeouts": key(TIMEOUTS, TIMEOUTS.doc),
    "limits": key(LIMITS, LIMITS.doc),
    "http": key(HTTP, HTTP.doc),
})


@dataclass(frozen=True)
class HealthCheck:
    interval: float = 2.0
    timeout: float = 1.0
    path: str = "/"  # L7 backends; passthrough backends get a TCP connect
    fall: int = 2  # failures in a row that eject an endpoint
    rise: int = 1  # successes in a row that readmit it


@dataclass(frozen=True)
class Backend:
    endpoints: tuple[HostPort, ...]
    balance: str = "round_robin"  # or least_connections
    spiffe_id: str | None = None  # bridge: the backend sidecar's identity
    health: HealthCheck | None = None


@dataclass(frozen=True)
class DenyRule:
    methods: tuple[str, ...] = ()
    path: re.Pattern[str] | None = None
    header: tuple[str, re.Pattern[str]] | None = None
    name: str = "deny"

    def matches(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.path is not None and not self.path.search(path):
            return False
        if self.header is not None:
            hname, pattern = self.header
            values = [v.decode("latin-1") for k, v in headers if k.decode("latin-1").lower() == hname]
            if not any(pattern.search(v) for v in values):
                return False
        return True


@dataclass(frozen=True)
class RateLimit:
    per_second: float
    burst: int


@dataclass(frozen=True)
class ClientAuth:
    mode: str  # optional | required
    ca_file: Path


@dataclass(frozen=True)
class Route:
    host: str
    mode: str
    backend: Backend
    cert_file: Path | None = None
    key_file: Path | None = None
    path_prefix: str = "/"
    path_exact: str | None = None
    hsts: str | None = None  # the header value, e.g. "max-age=31536000"
    rate_limit: RateLimit | None = None
    max_body_bytes: int | None = None
    client_auth: ClientAuth | None = None
    add_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    deny: tuple[DenyRule, ...] = ()
    proxy_protocol: str | None = None  # passthrough: v1 | v2
    source_address: str | None = None  # passthrough: the local address backend connections come from

    def path_matches(self, path: str) -> bool:
        if self.path_exact is not None:
            return path == self.path_exact
        return path.startswith(self.path_prefix)


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

    def route_for(self, host: str | None) -> Route | None:
        if host is not None:
            for r in self.routes:
                if r.host == host:
                    return r
        if self.default_route is not None:
            for r in self.routes:
                if r.host == self.default_route:
                    return r
        return None


def _number(c: Checker, val: Any, path: str, *, minimum: float, integer: bool = False) -> Any:
    ok = not isinstance(val, bool) and isinstance(val, int if integer else int | float) and val >= minimum
    if not ok:
        c.bad(path, f"must be {'an integer' if integer else 'a number'} >= {minimum:g}")
        return None
    return val


def _regex(c: Checker, val: Any, path: str) -> re.Pattern[str] | None:
    if not isinstance(val, str):
        c.bad(path, "must be a regular expression string")
        return None
    try:
        return re.compile(val)
    except re.error as exc:
        c.bad(path, f"invalid regular expression: {exc}")
        return None


def _backend(c: Checker, raw: Any, p: str, mode: str) -> Backend | None:
    if not isinstance(raw, dict):
        c.bad(p, "must be a mapping with endpoints")
        return None
    c.unknown(raw, p + ".", BACKEND)
    eps = c.hostports(raw.get("endpoints"), p + ".endpoints", required=True)
    balance = raw.get("balance", "round_robin")
    if balance not in ("round_robin", "least_connections"):
        c.bad(p + ".balance", "must be round_robin or least_connections")
    sid = None
    if mode == "bridge":
        sid = c.spiffe(raw.get("spiffe_id"), p + ".spiffe_id")
    elif raw.get("spiffe_id") is not None:
        c.bad(p + ".spiffe_id", "only bridge routes talk mTLS to a sidecar")
    health = None
    h = raw.get("health")
    if h is not None:
        if not isinstance(h, dict):
            c.bad(p + ".health", "must be a mapping")
        else:
            c.unknown(h, p + ".health.", HEALTH)
            health = HealthCheck(
                interval=_number(c, h.get("interval", 2.0), p + ".health.interval", minimum=0.05) or 2.0,
                timeout=_number(c, h.get("timeout", 1.0), p + ".health.timeout", minimum=0.01) or 1.0,
                path=str(h.get("path", "/")),
                fall=_number(c, h.get("fall", 2), p + ".health.fall", minimum=1, integer=True) or 2,
                rise=_number(c, h.get("rise", 1), p + ".health.rise", minimum=1, integer=True) or 1,
            )
    if not eps:
        return None
    return Backend(tuple(eps), balance, sid, health)


ROUTE_KEYS = ROUTE.names()


def _route(c: Checker, raw: Any, i: int) -> Route | None:
    p = f"routes[{i}]"
    if not isinstance(raw, dict):
        c.bad(p, "must be a mapping")
        return None
    c.unknown(raw, p + ".", ROUTE_KEYS)
    host = raw.get("host")
    if not isinstance(host, str) or not re.fullmatch(r"[a-z0-9*]([a-z0-9.-]*[a-z0-9])?", host or ""):
        c.bad(p + ".host", f"must be a lowercase host name, got {host!r}")
        host = None
    mode = raw.get("mode")
    if mode not in MODES:
        c.bad(p + ".mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
        return None
    backend = _backend(c, raw.get("backend"), p + ".backend", mode)
    kw: dict[str, Any] = {}
    if mode == "passthrough":
        for k in ROUTE_KEYS - {"host", "mode", "backend", "proxy_protocol", "source_address"}:
            if k in raw:
                c.bad(f"{p}.{k}", "passthrough routes never decrypt: L7 settings do not apply")
        pp = raw.get("proxy_protocol")
        if pp not in (None, "v1", "v2"):
            c.bad(p + ".proxy_protocol", "must be v1 or v2")
        kw["proxy_protocol"] = pp
        src = raw.get("source_address")
        if src is not None:
            try:
                kw["source_address"] = str(ipaddress.ip_address(src))
            except ValueError:
                c.bad(p + ".source_address", f"must be an IP address of this host, got {src!r}")
    else:
        if "proxy_protocol" in raw:
            c.bad(p + ".proxy_protocol", "only passthrough routes send a PROXY header")
        if "source_address" in raw:
            c.bad(p + ".source_address", "only passthrough routes set their backend source address")
        tls = raw.get("tls")
        if not isinstance(tls, dict):
            c.bad(p + ".tls", "terminate and bridge routes need tls: {cert, key}")
        else:
            c.unknown(tls, p + ".tls.", TLS)
            kw["cert_file"] = c.path(tls, "cert", p + ".tls.cert")
            kw["key_file"] = c.path(tls, "key", p + ".tls.key")
        if "path_prefix" in raw:
            if not isinstance(raw["path_prefix"], str) or not raw["path_prefix"].startswith("/"):
                c.bad(p + ".path_prefix", "must start with /")
            else:
                kw["path_prefix"] = raw["path_prefix"]
        if "path_exact" in raw:
            if not isinstance(raw["path_exact"], str) or not raw["path_exact"].startswith("/"):
                c.bad(p + ".path_exact", "must start with /")
            else:
                kw["path_exact"] = raw["path_exact"]
        hsts = raw.get("hsts")
        if hsts is True:
            kw["hsts"] = "max-age=31536000; includeSubDomains"
        elif isinstance(hsts, str) and hsts.startswith("max-age="):
            kw["hsts"] = hsts
        elif hsts not in (None, False):
            c.bad(p + ".hsts", "must be true or a Strict-Transport-Security value (max-age=...)")
        rl = raw.get("rate_limit")
        if rl is not None:
            if not isinstance(rl, dict):
                c.bad(p + ".rate_limit", "must be {per_second, burst}")
            else:
                c.unknown(rl, p + ".rate_limit.", RATE_LIMIT)
                ps = _number(c, rl.get("per_second"), p + ".rate_limit.per_second", minimum=0.001)
                burst = _number(c, rl.get("burst", 1), p + ".rate_limit.burst", minimum=1, integer=True)
                if ps and burst:
                    kw["rate_limit"] = RateLimit(float(ps), int(burst))
        if "max_body_bytes" in raw:
            kw["max_body_bytes"] = _number(c, raw["max_body_bytes"], p + ".max_body_bytes", minimum=0,
                                           integer=True)
        ca = raw.get("client_auth")
        if ca is not None:
            if not isinstance(ca, dict) or ca.get("mode") not in ("optional", "required"):
                c.bad(p + ".client_auth", "must be {mode: optional|required, ca: FILE}")
            else:
                c.unknown(ca, p + ".client_auth.", CLIENT_AUTH)
                ca_file = c.path(ca, "ca", p + ".client_auth.ca")
                if ca_file is not None:
                    kw["client_auth"] = ClientAuth(ca["mode"], ca_file)
        hdrs = raw.get("headers")
        if hdrs is not None:
            if not isinstance(hdrs, dict):
                c.bad(p + ".headers", "must be {add: {NAME: VALUE}, remove: [NAME]}")
            else:
                c.unknown(hdrs, p + ".headers.", ROUTE_HEADERS)
                add = hdrs.get("add", {}) or {}
                if not isinstance(add, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) and "\n" not in v and "\r" not in v
                        for k, v in add.items()):
                    c.bad(p + ".headers.add", "must map header names to single-line strings")
                else:
                    kw["add_headers"] = tuple(add.items())
                rem = hdrs.get("remove", []) or []
                if not isinstance(rem, list) or not all(isinstance(x, str) for x in rem):
                    c.bad(p + ".headers.remove", "must be a list of header names")
                else:
                    kw["remove_headers"] = tuple(x.lower() for x in rem)
        deny = raw.get("deny", []) or []
        rules: list[DenyRule] = []
        if not isinstance(deny, list):
            c.bad(p + ".deny", "must be a list of rules")
        else:
            for j, d in enumerate(deny):
                dp = f"{p}.deny[{j}]"
                if not isinstance(d, dict) or not d:
                    c.bad(dp, "must be a mapping with methods, path and/or header")
                    continue
                c.unknown(d, dp + ".", DENY)
                methods = d.get("methods", [])
                if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
                    c.bad(dp + ".methods", "must be a list of methods")
                    methods = []
                path_re = _regex(c, d["path"], dp + ".path") if "path" in d else None
                header = None
                if "header" in d:
                    hd = d["header"]
                    if not isinstance(hd, dict) or "name" not in hd or "pattern" not in hd:
                        c.bad(dp + ".header", "must be {name, pattern}")
                    else:
                        c.unknown(hd, dp + ".header.", DENY_HEADER)
                        pat = _regex(c, hd["pattern"], dp + ".header.pattern")
                        if pat is not None:
                            header = (str(hd["name"]).lower(), pat)
                rules.append(DenyRule(tuple(m.upper() for m in methods), path_re, header,
                                      str(d.get("name", f"deny[{j}]"))))
        kw["deny"] = tuple(rules)
    if host is None or backend is None:
        return None
    return Route(host, mode, backend, **kw)


def parse_edge_config(data: Any, source: str = "<config>", base_dir: Path | None = None) -> EdgeConfig:
    c = Checker(source, base_dir or Path.cwd())
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping"])
    c.unknown(data, "", EDGE)
    http_policy = parse_http(c, data.get("http"))
    listen = c.section(data, "listen")
    c.unknown(listen, "listen.", LISTEN)
    https = c.hostport(listen.get("https"), "listen.https") if "listen" in data else None
    http = c.hostport(listen["http"], "listen.http") if listen.get("http") is not None else None
    admin = c.section(data, "admin")
    admin_listen = c.hostport(admin.get("listen"), "admin.listen") if "admin" in data else None
    c.unknown(admin, "admin.", ADMIN)
    public_paths, why = parse_public_paths(admin.get("public_paths", sorted(p.decode() for p in PUBLIC_PATHS)))
    for w in why:
        c.bad("admin.public_paths", w)
    routes: list[Route] = []
    raw_routes = data.get("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        c.bad("routes", "must be a non-empty list")
    else:
        seen: set[str] = set()
        for i, r in enumerate(raw_routes):
            route = _route(c, r, i)
            if route is None:
                continue
            if route.host in seen:
                c.bad(f"routes[{i}].host", f"{route.host} has two routes")
            seen.add(route.host)
            routes.append(route)
    identity = parse_identity(c, data) if "identity" in data else None
    net_timeouts = parse_timeouts(data.get("timeouts"), c.bad)
    net_limits = parse_limits(data.get("limits"), c.bad)
    if any(r.mode == "bridge" for r in routes) and "identity" not in data:
        c.bad("identity", "bridge routes need the edge's mesh identity")
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
    timeouts: dict[str, float] = {}
    for name in ("hello_timeout", "handshake_timeout"):
        value = data.get(name, 10.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            c.bad(name, "must be a number of seconds > 0")
            value = 10.0
        timeouts[name] = float(value)
    pool_idle = data.get("pool_idle_seconds", 30.0)
    if isinstance(pool_idle, bool) or not isinstance(pool_idle, int | float) or not (0.1 <= pool_idle <= 3600):
        c.bad("pool_idle_seconds", "must be a number of seconds between 0.1 and 3600")
        pool_idle = 30.0
    drain = data.get("drain_seconds", 10)
    if isinstance(drain, bool) or not isinstance(drain, int | float) or not (0 <= drain <= 3600):
        c.bad("drain_seconds", "must be a number of seconds between 0 and 3600")
        drain = 10
    if c.problems:
        raise ConfigError(c.problems)
    assert https and admin_listen
    return EdgeConfig(https, http, admin_listen, tuple(routes), identity, hops, default, level,
                      hello_timeout=timeouts["hello_timeout"],
                      handshake_timeout=timeouts["handshake_timeout"],
                      admin_public_paths=PUBLIC_PATHS if public_paths is None else public_paths,
                      pool_idle_seconds=float(pool_idle), timeouts=net_timeouts, limits=net_limits, http=http_policy,
                      drain_seconds=float(drain))


def load_edge_config(path: Path) -> EdgeConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    return parse_edge_config(data, str(path), path.parent)
