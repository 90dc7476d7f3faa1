"""Sidecar configuration: YAML in, frozen dataclasses out, every problem reported at once.

The format is documented in docs/CONFIG.md. Validation collects all problems, each as
`FILE: dotted.key: what is wrong`, and raises one `ConfigError` listing them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshcar.admin.paths import PUBLIC_PATHS
from meshcar.common.authz import AUTHZ_RULE, Rule, parse_policies
from meshcar.common.config import (  # shared with the edge; re-exported for existing importers
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
    VaultIdentity,
    load_yaml,
    parse_access_log,
    parse_admin,
    parse_http,
    parse_identity,
    parse_reload,
    parse_workers,
    parse_yaml,
    top_level,
)
from meshcar.common.schema import (
    BOOL,
    HOSTPORT,
    PORT,
    SPIFFE_ID,
    ListOf,
    MapOf,
    Section,
    key,
    number,
    one_of,
)
from meshcar.common.traffic import TRAFFIC_KEYS, parse_traffic
from meshcar.errors import ConfigError
from meshcar.identity.spiffe import SpiffeId
from meshcar.net.forward import Timeouts
from meshcar.net.limits import Limits, parse_limits, parse_timeouts
from meshcar.net.resilient import Resilience
from meshcar.sidecar.splits import SPLIT_TO, TrafficSplit, parse_splits

__all__ = [
    "Checker",
    "HostPort",
    "HttpPolicy",
    "IdentityConfig",
    "SidecarConfig",
    "TcpPort",
    "Upstream",
    "VaultIdentity",
    "load_config",
    "load_config_text",
    "parse_config",
    "parse_http",
    "parse_identity",
]


# The keys of the sidecar config (meshcar/common/schema.py): the checks below take the allowed
# keys of each section from here, and `meshcar config schema sidecar` renders them.
UPSTREAM = Section(
    "A service this app calls through the mesh",
    {
        "endpoints": key(
            ListOf(HOSTPORT, min_items=1), "the peers' mesh listeners (HOST:PORT)", required=True
        ),
        "spiffe_id": key(SPIFFE_ID, "the identity the peers must present", required=True),
        "local_port": key(PORT, "fixed local plain-HTTP port for this upstream"),
        "match": key(ListOf(HOSTPORT), "original destinations captured transparently", []),
        "protocol": key(
            one_of("http", "tcp"),
            "http (proxied requests) or tcp (an opaque tunnel per connection on local_port)",
            "http",
        ),
        "target_port": key(PORT, "tcp: the app port on the peer (one of its inbound.tcp ports)"),
        "idle_seconds": key(
            number(0.1, 86400), "tcp: a tunnel with no byte either way is closed after", 3600
        ),
        **TRAFFIC_KEYS,  # http: timeouts, retries, outlier, circuit (common/traffic.py)
    },
)
TCP_PORT = Section(
    "A local app port that takes opaque TCP from the mesh (ALPN meshcar-tcp/1)",
    {
        "port": key(PORT, "the app's local TCP port", required=True),
        "host": key({"type": "string"}, "the app's host (default: app.host)"),
        "proxy_protocol": key(
            one_of("none", "v2"),
            "v2: send a PROXY v2 header with the caller's SPIFFE ID (TLV 0xE0) first",
            "none",
        ),
        "idle_seconds": key(
            number(0.1, 86400), "a tunnel with no byte either way is closed after", 3600
        ),
    },
)
APP = Section(
    "The local app behind the inbound",
    {
        "host": key({"type": "string"}, "the app's host", "127.0.0.1"),
        "port": key(PORT, "the app's local HTTP port", required=True),
        "protocol": key(
            one_of("http1", "h2c"),
            "what the inbound speaks to the app: http1 (HTTP/1.1) or h2c (HTTP/2, prior "
            "knowledge; gRPC servers)",
            "http1",
        ),
    },
)
INBOUND = Section(
    "The mTLS mesh listener",
    {
        "listen": key(HOSTPORT, "HOST:PORT of the mesh listener", required=True),
        "allow": key(ListOf(SPIFFE_ID), "SPIFFE IDs allowed to call this service", []),
        "policies": key(
            ListOf(AUTHZ_RULE),
            "L7 authorization rules (from x hosts x methods x paths; enforce or audit); what "
            "neither they nor allow let in is refused",
            [],
        ),
        "tcp": key(ListOf(TCP_PORT), "app ports reachable as opaque TCP (same allow list)", []),
        "permissive": key(
            BOOL,
            "migration: also take plaintext HTTP callers, unauthenticated (only a policy with "
            "from: [unauthenticated] admits them); TLS callers unchanged",
            False,
        ),
    },
)
OUTBOUND = Section(
    "The app's way out: HTTP proxy, fixed ports, transparent capture",
    {
        "listen": key(HOSTPORT, "loopback HTTP proxy for the app (HTTP_PROXY)"),
        "upstreams": key(
            MapOf(UPSTREAM, key_pattern="^[^ /:@]+$"), "upstreams by service name", {}
        ),
        "transparent_listen": key(
            HOSTPORT, "loopback listener for iptables-redirected connections"
        ),
        "pool_idle_seconds": key(
            number(0.1, 3600), "idle pooled mesh connections closed after", 30
        ),
        "egress": key(
            one_of("deny", "allow"),
            "hosts that are no upstream: deny (502) or allow (plain HTTP/TCP, not mTLS)",
            "deny",
        ),
        "egress_proxy": key(HOSTPORT, "with egress allow: send non-mesh HTTP via this proxy"),
        "connect_ports": key(
            ListOf(PORT), "with egress allow: ports CONNECT (HTTPS_PROXY) may tunnel to", [443]
        ),
        "splits": key(
            MapOf(ListOf(SPLIT_TO, min_items=1), key_pattern="^[^ /:@]+$"),
            "weighted splits: service name -> [{upstream, weight}] (canaries)",
            {},
        ),
    },
)
SIDECAR = Section(
    "meshcar sidecar configuration (docs/CONFIG.md)",
    {
        "identity": key(IDENTITY, IDENTITY.doc, required=True),
        "app": key(APP, APP.doc, required=True),
        "inbound": key(INBOUND, INBOUND.doc, required=True),
        "outbound": key(OUTBOUND, OUTBOUND.doc),
        "admin": key(ADMIN, ADMIN.doc, required=True),
        "log_level": LOG_LEVEL,
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
class Upstream:
    name: str
    endpoints: tuple[HostPort, ...]
    spiffe_id: str
    local_port: int | None = None
    match: tuple[HostPort, ...] = ()  # original destinations captured transparently
    protocol: str = "http"  # or "tcp": an opaque mTLS tunnel per connection on local_port
    target_port: int | None = None  # tcp: the app port the peer's inbound connects to
    idle_seconds: float = 3600.0  # tcp: no byte either way for this long closes the tunnel
    traffic: Resilience = Resilience()  # http: timeouts, retries, outlier, circuit, dns


@dataclass(frozen=True)
class TcpPort:
    """An app port that takes opaque TCP tunnels from the mesh (`inbound.tcp`)."""

    port: int
    host: str = "127.0.0.1"
    proxy_protocol: str = "none"  # or "v2": PROXY v2 header with the peer's SPIFFE ID first
    idle_seconds: float = 3600.0


@dataclass(frozen=True)
class SidecarConfig:
    identity: IdentityConfig
    app: HostPort
    inbound_listen: HostPort
    allow: tuple[str, ...]
    outbound_listen: HostPort | None
    upstreams: tuple[Upstream, ...]
    admin_listen: HostPort
    log_level: str = "info"
    drain_seconds: float = 10.0
    transparent_listen: HostPort | None = None  # iptables-redirected app traffic
    egress: str = "deny"  # outbound.egress: hosts that are no upstream (allow | deny)
    egress_proxy: HostPort | None = None  # outbound.egress_proxy: non-mesh HTTP goes via it
    connect_ports: tuple[int, ...] = (443,)  # outbound.connect_ports: CONNECT allowed to
    splits: tuple[TrafficSplit, ...] = ()  # outbound.splits (sidecar/splits.py)
    pool_idle_seconds: float = 30.0  # an idle pooled mesh connection is closed after this
    timeouts: Timeouts = Timeouts()  # head, body, write and idle progress (net/forward.py)
    limits: Limits = Limits()  # connections per listener and per upstream (net/limits.py)
    http: HttpPolicy = HttpPolicy()
    workers: int = 1  # worker processes (net/workers.py); 1: this process serves everything
    admin_public_paths: frozenset[bytes] = PUBLIC_PATHS  # served off loopback (admin/server.py)
    policies: tuple[Rule, ...] = ()  # inbound.policies (common/authz.py), after the allow list
    tcp_ports: tuple[TcpPort, ...] = ()  # inbound.tcp: app ports taking opaque TCP tunnels
    app_protocol: str = "http1"  # app.protocol: http1 or h2c (sidecar/h2.py)
    access_log_fields: tuple[str, ...] | None = None  # access_log.fields (None: all)
    reload_watch_seconds: float = 0.0  # reload.watch_seconds (common/reload.py); 0: off
    permissive: bool = False  # inbound.permissive: plaintext callers too, as unauthenticated

    @property
    def trust_domain(self) -> str:
        return SpiffeId.parse(self.identity.spiffe_id).trust_domain


def _app(c: Checker, data: dict) -> tuple[str, int | None]:
    app = c.section(data, "app")
    c.unknown(app, "app.", APP)
    return app.get("host", "127.0.0.1"), c.port(
        app.get("port"), "app.port"
    ) if "app" in data else None


def _seconds(c: Checker, raw: Any, where: str, default: float) -> float:
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not (0.1 <= raw <= 86400):
        c.bad(where, "must be a number of seconds between 0.1 and 86400")
        return default
    return float(raw)


def _tcp_ports(c: Checker, raw: Any, app_host: str) -> tuple[TcpPort, ...]:
    """`inbound.tcp`: the app ports that take opaque TCP tunnels."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        c.bad("inbound.tcp", "must be a list of {port, proxy_protocol, idle_seconds}")
        return ()
    out: list[TcpPort] = []
    seen: set[int] = set()
    for i, item in enumerate(raw):
        p = f"inbound.tcp[{i}]"
        if not isinstance(item, dict):
            c.bad(p, "must be a mapping with a port")
            continue
        c.unknown(item, p + ".", TCP_PORT)
        port = c.port(item.get("port"), p + ".port")
        host = item.get("host", app_host)
        if not isinstance(host, str) or not host:
            c.bad(p + ".host", "must be a host name or address")
            host = app_host
        pp = item.get("proxy_protocol", "none")
        if pp not in ("none", "v2"):
            c.bad(p + ".proxy_protocol", "must be none or v2")
        idle = _seconds(c, item.get("idle_seconds"), p + ".idle_seconds", 3600.0)
        if port is not None and port in seen:
            c.bad(p + ".port", f"port {port} is listed twice")
        elif port is not None:
            seen.add(port)
            out.append(TcpPort(port, host, pp, idle))
    return tuple(out)


