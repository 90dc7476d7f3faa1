"""The edge's L7 side: terminate and bridge routes, and the HTTP -> HTTPS redirect listener.

Per request, in this order: the request target normalised once (`proto.path`: 400 when
it cannot be; everything below matches, and the backend receives, the normalised target),
the route by Host (421 when it differs from the SNI's route in
client-certificate requirements, or when the Host names a passthrough host), the path
(404), WAF deny rules (403, logged), the per-client-IP rate limit (429 + Retry-After), the
body limit (413), then the headers: hop-by-hop and configured ones removed, client-sent
X-Forwarded-* / Forwarded / X-Forwarded-Client-Cert always replaced by the edge's own
(from the real connection, with `trusted_hops`), client-sent identity headers
(`X-Forwarded-Client-Cert`, `X-Meshcar-Peer-Identity`) removed on every route kind,
configured ones added. terminate sends
plain HTTP to the backend; bridge re-encrypts with mTLS using the edge's mesh identity and
checks the backend sidecar's SPIFFE ID. HSTS is added to responses of routes that ask.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from meshcar.admin.metrics import Metrics
from meshcar.common.accesslog import log_entry, log_request
from meshcar.common.mtls import MeshPeer, MTLSDialer
from meshcar.edge.config import Backend, EdgeConfig, Route
from meshcar.edge.policy import Balancer, EndpointState, RateLimiter
from meshcar.edge.routes.match import Splitter
from meshcar.net.balancer import Balancer as NetBalancer
from meshcar.net.connect import open_tcp
from meshcar.net.drain import Drain
from meshcar.net.forward import keep_response_headers, request_bytes, request_has_body
from meshcar.net.httpconn import HttpConn
from meshcar.net.httpserver import refuse_http, send_error, serve_http
from meshcar.net.limits import ConnectionLimit
from meshcar.net.pipeline import Decision, Forward, Outcome, carry_out
from meshcar.net.pool import Pool, Pooled
from meshcar.net.resilient import Resilience, UpstreamPolicy
from meshcar.net.respond import Refuse, reason_of
from meshcar.proto.forwarded import apply_forwarded, encode_xfcc, forwarded_for, xfcc_element
from meshcar.proto.headers import IDENTITY_HEADERS, clean_headers, simple_response
from meshcar.proto.http1 import Headers, RequestHead, ResponseHead
from meshcar.proto.path import PathError, Target, normalise_target
from meshcar.proto.trace import stamp
from meshcar.tls.store import CredentialStore

log = logging.getLogger("meshcar.edge")


@dataclass
class ClientConn:
    """What the edge knows about one client connection."""

    ip: str
    sni: str | None
    sni_route: Route | None
    cert_der: bytes | None  # the verified client certificate, if any
    scheme: str = "https"


def host_of(req: RequestHead) -> str | None:
    raw = req.header(b"host")
    if raw is None:
        return None
    host = raw.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host


def split_host_port(value: str) -> tuple[str, str]:
    """A Host header as (host, port or ""); IPv6 literals keep their brackets."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value, ""
        rest = value[end + 1 :]
        return value[: end + 1], rest[1:] if rest.startswith(":") else ""
    if value.count(":") == 1 and not value.startswith(":"):
        host, _, port = value.partition(":")
        return host, port
    return value, ""


def _no_alpn() -> None:
    return None


def _no_session(p: Pooled) -> None:
    """No mTLS dialer (no mesh identity): nothing to remember."""


