"""Outbound: the app's local HTTP proxy, carrying requests to peer sidecars over mTLS.

The app sends either proxy-style requests (`GET http://payments/v1/x`, via HTTP_PROXY) or
origin-form requests to a fixed local port bound to one upstream. The service is named by
the absolute URI's host (else the Host header); only configured upstreams are reachable,
anything else is answered 502 with a clear body, so the sidecar is never an open proxy.
Connections to peers are pooled keep-alive mTLS connections whose peer SPIFFE ID has been
checked against the upstream's expected identity.

The request target is normalised once (`proto.path`, absolute-form `http://` allowed
here) before the upstream is chosen; the peer receives exactly the normalised origin-form
target. A target that cannot be normalised is 400.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import trio

from meshcar.admin.metrics import Metrics
from meshcar.common.accesslog import log_request
from meshcar.net.balancer import Balancer
from meshcar.net.drain import Drain
from meshcar.net.forward import request_bytes
from meshcar.net.h2detect import is_h2_preface
from meshcar.net.httpconn import HttpConn
from meshcar.net.httpserver import refuse_http, serve_http
from meshcar.net.limits import ConnectionLimit
from meshcar.net.pipeline import Decision, Forward, Outcome, carry_out
from meshcar.net.pool import Pool
from meshcar.net.resilient import UpstreamPolicy
from meshcar.net.respond import Refuse, reason_of
from meshcar.proto.headers import IDENTITY_HEADERS, clean_headers
from meshcar.proto.http1 import RequestHead
from meshcar.proto.path import DEFAULT, PathError, PathOptions, normalise_target
from meshcar.proto.trace import stamp
from meshcar.sidecar.config import SidecarConfig, Upstream
from meshcar.sidecar.dialers import MeshDialer
from meshcar.sidecar.egress import DENIED, Egress, Tunnel, connect_decision, run_tunnel
from meshcar.sidecar.splits import Splitter
from meshcar.sidecar.tcp import TcpOutbound
from meshcar.tls.store import CredentialStore

log = logging.getLogger("meshcar.outbound")


def _service(authority: str) -> str | None:
    name = authority.strip().lower()
    if not name or name.startswith("["):
        return None
    return name.rsplit(":", 1)[0] if ":" in name else name


def route_target(
    req: RequestHead, opts: PathOptions = DEFAULT
) -> tuple[str | None, bytes, str | None]:
    """(service name or None, normalised origin-form target, authority of an absolute-form
    target or None) for a proxy-style or origin-form request; raises PathError when the
    target cannot be normalised."""
    t = normalise_target(req.target, req.method, opts, absolute_schemes=("http",))
    if t.authority is not None:
        return _service(t.authority), t.target, t.authority
    host = req.header(b"host")
    if host is None:
        return None, t.target, None
    return _service(host.decode("latin-1")), t.target, None


def live_upstreams(
    old: tuple[Upstream, ...], new: tuple[Upstream, ...], ports: bool = False
) -> tuple[tuple[Upstream, ...], list[str]]:
    """The upstreams a reload serves, and the restart-only keys that changed: a `protocol:
    tcp` upstream (added, removed or changed: its own listener) keeps its running value
    until a restart, and so does an HTTP upstream's `local_port` unless `ports` (the
    sidecar opens and closes those listeners live)."""
    before = {u.name: u for u in old}
    after = {u.name: u for u in new}
    out: list[Upstream] = []
    restart: list[str] = []
    for name, u in after.items():
        served, why = _live_upstream(before.get(name), u, ports)
        out += [served] if served is not None else []
        restart += why
    for name, prev in before.items():
        fixed = prev.local_port is not None and not ports
        if name not in after and (prev.protocol == "tcp" or fixed):
            restart.append(f"outbound.upstreams.{name}")
            if prev.protocol == "tcp":
                out.append(prev)
    return tuple(out), restart


def _live_upstream(
    prev: Upstream | None, u: Upstream, ports: bool
) -> tuple[Upstream | None, list[str]]:
    """What a reload serves for upstream `u` (`prev`: its running config) and the
    restart-only keys of it that changed."""
    key = f"outbound.upstreams.{u.name}"
    if u.protocol == "tcp" or (prev is not None and prev.protocol == "tcp"):
        return prev, [key] if prev != u else []
    if ports:
        return u, []
    port = prev.local_port if prev is not None else None
    return replace(u, local_port=port), [key + ".local_port"] if u.local_port != port else []


class Outbound:
    def __init__(self, cfg: SidecarConfig, store: CredentialStore, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.store = store
        self._h2: Any = None  # sidecar/h2.py's H2Proxy, on the first h2c connection
        self.upstreams = {u.name: u for u in cfg.upstreams if u.protocol == "http"}
        tcp_ups = {u.name: u for u in cfg.upstreams if u.protocol == "tcp"}
        self.tcp = TcpOutbound(cfg, store, metrics, tcp_ups) if tcp_ups else None
        self.dialer = MeshDialer(store, self.upstreams, metrics)
        self.egress = Egress(cfg, metrics) if cfg.egress == "allow" else None  # non-mesh hosts
        self.splitter = Splitter(cfg.splits)  # outbound.splits: weighted (sidecar/splits.py)
        self.upgrades = metrics.upgrades("outbound")  # WebSocket etc. (net/upgrade.py)
        self.drain: Drain | None = None  # set by the process that owns the listeners
        self.response_timeout = (
            cfg.timeouts.response_head
        )  # seconds to wait for the upstream's response head
        self.pool = Pool(
            self.dialer.dial,
            idle_timeout=cfg.pool_idle_seconds,
            max_connections=cfg.limits.max_upstream_connections,
            on_refused=lambda g: metrics.upstream_refusals.labels(g).inc(),
            group=self.dialer.group,
        )
        self.policies = {name: self._policy(u) for name, u in self.upstreams.items()}
        self._pool_limits(self.upstreams)
        self._limits: dict[
            str, ConnectionLimit
        ] = {}  # per listener: the proxy port, each fixed port

    def _policy(self, u: Upstream, old: Balancer | None = None) -> UpstreamPolicy:
        """Upstream `u`'s traffic policy (net/resilient.py): balancer, budget, breakers."""
        counter = self.metrics.upstream_policy
        return UpstreamPolicy(
            u.traffic,
            self.dialer.balancer(u.name, old, u),
            self.cfg.timeouts,
            lambda event: counter.labels(u.name, event).inc(),
        )

    def _pool_limits(self, upstreams: dict[str, Upstream]) -> None:
        """The pool's per-upstream connection limits and idle lives (circuit, timeouts)."""
        t = {name: u.traffic for name, u in upstreams.items()}
        self.pool.group_limits = {
            n: r.circuit.max_connections for n, r in t.items() if r.circuit.max_connections
        }
        self.pool.idle_timeouts = {
            n: r.timeouts.idle for n, r in t.items() if r.timeouts.idle is not None
        }

    def reconfigure(self, cfg: SidecarConfig) -> tuple[Callable[[], None], Callable[[], Any]]:
        """A reload's outbound side (`cfg`: upstreams, splits, egress applied; the rest as
        running): (commit, after). An unchanged upstream keeps its policy, balancer and pooled
        connections; a changed one gets a new policy whose endpoints that stay keep their
        balancer state and pooled connections if the peer identity is the same; the pooled
        connections of a removed upstream, of a changed identity and of a removed endpoint
        are retired (idle ones closed by `after`, busy ones when their request is done).
        A request already decided keeps the objects it started with."""
        ups = {u.name: u for u in cfg.upstreams if u.protocol == "http"}
        policies, retire = self._changes(ups)
        egress_changed = (cfg.egress, cfg.egress_proxy) != (self.cfg.egress, self.cfg.egress_proxy)
        egress = self.egress
        if egress_changed:
            egress = Egress(cfg, self.metrics) if cfg.egress == "allow" else None
        old_egress = self.egress if egress_changed else None
        splitter = Splitter(cfg.splits) if cfg.splits != self.cfg.splits else self.splitter

        def commit() -> None:
            self.cfg = cfg
            self.upstreams = ups
            self.dialer.update(ups)
            self.policies = policies
            self._pool_limits(ups)
            self.pool.retire_keys(retire)
            self.egress, self.splitter = egress, splitter
            self._h2 = None  # new h2c connections see the new upstreams

        async def after() -> None:
            await self.pool.close_retired()
            if old_egress is not None:
                await old_egress.pool.retire()

        return commit, after

    def _changes(self, ups: dict[str, Upstream]) -> tuple[dict[str, UpstreamPolicy], set[str]]:
        """A reload's policies (the unchanged upstreams' kept) and the pool keys to retire."""
        policies: dict[str, UpstreamPolicy] = {}
        retire: set[str] = set()
        keys = self.pool.keys()

        def of(name: str) -> set[str]:
            return {k for k in keys if k == name or self.dialer.group(k) == name}

        for name, u in ups.items():
            prev = self.upstreams.get(name)
            if prev == u:
                policies[name] = self.policies[name]
                continue
            same_peer = prev is not None and prev.spiffe_id == u.spiffe_id
            old = self.policies[name].balancer if same_peer else None
            policies[name] = self._policy(u, old)
            if not same_peer:
                retire |= of(name)
            elif prev is not None and prev.endpoints != u.endpoints:
                kept = set(policies[name].balancer.by_key)
                retire |= {name} | {k for k in of(name) if k != name and k not in kept}
        for name in set(self.upstreams) - set(ups):
            retire |= of(name)
        return policies, retire

    async def aclose(self) -> None:
        await self.pool.close_all()
        if self.egress is not None:
            await self.egress.aclose()

    def conn_limit(self, listener: str) -> ConnectionLimit:
        if listener not in self._limits:
            self._limits[listener] = ConnectionLimit(
                listener,
                self.cfg.limits.max_connections,
                lambda n: self.metrics.listener_refusals.labels(n).inc(),
            )
        return self._limits[listener]

    async def handle_connection(self, stream: trio.SocketStream, fixed: str | None = None) -> None:
        """Over the listener's connection limit: 503 with `Connection: close` to the first
        request; else serve the connection. A `protocol: tcp` upstream's port is a tunnel."""
        if fixed is not None and self.tcp is not None and fixed in self.tcp.upstreams:
            await self.tcp.handle_connection(stream, fixed)
            return
        limit = self.conn_limit(f"outbound:{fixed}" if fixed else "outbound")
        if not limit.try_enter():
            await refuse_http(
                stream,
                f"{limit.name} listener connection limit ({limit.maximum}) reached",
                self.cfg.timeouts,
            )
            return
        try:
            await self.serve_connection(stream, fixed)
        finally:
            limit.leave()

    async def serve_connection(self, stream: trio.SocketStream, fixed: str | None = None) -> None:
        if await is_h2_preface(stream):  # h2c with prior knowledge (sidecar/h2.py)
            await self.h2().serve(stream, lambda req: self.decide(req, fixed), {}, self.drain)
            return
        conn = HttpConn(stream, "request", self.cfg.http.headers, quickack=True)  # app-facing
        conn.parser.allow_connect = fixed is None  # CONNECT on the proxy port (egress.py)
        await serve_http(
            conn,
            lambda req, c: self.handle_request(req, c, fixed),
            drain=self.drain,
            timeouts=self.cfg.timeouts,
        )

    def h2(self) -> Any:
        """The HTTP/2 side, made (and h2 imported) when the first h2c connection arrives."""
        if self._h2 is None:
            from meshcar.sidecar.h2 import H2Proxy, MeshPicker

            pick = MeshPicker(self.store, self.metrics, self.upstreams, self.pool)
            self._h2 = H2Proxy("outbound", pick, self.metrics)
        return self._h2

    async def handle_request(self, req: RequestHead, down: HttpConn, fixed: str | None) -> bool:
        start = time.perf_counter()
        out = Outcome()
        hop = stamp(req.headers)  # the app's x-request-id or a new one; a span per hop
        decision, service = (
            self.decide(req, fixed) if req.method != b"CONNECT" else self.tunnel(req)
        )
        try:
            if isinstance(decision, Tunnel):  # CONNECT (sidecar/egress.py)
                out = await run_tunnel(down, req, decision, self.cfg.timeouts)
                return False
            out = await carry_out(down, req, decision, self.cfg.timeouts, "outbound")
            return out.keep
        finally:
            dur = time.perf_counter() - start
            self.metrics.observe_request("outbound", out.status, dur)
            self.metrics.observe_peer("outbound", service, out.status)
            log_request(
                direction="outbound",
                **hop.fields(),
                upstream=service,
                method=req.method.decode("latin-1"),
                path=req.target.decode("latin-1"),
                status=out.status,
                bytes_in=out.bytes_in,
                bytes_out=out.bytes_out,
                duration_ms=round(dur * 1000, 3),
                reason=reason_of(out.status, decision, out.error),
            )

    def tunnel(self, req: RequestHead) -> tuple[Tunnel | Refuse, None]:
        """A CONNECT on the proxy listener (sidecar/egress.py)."""
        mesh = set(self.upstreams) | {s.name for s in self.cfg.splits}
        return connect_decision(req, self.cfg, self.egress, mesh, self.upgrades), None

    def decide(self, req: RequestHead, fixed: str | None) -> tuple[Decision, str | None]:
        """Refuse (400: https:// or a target that cannot be normalised; 502: no such
        upstream) or forward to the upstream's sidecar; and the upstream to log."""
        if req.target.startswith((b"https://", b"HTTPS://")):
            return Refuse(400, "send plain http:// to the sidecar; it adds mTLS itself"), fixed
        try:
            name, target, authority = route_target(req, self.cfg.http.path)
        except PathError as exc:
            return Refuse(400, str(exc)), fixed
        service = fixed if fixed is not None else name
        service = self.splitter.resolve(service)  # a split's name -> one of its upstreams
        if service not in self.upstreams:
            egress = (
                self.egress.decide(req, target, authority) if self.egress and not fixed else None
            )
            if egress is not None:  # outbound.egress allow: plain, to the host (sidecar/egress.py)
                return egress, service
            known = ", ".join(sorted(self.upstreams)) or "none"
            return Refuse(
                502,
                f"unknown service {service!r}: this sidecar only routes to its configured "
                f"upstreams ({known})" + ("" if self.egress else f"; {DENIED}"),
            ), service
        headers = clean_headers(req.headers, drop=IDENTITY_HEADERS)
        if authority is not None:
            # RFC 9112 3.2.2: an absolute-form target's authority replaces Host, so the
            # peer sees the host the request was routed on, not another the client wrote
            headers = [h for h in headers if h[0].lower() != b"host"]
            headers.append((b"Host", authority.encode("ascii")))
        elif req.header(b"host") is None:
            headers.append((b"Host", service.encode()))
        forward = Forward(
            request_bytes(req, target, headers),
            self.pool,
            service,
            f"upstream {service}",
            on_release=self.dialer.remember_session,
            response_timeout=self.response_timeout,
            upgrades=self.upgrades,
            policy=self.policies[service],
        )
        return forward, service