def _inbound(c: Checker, data: dict) -> tuple[HostPort | None, list[str]]:
    inbound = c.section(data, "inbound")
    c.unknown(inbound, "inbound.", INBOUND)
    in_listen = c.hostport(inbound.get("listen"), "inbound.listen") if "inbound" in data else None
    allow_raw = inbound.get("allow", [])
    allow: list[str] = []
    if not isinstance(allow_raw, list):
        c.bad("inbound.allow", "must be a list of SPIFFE IDs")
        return in_listen, allow
    for i, a in enumerate(allow_raw):
        v = c.spiffe(a, f"inbound.allow[{i}]")
        if v:
            allow.append(v)
    return in_listen, allow


def _upstream_protocol(
    c: Checker, p: str, u: dict, local_port: int | None, has_match: bool
) -> tuple[str, int | None, float]:
    """An upstream's (protocol, target_port, idle_seconds): the keys of `protocol: tcp`."""
    protocol = u.get("protocol", "http")
    target = u.get("target_port")
    if protocol not in ("http", "tcp"):
        c.bad(p + ".protocol", "must be http or tcp")
    elif protocol == "tcp":
        if local_port is None:
            c.bad(p + ".local_port", "is required with protocol: tcp (the tunnel's listener)")
        if target is None:
            c.bad(p + ".target_port", "is required with protocol: tcp (the peer's app port)")
        if has_match:
            c.bad(p + ".match", "transparent capture is for http upstreams only")
    elif target is not None or "idle_seconds" in u:
        c.bad(p, "target_port and idle_seconds need protocol: tcp")
    if target is not None:
        target = c.port(target, p + ".target_port")
    return protocol, target, _seconds(c, u.get("idle_seconds"), p + ".idle_seconds", 3600.0)