class Backends:
    """A balancer per route, and pooled connections to the chosen endpoints."""

    def __init__(self, cfg: EdgeConfig, store: CredentialStore | None, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self.balancers: dict[str, Balancer] = {}  # by target key (routes/match.py: a split's
        self.targets: dict[str, tuple[Route, Backend]] = {}  # backends; one backend: its host)
        for r in cfg.routes:
            for bkey, b in r.targets():
                h = b.health
                self.targets[bkey] = (r, b)
                self.balancers[bkey] = Balancer(
                    b.endpoints, b.balance, fall=h.fall if h else 2, rise=h.rise if h else 1
                )
        self.timeouts = cfg.timeouts
        self.pool = Pool(
            self._dial,
            idle_timeout=cfg.pool_idle_seconds,
            max_connections=cfg.limits.max_upstream_connections,
            group=_cluster,  # a route's backend cluster
            on_refused=lambda g: metrics.upstream_refusals.labels(g).inc(),
        )
        # routes with a traffic policy: per target, net/resilient.py's policy and balancer
        self.policies: dict[str, UpstreamPolicy] = {}
        self._gen: dict[str, int] = {}  # pool key generation of targets a reload changed
        for bkey, (r, _b) in self.targets.items():
            if r.traffic is not None:
                self.policies[bkey] = self._policy(bkey, r.traffic, self.balancers[bkey])
        self._apply_limits()
        # bridge routes: the one mTLS dialer (common/mtls.py), handshakes counted as "bridge"
        self.mtls = MTLSDialer(store, metrics, "bridge") if store is not None else None
        self._peers: dict[str, MeshPeer] = {}
        self._retired: dict[str, tuple[Route, Backend]] = {}  # targets the last reload removed
        # the pool's on_release: keeps a new bridge connection's TLS session (bound once)
        self.remember_session: Callable[[Pooled], None] = (
            self.mtls.remember_session if self.mtls is not None else _no_session
        )

    def reconfigure(self, cfg: EdgeConfig) -> Callable[[], None]:
        """A config reload (common/reload.py): the new targets and balancers, built now; the
        returned function swaps them in. A target whose endpoints, balance and health
        settings did not change keeps its balancer (health state, active counts); the pool
        and its connections stay (keyed by target and endpoint): idle ones of a removed
        target close after `pool_idle_seconds`. A target whose connections would differ
        (mode, backend SPIFFE ID, route host) gets new pool keys, so no connection made for
        the old settings is handed out again."""
        targets: dict[str, tuple[Route, Backend]] = {}
        balancers: dict[str, Balancer] = {}
        for r in cfg.routes:
            for bkey, b in r.targets():
                targets[bkey] = (r, b)
                old = self.targets.get(bkey)
                if old is not None and _same_balancing(old[1], b) and bkey in self.balancers:
                    balancers[bkey] = self.balancers[bkey]
                else:
                    h = b.health
                    balancers[bkey] = Balancer(
                        b.endpoints, b.balance, fall=h.fall if h else 2, rise=h.rise if h else 1
                    )

        def commit() -> None:
            changed = {k for k, v in self.targets.items() if targets.get(k) != v}
            for k in changed & targets.keys():
                if _dialed_as(self.targets[k]) != _dialed_as(targets[k]):
                    self._gen[k] = self._gen.get(k, 0) + 1
            self._retired = {k: v for k, v in self.targets.items() if k not in targets}
            policies = {}
            for k, (r, _b) in targets.items():
                old = self.policies.get(k)
                if r.traffic is None:
                    continue
                if old is not None and k not in changed and balancers[k] is self.balancers[k]:
                    policies[k] = old  # unchanged: its endpoints' health and budget carry on
                else:
                    policies[k] = self._policy(k, r.traffic, balancers[k])
            self.targets, self.balancers, self.policies = targets, balancers, policies
            self.timeouts = cfg.timeouts
            self._apply_limits()
            self._peers = {
                k: p
                for k, p in self._peers.items()
                if k.partition("|")[0].partition("@")[0] not in changed
            }

        return commit

    def key(self, target: str, state: EndpointState) -> str:
        """The pool key: target and endpoint (and the target's generation once a reload
        changed how its connections are made)."""
        gen = self._gen.get(target)
        return f"{target}~{gen}|{state.endpoint}" if gen else f"{target}|{state.endpoint}"

    def _policy(self, bkey: str, t: Resilience, health: Balancer) -> UpstreamPolicy:
        """Target `bkey`'s traffic policy (net/resilient.py, as a sidecar upstream's): its
        P2C balancer's endpoints are those of `health`, in only while the active checks
        (edge/health.py) and outlier detection both say so. Pool keys: `bkey@host:port`."""
        gen = self._gen.get(bkey)
        eps = [(s.endpoint.host, s.endpoint.port) for s in health.states]
        lb = NetBalancer(f"{bkey}~{gen}" if gen else bkey, eps, _no_peer, resolve=False)
        for state in health.states:
            self._mark(lb, state)
        counter = self.metrics.upstream_policy
        return UpstreamPolicy(t, lb, self.timeouts, lambda event: counter.labels(bkey, event).inc())

    def _apply_limits(self) -> None:
        """circuit.max_connections and timeouts.idle_seconds of the targets with a policy."""
        self.pool.group_limits = {
            k: p.config.circuit.max_connections
            for k, p in self.policies.items()
            if p.config.circuit.max_connections is not None
        }
        self.pool.idle_timeouts = {
            k: p.config.timeouts.idle
            for k, p in self.policies.items()
            if p.config.timeouts.idle is not None
        }

    def health_changed(self, target: str, state: EndpointState) -> None:
        """An active check's verdict into the target's policy balancer (if it has one)."""
        pol = self.policies.get(target)
        if pol is not None:
            self._mark(pol.balancer, state)

    @staticmethod
    def _mark(lb: NetBalancer, state: EndpointState) -> None:
        for ep in lb.endpoints:
            if ep.host == state.endpoint.host and ep.port == state.endpoint.port:
                ep.healthy = state.healthy

    async def _dial(self, key: str) -> Pooled:
        if "@" in key:  # a policy's endpoint (net/balancer.py's key): target@host:port
            tkey, _, ep = key.partition("@")
        else:
            tkey, _, ep = key.partition("|")
        target = tkey.partition("~")[0]
        # a request decided just before a reload removed its target still dials it
        route, backend = self.targets.get(target) or self._retired[target]
        host = route.host
        connect = route.traffic.timeouts.connect if route.traffic is not None else 5.0
        if route.mode == "terminate":
            h, _, p = ep.rpartition(":")
            stream = await open_tcp(h, int(p), connect)
            return Pooled(HttpConn(stream, "response", quickack=True), key, ep)
        peer = self._peers.get(key)
        if peer is None:  # once per route endpoint
            assert backend.spiffe_id is not None
            h, _, p = ep.rpartition(":")
            peer = self._peers[key] = MeshPeer(h, int(p), backend.spiffe_id, host, ep)
        assert self.mtls is not None
        return await self.mtls.dial(key, peer, connect if route.traffic is not None else None)


def _cluster(key: str) -> str:
    """The pool group of a key: its target (`target|ep`, `target~gen|ep`, `target@ep`)."""
    return key.partition("|")[0].partition("@")[0].partition("~")[0]


def _no_peer(key: str, host: str, port: int) -> None:
    """The edge dials a policy endpoint by its pool key (Backends._dial)."""


def _dialed_as(target: tuple[Route, Backend]) -> tuple:
    """What a pooled connection to this target depends on."""
    route, backend = target
    return (route.mode, route.host, backend.spiffe_id)


def _same_balancing(a: Backend, b: Backend) -> bool:
    return (a.endpoints, a.balance, a.health) == (b.endpoints, b.balance, b.health)


class TerminatingProxy:
    """The reverse proxy behind terminate and bridge routes: serves the HTTP requests of a
    client connection whose TLS the edge terminated (edge/listener.py), routes each by Host
    and path, applies the route's policy and forwards it to a backend (module docstring)."""

    def __init__(self, cfg: EdgeConfig, backends: Backends, metrics: Metrics) -> None:
        self.cfg = cfg
        self.backends = backends
        self.metrics = metrics
        self.limiters = {
            r.host: RateLimiter(r.rate_limit.per_second, r.rate_limit.burst)
            for r in cfg.routes
            if r.rate_limit is not None
        }
        self.response_timeout = cfg.timeouts.response_head
        self.upgrades = metrics.upgrades("edge")  # WebSocket etc. (net/upgrade.py)
        self.splitter = Splitter()  # weighted splits (routes/match.py); a test may seed it
        self.drain: Drain | None = (
            None  # requests in flight, set by the process shell (edge/main.py)
        )

    def reconfigure(self, cfg: EdgeConfig) -> Callable[[], None]:
        """A config reload: the new routes' rate limiters (a route whose limit did not change
        keeps its limiter); the returned function swaps config and limiters in."""
        limiters = {}
        before = {r.host: r for r in self.cfg.routes}
        for r in cfg.routes:
            if r.rate_limit is None:
                continue
            old = before.get(r.host)
            same = old is not None and old.rate_limit == r.rate_limit
            limiters[r.host] = (
                self.limiters[r.host]
                if same and r.host in self.limiters
                else RateLimiter(r.rate_limit.per_second, r.rate_limit.burst)
            )

        def commit() -> None:
            self.cfg, self.limiters = cfg, limiters
            self.response_timeout = cfg.timeouts.response_head

        return commit

    async def serve(self, stream: trio.abc.Stream, client: ClientConn) -> None:
        if getattr(stream, "selected_alpn_protocol", _no_alpn)() == "h2":
            from meshcar.edge.h2 import serve_h2  # h2 imported when a client chooses it

            await serve_h2(self, stream, client)
            return
        conn = HttpConn(stream, "request", self.cfg.http.headers)
        await serve_http(
            conn,
            lambda req, c: self.handle(req, c, client),
            timeouts=self.cfg.timeouts,
            drain=self.drain,
        )

    async def handle(self, req: RequestHead, down: HttpConn, client: ClientConn) -> bool:
        start = time.perf_counter()
        host = host_of(req)
        route = self.cfg.route_for(host) if host else client.sni_route
        out = Outcome()
        hop = stamp(req.headers)  # x-request-id kept or made, traceparent: the edge's span
        decision, path, backend = self.decide(req, host, route, client, resilient=True)
        try:
            out = await carry_out(down, req, decision, self.cfg.timeouts, "edge")
            return out.keep
        finally:
            dur = time.perf_counter() - start
            mode = route.mode if route else None
            self.metrics.observe_request(f"edge-{mode or 'none'}", out.status, dur)
            self.metrics.observe_edge(
                route.host if route else "(none)",
                mode or "none",
                out.status,
                out.bytes_in,
                out.bytes_out,
            )
            log_request(  # access_log.fields applies
                **hop.fields(),
                client=client.ip,
                sni=client.sni,
                host=host,
                method=req.method.decode("latin-1"),
                path=path,
                status=out.status,
                reason=reason_of(out.status, decision, out.error),
                bytes_in=out.bytes_in,
                bytes_out=out.bytes_out,
                duration_ms=round(dur * 1000, 3),
                mode=mode,
                backend=backend,
                plaintext_backend=mode == "terminate",
            )

    def decide(
        self,
        req: RequestHead,
        host: str | None,
        route: Route | None,
        client: ClientConn,
        *,
        resilient: bool = False,
    ) -> tuple[Decision, str, str | None]:
        """Refuse (module docstring: 400, 421, 404, 403, 429, 413, 503 with no healthy
        endpoint) or forward to a backend endpoint; and the path and backend to log.
        `resilient` (HTTP/1.1): a target with a traffic policy goes through it (its
        balancer picks the endpoint per attempt; the target is logged as the backend)."""
        try:
            target = normalise_target(
                req.target, req.method, self.cfg.http.path, absolute_schemes=("http", "https")
            )
        except PathError as exc:
            return Refuse(400, str(exc)), req.target.decode("latin-1"), None
        path = target.target.decode("ascii")  # logged: what was forwarded
        refusal = self._misrouted(req, host, route, client, target)
        split = None
        if refusal is None:
            assert route is not None
            split = route.select(req.method.decode("latin-1"), target.path, req.headers)
            refusal = self._refuse(req, route, client, target.path, split is not None)
        if refusal is not None:
            return refusal, path, None
        assert route is not None and split is not None
        bkey = self.splitter.pick(split)
        pol = self.backends.policies.get(bkey) if resilient else None
        if pol is not None:
            return self._policy_forward(req, route, client, target, bkey, pol), path, bkey
        state = self.backends.balancers[bkey].pick()
        if state is None:
            return Refuse(503, f"no healthy endpoint for {route.host}"), path, None
        head = request_bytes(req, target.target, self._headers(req, route, client))
        state.active += 1
        forward = Forward(
            head,
            self.backends.pool,
            self.backends.key(bkey, state),
            route.host,
            rewrite_response=(
                (lambda resp, hs: self._response_headers(route, resp, hs))
                if route.hsts
                else keep_response_headers
            ),
            on_release=self.backends.remember_session,
            max_request_body=route.max_body_bytes,
            response_timeout=route.per_try_timeout or self.response_timeout,
            request_timeout=route.request_timeout,
            on_done=state.leave,
            upgrades=self.upgrades,
        )
        return forward, path, str(state.endpoint)

    def _policy_forward(
        self,
        req: RequestHead,
        route: Route,
        client: ClientConn,
        target: Target,
        bkey: str,
        pol: UpstreamPolicy,
    ) -> Decision:
        """Forward through target `bkey`'s policy (net/resilient.py); 503 when every
        endpoint failed its active health checks."""
        if not self.backends.balancers[bkey].healthy():
            return Refuse(503, f"no healthy endpoint for {route.host}")
        return Forward(
            request_bytes(req, target.target, self._headers(req, route, client)),
            self.backends.pool,
            bkey,
            route.host,
            rewrite_response=(
                (lambda resp, hs: self._response_headers(route, resp, hs))
                if route.hsts
                else keep_response_headers
            ),
            on_release=self.backends.remember_session,
            max_request_body=route.max_body_bytes,
            upgrades=self.upgrades,
            policy=pol,
        )

    def _misrouted(
        self,
        req: RequestHead,
        host: str | None,
        route: Route | None,
        client: ClientConn,
        target: Target,
    ) -> Refuse | None:
        """A request this route cannot take on this connection: 400, 404 or 421."""
        if target.authority is not None and split_host_port(target.authority.lower())[0] != host:
            # RFC 9112 3.2.2: the target's authority replaces Host; the edge routed on Host
            return Refuse(400, "the absolute-form target's host differs from the Host header")
        if route is None:
            return Refuse(404, f"no route for host {host!r}")
        if route.mode == "passthrough":
            return Refuse(
                421,
                f"{route.host} is served end to end by its backend; connect with SNI {route.host}",
            )
        sni_route = client.sni_route
        if sni_route is None or sni_route is route:
            return None
        need_sni = sni_route.client_auth.mode if sni_route.client_auth else None
        need_host = route.client_auth.mode if route.client_auth else None
        if need_sni != need_host:
            return Refuse(
                421,
                f"connect with SNI {route.host}: its client-certificate requirement "
                f"differs from {sni_route.host}'s",
            )
        return None

    def _refuse(
        self, req: RequestHead, route: Route, client: ClientConn, only_path: str, routed: bool
    ) -> Refuse | None:
        """The route's policy: client certificate (403), path (404), WAF (403), rate limit
        (429 + Retry-After), declared body size (413)."""
        if route.client_auth and route.client_auth.mode == "required" and client.cert_der is None:
            return Refuse(403, f"{route.host} requires a client certificate")
        if not routed:  # no rule and not the route's own path
            return Refuse(404, f"no route for {only_path} on {route.host}")
        if route.deny:
            refusal = self._waf(req, route, client, only_path)
            if refusal is not None:
                return refusal
        limiter = self.limiters.get(route.host)
        if limiter is not None:
            ok, retry = limiter.allow(client.ip, time.monotonic())
            if not ok:
                return Refuse(
                    429,
                    f"rate limit for {route.host} exceeded",
                    ((b"Retry-After", str(retry).encode()),),
                )
        if route.max_body_bytes is not None and (req.content_length or 0) > route.max_body_bytes:
            return Refuse(413, f"request body larger than {route.max_body_bytes} bytes")
        return None

    def _waf(
        self, req: RequestHead, route: Route, client: ClientConn, only_path: str
    ) -> Refuse | None:
        """The first deny rule the request matches: logged, counted, 403."""
        method = req.method.decode("latin-1")
        for rule in route.deny:
            if rule.matches(method, only_path, req.headers):
                log_entry(
                    "waf",
                    client=client.ip,
                    host=route.host,
                    method=method,
                    path=only_path,
                    rule=rule.name,
                    decision="deny",
                )
                self.metrics.authz_denials.labels(f"waf:{route.host}").inc()
                return Refuse(403, f"request denied by rule {rule.name}")
        return None

    def _headers(self, req: RequestHead, route: Route, client: ClientConn) -> Headers:
        drop = {h.encode("latin-1") for h in route.remove_headers} | IDENTITY_HEADERS
        headers = clean_headers(req.headers, drop=drop)
        fwd = forwarded_for(
            headers,
            peer_ip=client.ip,
            scheme=client.scheme,
            host=host_of(req),
            trusted_hops=self.cfg.trusted_hops,
        )
        xfcc = None
        if client.cert_der is not None and route.client_auth is not None:
            xfcc = encode_xfcc([xfcc_element(by=None, cert_der=client.cert_der)])
        out = apply_forwarded(headers, fwd, xfcc=xfcc)
        out += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in route.add_headers]
        return out

    @staticmethod
    def _response_headers(route: Route, resp: ResponseHead, headers: Headers) -> Headers:
        if route.hsts:
            headers = [h for h in headers if h[0].lower() != b"strict-transport-security"]
            headers.append((b"Strict-Transport-Security", route.hsts.encode()))
        return headers


