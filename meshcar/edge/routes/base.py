"""What every edge route has, whatever its mode: the mode enum, the route base type, the
backend section, and the key description of a route (meshcar/common/schema.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from meshcar.common.config import Checker, HostPort
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
from meshcar.common.traffic import CIRCUIT, OUTLIER, RETRIES, UPSTREAM_TIMEOUTS
from meshcar.edge.routes.match import RouteRule, Split
from meshcar.net.resilient import Resilience


class Mode(StrEnum):
    """An edge route's mode. A str: it compares, logs and labels metrics as its value."""

    TERMINATE = "terminate"  # TLS ends at the edge, plain HTTP to the backend
    BRIDGE = "bridge"  # TLS ends at the edge, mTLS to the backend's sidecar
    PASSTHROUGH = "passthrough"  # TCP: the backend terminates the client's TLS


MODES = tuple(m.value for m in Mode)
_PATH = {"type": "string", "pattern": "^/"}

HEALTH = Section(
    "Active health checks of the backend's endpoints",
    {
        "interval": key(number(0.05), "seconds between checks", 2.0),
        "timeout": key(number(0.01), "seconds a check may take", 1.0),
        "path": key({"type": "string"}, "HTTP path checked (L7 backends)", "/"),
        "fall": key(number(1, integer=True), "failures in a row that eject an endpoint", 2),
        "rise": key(number(1, integer=True), "successes in a row that readmit it", 1),
    },
)
BACKEND = Section(
    "Where a route's traffic goes",
    {
        "endpoints": key(
            ListOf(HOSTPORT, min_items=1), "HOST:PORT of each endpoint", required=True
        ),
        "balance": key(one_of("round_robin", "least_connections"), "load balancing", "round_robin"),
        "spiffe_id": key(SPIFFE_ID, "bridge: the backend sidecar's identity"),
        "health": key(HEALTH, HEALTH.doc),
    },
)
TLS = Section(
    "The route's certificate (terminate and bridge)",
    {
        "cert": key(STRING, "certificate chain file (PEM)", required=True),
        "key": key(STRING, "private key file (PEM)", required=True),
    },
)
RATE_LIMIT = Section(
    "Per-client token bucket",
    {
        "per_second": key(number(0.001), "requests per second", required=True),
        "burst": key(number(1, integer=True), "bucket size", 1),
    },
)
CLIENT_AUTH = Section(
    "Client certificates on the public listener",
    {
        "mode": key(
            one_of("optional", "required"), "ask for or require a client certificate", required=True
        ),
        "ca": key(STRING, "CA file client certificates must chain to", required=True),
    },
)
ROUTE_HEADERS = Section(
    "Request headers added or removed before the backend",
    {
        "add": key(MapOf({"type": "string", "pattern": "^[^\\r\\n]*$"}), "NAME: VALUE added", {}),
        "remove": key(ListOf({"type": "string"}), "header names removed", []),
    },
)
DENY_HEADER = Section(
    "A header that must match",
    {
        "name": key({"type": "string"}, "header name", required=True),
        "pattern": key(
            {"type": "string"}, "regular expression searched in its values", required=True
        ),
    },
)
DENY = Section(
    "A WAF rule: requests matching every given part are refused with 403",
    {
        "name": key({"type": "string"}, "rule name (logs, metrics)"),
        "methods": key(ListOf({"type": "string"}), "methods (any if empty)", []),
        "path": key({"type": "string"}, "regular expression searched in the path"),
        "header": key(DENY_HEADER, DENY_HEADER.doc),
    },
)
SPLIT_BACKEND = Section(
    "A backend of a weighted split (canaries): its share of the requests, then as backend",
    {"weight": key(number(0, 1000000, integer=True), "relative share (0: no traffic)", 1)}
    | dict(BACKEND.keys),
)
HEADER_MATCH = Section(
    "A request header that must be present, equal value, or match pattern",
    {
        "name": key(STRING, "header name", required=True),
        "value": key({"type": "string"}, "the exact value (surrounding spaces dropped)"),
        "pattern": key({"type": "string"}, "regular expression searched in its values"),
    },
)
MATCH = Section(
    "What a request must be for a rule to take it (every given part; the normalised path)",
    {
        "path_prefix": key(_PATH, "paths starting with this"),
        "path_exact": key(_PATH, "this path only"),
        "path_regex": key({"type": "string"}, "a regular expression the whole path matches"),
        "methods": key(ListOf(STRING), "methods (any if empty)", []),
        "headers": key(ListOf(HEADER_MATCH), "headers that must match (all of them)", []),
    },
)
RULE = Section(
    "A route rule: requests it matches go to its backend or weighted split",
    {
        "match": key(MATCH, MATCH.doc, required=True),
        "backend": key(BACKEND, "where matching requests go (or backends)"),
        "backends": key(ListOf(SPLIT_BACKEND, min_items=1), "a weighted split (or backend)"),
    },
)
ROUTE_TIMEOUTS = Section(
    "terminate, bridge: this route's timeouts in seconds, as an upstream's "
    "(default: the timeouts section)",
    dict(UPSTREAM_TIMEOUTS.keys),
)
ROUTE = Section(
    "One host's route",
    {
        "host": key(
            {"type": "string", "pattern": "^(\\*\\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?$"},
            "the SNI and Host this route serves: a name, or *.domain (any name below it; "
            "the exact name wins, then the longest wildcard)",
            required=True,
        ),
        "mode": key(
            one_of(*MODES),
            "terminate, bridge (mTLS to a sidecar) or passthrough (TCP)",
            required=True,
        ),
        "backend": key(BACKEND, BACKEND.doc + " (or backends)"),
        "backends": key(
            ListOf(SPLIT_BACKEND, min_items=1),
            "terminate, bridge: a weighted split across backends (canaries), instead of backend",
        ),
        "rules": key(
            ListOf(RULE),
            "terminate, bridge: first match by path, method, headers picks the backend; "
            "none: the route's own path and backend",
            [],
        ),
        "tls": key(TLS, "terminate and bridge: the route's certificate"),
        "path_prefix": key(_PATH, "only paths with this prefix", "/"),
        "path_exact": key(_PATH, "only this path"),
        "hsts": key(
            {"anyOf": [BOOL, {"type": "string", "pattern": "^max-age="}]},
            "true or a Strict-Transport-Security value",
        ),
        "http2": key(
            BOOL,
            "terminate, bridge: offer h2 by ALPN besides http/1.1 (docs/PROTOCOLS.md)",
            False,
        ),
        "rate_limit": key(RATE_LIMIT, RATE_LIMIT.doc),
        "max_body_bytes": key(number(0, integer=True), "request bodies over this: 413"),
        "timeouts": key(ROUTE_TIMEOUTS, ROUTE_TIMEOUTS.doc),
        "retries": key(RETRIES, "terminate, bridge: " + RETRIES.doc),
        "outlier": key(OUTLIER, "terminate, bridge: " + OUTLIER.doc),
        "circuit": key(CIRCUIT, "terminate, bridge: " + CIRCUIT.doc),
        "client_auth": key(CLIENT_AUTH, CLIENT_AUTH.doc),
        "headers": key(ROUTE_HEADERS, ROUTE_HEADERS.doc),
        "deny": key(ListOf(DENY), "WAF rules", []),
        "proxy_protocol": key(one_of("v1", "v2"), "passthrough: send a PROXY protocol header"),
        "source_address": key(
            {"type": "string"}, "passthrough: local IP backend connections come from"
        ),
    },
)
ROUTE_KEYS = ROUTE.names()


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
            return self._header_matches(headers)
        return True

    def _header_matches(self, headers: list[tuple[bytes, bytes]]) -> bool:
        assert self.header is not None
        hname, pattern = self.header
        values = [v.decode("latin-1") for k, v in headers if k.decode("latin-1").lower() == hname]
        return any(pattern.search(v) for v in values)


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
    """A route; its type is its mode (TerminateRoute, BridgeRoute, PassthroughRoute in the
    modules beside this one). Every route has every attribute the proxy reads: those its mode
    does not accept stay at their defaults (a passthrough route serves every path and has no
    L7 features; only a passthrough route has a PROXY header or source address)."""

    mode: ClassVar[Mode]
    host: str
    backend: Backend
    cert_file: Path | None = None
    key_file: Path | None = None
    path_prefix: str = "/"
    path_exact: str | None = None
    hsts: str | None = None  # the header value, e.g. "max-age=31536000"
    http2: bool = False  # offer h2 by ALPN (edge/h2.py)
    rate_limit: RateLimit | None = None
    max_body_bytes: int | None = None
    per_try_timeout: float | None = None  # timeouts.per_try_seconds (the response head)
    request_timeout: float | None = None  # timeouts.request_seconds (the whole exchange)
    client_auth: ClientAuth | None = None
    add_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    deny: tuple[DenyRule, ...] = ()
    proxy_protocol: str | None = None  # passthrough: v1 | v2
    source_address: str | None = (
        None  # passthrough: the local address backend connections come from
    )
    rules: tuple[RouteRule, ...] = ()  # first match picks the split (routes/match.py)
    split: Split | None = None  # `backends:` (weighted); None: `backend`, keyed by host
    # timeouts.connect/idle, retries, outlier, circuit (net/resilient.py); None: none given
    traffic: Resilience | None = None

    def path_matches(self, path: str) -> bool:
        if self.path_exact is not None:
            return path == self.path_exact
        return path.startswith(self.path_prefix)

    @property
    def default_split(self) -> Split:
        if self.split is None:  # one backend, keyed by the host (as before splits)
            object.__setattr__(self, "split", Split((self.host,), (self.backend,), (1,)))
        assert self.split is not None
        return self.split

    def select(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Split | None:
        """The split this request goes to: the first rule it matches, else the route's own
        (None: the route's path does not match either: 404)."""
        for rule in self.rules:
            if rule.match.matches(method, path, headers):
                return rule.split
        return self.default_split if self.path_matches(path) else None

    def targets(self) -> list[tuple[str, Backend]]:
        """Every (balancer key, backend) this route may send to."""
        out = dict(zip(self.default_split.keys, self.default_split.backends, strict=True))
        for rule in self.rules:
            out.update(zip(rule.split.keys, rule.split.backends, strict=True))
        return list(out.items())


def check_number(c: Checker, val: Any, path: str, *, minimum: float, integer: bool = False) -> Any:
    ok = (
        not isinstance(val, bool)
        and isinstance(val, int if integer else int | float)
        and val >= minimum
    )
    if not ok:
        c.bad(path, f"must be {'an integer' if integer else 'a number'} >= {minimum:g}")
        return None
    return val


def _health(c: Checker, h: Any, p: str) -> HealthCheck | None:
    if not isinstance(h, dict):
        c.bad(p, "must be a mapping")
        return None
    c.unknown(h, p + ".", HEALTH)
    return HealthCheck(
        interval=check_number(c, h.get("interval", 2.0), p + ".interval", minimum=0.05) or 2.0,
        timeout=check_number(c, h.get("timeout", 1.0), p + ".timeout", minimum=0.01) or 1.0,
        path=str(h.get("path", "/")),
        fall=check_number(c, h.get("fall", 2), p + ".fall", minimum=1, integer=True) or 2,
        rise=check_number(c, h.get("rise", 1), p + ".rise", minimum=1, integer=True) or 1,
    )


def parse_backend(c: Checker, raw: Any, p: str, mode: Mode) -> Backend | None:
    if not isinstance(raw, dict):
        c.bad(p, "must be a mapping with endpoints")
        return None
    c.unknown(raw, p + ".", BACKEND)
    eps = c.hostports(raw.get("endpoints"), p + ".endpoints", required=True)
    balance = raw.get("balance", "round_robin")
    if balance not in ("round_robin", "least_connections"):
        c.bad(p + ".balance", "must be round_robin or least_connections")
    sid = None
    if mode is Mode.BRIDGE:
        sid = c.spiffe(raw.get("spiffe_id"), p + ".spiffe_id")
    elif raw.get("spiffe_id") is not None:
        c.bad(p + ".spiffe_id", "only bridge routes talk mTLS to a sidecar")
    h = raw.get("health")
    health = _health(c, h, p + ".health") if h is not None else None
    if not eps:
        return None
    return Backend(tuple(eps), balance, sid, health)