def _upstream(c: Checker, name: Any, u: Any) -> Upstream | None:
    p = f"outbound.upstreams.{name}"
    if not isinstance(name, str) or not name or any(ch in name for ch in " /:@"):
        c.bad(p, "service name must be a plain host name")
        return None
    if not isinstance(u, dict):
        c.bad(p, "must be a mapping")
        return None
    c.unknown(u, p + ".", UPSTREAM)
    eps = c.hostports(u.get("endpoints"), p + ".endpoints", required=True)
    usid = c.spiffe(u.get("spiffe_id"), p + ".spiffe_id")
    lp = u.get("local_port")
    if lp is not None:
        lp = c.port(lp, p + ".local_port")
    match = c.hostports(u.get("match", []), p + ".match", required=False)
    protocol, target, idle = _upstream_protocol(c, p, u, lp, bool(match))
    traffic = parse_traffic(c, u, p)
    if protocol == "tcp" and any(k in u for k in TRAFFIC_KEYS):
        c.bad(p, f"{', '.join(k for k in TRAFFIC_KEYS if k in u)}: for http upstreams only")
    if eps and usid:
        return Upstream(
            name.lower(), tuple(eps), usid, lp, tuple(match), protocol, target, idle, traffic
        )
    return None


def _outbound(c: Checker, data: dict) -> dict[str, Any]:
    """The `outbound:` section, as SidecarConfig keyword arguments."""
    outbound = c.section(data, "outbound", required=False)
    c.unknown(outbound, "outbound.", OUTBOUND)
    pool_idle = outbound.get("pool_idle_seconds", 30)
    if (
        isinstance(pool_idle, bool)
        or not isinstance(pool_idle, int | float)
        or not (0.1 <= pool_idle <= 3600)
    ):
        c.bad("outbound.pool_idle_seconds", "must be a number of seconds between 0.1 and 3600")
        pool_idle = 30
    out_listen = (
        c.hostport(outbound.get("listen"), "outbound.listen", loopback_only=True)
        if outbound.get("listen") is not None
        else None
    )
    ups_raw = outbound.get("upstreams", {}) or {}
    upstreams: list[Upstream] = []
    if not isinstance(ups_raw, dict):
        c.bad("outbound.upstreams", "must be a mapping of service name to upstream")
    else:
        upstreams = [
            u for u in (_upstream(c, name, raw) for name, raw in ups_raw.items()) if u is not None
        ]
    transparent = (
        c.hostport(
            outbound["transparent_listen"], "outbound.transparent_listen", loopback_only=True
        )
        if outbound.get("transparent_listen") is not None
        else None
    )
    return {
        "outbound_listen": out_listen,
        "upstreams": tuple(upstreams),
        "transparent_listen": transparent,
        "pool_idle_seconds": float(pool_idle),
        "splits": parse_splits(
            c,
            outbound.get("splits"),
            {u.name for u in upstreams if u.protocol == "http"},
            {u.name for u in upstreams},
        ),
        **_egress(c, outbound),
    }