class Redirector:
    """The plain-HTTP listener: every request gets 301 to the same URL over https."""

    def __init__(self, cfg: EdgeConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.conn_limit = ConnectionLimit(
            "http",
            cfg.limits.max_connections,
            (lambda n: metrics.listener_refusals.labels(n).inc()) if metrics is not None else None,
        )

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        if not self.conn_limit.try_enter():
            await refuse_http(
                stream,
                f"http listener connection limit ({self.conn_limit.maximum}) reached",
                self.cfg.timeouts,
            )
            return
        try:
            await self._serve_connection(stream)
        finally:
            self.conn_limit.leave()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        await serve_http(HttpConn(stream, "request", self.cfg.http.headers), self.handle)

    def location(self, host_header: str, target: str) -> str:
        host, port = split_host_port(host_header)
        if port == str(self.cfg.http_listen.port if self.cfg.http_listen else 80):
            port = str(self.cfg.https_listen.port)
        netloc = host if port in ("", "443") else f"{host}:{port}"
        return f"https://{netloc}{target if target.startswith('/') else '/'}"

    async def handle(self, req: RequestHead, conn: HttpConn) -> bool:
        host = req.header(b"host")
        if not host:
            await send_error(conn, 400, "a Host header is needed to redirect to https")
            return False
        try:
            target = normalise_target(req.target, req.method, self.cfg.http.path).target
        except PathError as exc:
            await send_error(conn, 400, str(exc), close=not req.keep_alive or request_has_body(req))
            return not request_has_body(req)
        location = self.location(host.decode("latin-1").strip(), target.decode("ascii"))
        body = f"moved to {location}\n".encode()
        await conn.send(
            simple_response(
                301,
                body,
                extra=[(b"Location", location.encode("latin-1"))],
                close=not req.keep_alive or request_has_body(req),
            )
        )
        log_entry(
            "request",
            client=None,
            host=host.decode("latin-1"),
            method=req.method.decode("latin-1"),
            path=req.target.decode("latin-1"),
            status=301,
            mode="redirect",
        )
        return not request_has_body(req)