def _egress(c: Checker, outbound: dict) -> dict[str, Any]:
    """outbound.egress and outbound.egress_proxy (only with egress allow)."""
    egress = outbound.get("egress", "deny")
    if egress not in ("deny", "allow"):
        c.bad("outbound.egress", "must be deny or allow")
        egress = "deny"
    proxy = None
    if outbound.get("egress_proxy") is not None:
        proxy = c.hostport(outbound["egress_proxy"], "outbound.egress_proxy")
        if egress != "allow":
            c.bad("outbound.egress_proxy", "needs outbound.egress: allow")
    ports = outbound.get("connect_ports", [443])
    if not isinstance(ports, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in ports
    ):
        c.bad("outbound.connect_ports", "must be a list of ports (1-65535)")
        ports = [443]
    return {"egress": egress, "egress_proxy": proxy, "connect_ports": tuple(ports)}


def _scalars(c: Checker, data: dict) -> tuple[float, str]:
    """drain_seconds and log_level."""
    drain = data.get("drain_seconds", 10)
    if isinstance(drain, bool) or not isinstance(drain, int | float) or not (0 <= drain <= 3600):
        c.bad("drain_seconds", "must be a number of seconds between 0 and 3600")
        drain = 10
    level = data.get("log_level", "info")
    if level not in ("debug", "info", "warning", "error"):
        c.bad("log_level", "must be one of debug, info, warning, error")
    return float(drain), level


def parse_config(
    data: Any, source: str = "<config>", base_dir: Path | None = None
) -> SidecarConfig:
    c = top_level(data, source, base_dir, SIDECAR)
    http = parse_http(c, data.get("http"))

    identity = parse_identity(c, data)
    net_timeouts = parse_timeouts(data.get("timeouts"), c.bad)
    net_limits = parse_limits(data.get("limits"), c.bad)
    app_host, app_port = _app(c, data)
    app_protocol = data.get("app", {}).get("protocol", "http1") if "app" in data else "http1"
    if app_protocol not in ("http1", "h2c"):
        c.bad("app.protocol", "must be http1 or h2c")
    in_listen, allow = _inbound(c, data)
    in_raw = data.get("inbound")
    policies = parse_policies(
        c, in_raw.get("policies") if isinstance(in_raw, dict) else None, "inbound.policies"
    )
    inbound_raw = data.get("inbound")
    tcp_raw = inbound_raw.get("tcp") if isinstance(inbound_raw, dict) else None
    tcp_ports = _tcp_ports(c, tcp_raw, str(app_host))
    permissive = inbound_raw.get("permissive", False) if isinstance(inbound_raw, dict) else False
    if not isinstance(permissive, bool):
        c.bad("inbound.permissive", "must be true or false")
    outbound = _outbound(c, data)
    admin_listen, public_paths = parse_admin(c, data)
    drain, level = _scalars(c, data)
    workers = parse_workers(c, data)
    access_fields = parse_access_log(c, data)
    watch = parse_reload(c, data)

    if c.problems:
        raise ConfigError(c.problems)
    assert identity and app_port and in_listen and admin_listen
    return SidecarConfig(
        identity=identity,
        app=HostPort(str(app_host), app_port),
        inbound_listen=in_listen,
        allow=tuple(allow),
        policies=policies,
        admin_listen=admin_listen,
        log_level=level,
        drain_seconds=drain,
        workers=workers,
        timeouts=net_timeouts,
        limits=net_limits,
        http=http,
        admin_public_paths=PUBLIC_PATHS if public_paths is None else public_paths,
        tcp_ports=tcp_ports,
        app_protocol=app_protocol,
        access_log_fields=access_fields,
        reload_watch_seconds=watch,
        permissive=permissive is True,
        **outbound,
    )


def load_config(path: Path) -> SidecarConfig:
    return parse_config(load_yaml(path), str(path), path.parent)


def load_config_text(text: str, source: str, base_dir: Path | None = None) -> SidecarConfig:
    return parse_config(parse_yaml(text, source), source, base_dir)
