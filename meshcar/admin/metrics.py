"""Prometheus metrics of one sidecar or edge process (one registry per process object)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

MAX_LABEL_VALUES = 100  # distinct peer/upstream label values per process, then "other"
OTHER = "other"
DURATION_BUCKETS = (0.01, 0.1, 1, 10, 60, 300, 1800, 3600, 14400)  # a connection's lifetime
Labels = tuple[str, ...]


class Bounded:
    """Label values with bounded cardinality: the first `limit` distinct names are kept, any
    later one is `other` (a scrape never grows without bound on callers or hosts)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def label(self, name: str) -> str:
        if name in self.seen:
            return name
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(name)
        return name


def _value(metric: Gauge | Counter, suffix: str = "") -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for family in metric.collect()
        for s in family.samples
        if s.name.endswith(suffix)
    ]


class _IdentityCollector:
    """meshcar_certificate_expiry_seconds{identity} (seconds to the held certificate's
    expiry, negative once expired) and meshcar_identity_renewals_total{identity,outcome},
    computed at scrape time from the rotation's own metrics."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        expiry = GaugeMetricFamily(
            "meshcar_certificate_expiry_seconds",
            "Seconds until the identity's current certificate expires (negative: expired)",
            labels=["identity"],
        )
        renewals = CounterMetricFamily(
            "meshcar_identity_renewals",
            "Certificate issuance outcomes by identity: bootstrap, bootstrap_failure, success "
            "(renewed), failure",
            labels=["identity", "outcome"],
        )
        sid = self.m.identity
        if sid is not None:
            not_after = _value(self.m.cert_not_after)
            if not_after and not_after[0][1] > 0:
                expiry.add_metric([sid], not_after[0][1] - time.time())
            for labels, value in _value(self.m.renewals, "_total"):
                renewals.add_metric([sid, labels["result"]], value)
        yield expiry
        yield renewals


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._request_children: dict[tuple[str, int], Counter] = {}
        self._latency_children: dict[str, Histogram] = {}
        r = self.registry
        self.requests = self._counter(
            "meshcar_requests", "HTTP requests proxied", ("direction", "status")
        )
        self.latency = self._histogram(
            "meshcar_request_duration_seconds",
            "Time from request head to end of response",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            ("direction",),
        )
        self.handshakes = self._counter(
            "meshcar_tls_handshakes", "TLS handshakes", ("direction", "result")
        )
        self.authz_denials = self._counter(
            "meshcar_authz_denials", "Requests refused by the allow list", ("peer",)
        )
        self.authz_decisions = self._counter(
            "meshcar_authz_decisions",
            "Authorization decisions: allow, deny, would_deny (an audit rule's dry run); the "
            "rule that decided (default: none) and the deny reason (caller, host, method, path, "
            "no_identity, unauthenticated)",
            ("decision", "policy", "reason"),
        )
        self.cert_not_after = self._gauge(
            "meshcar_certificate_not_after_seconds", "Unix time the current SVID expires"
        )
        self.renewals = self._counter(
            "meshcar_certificate_renewals", "Certificate renewals", ("result",)
        )
        self.identity_expired = self._gauge(
            "meshcar_identity_expired",
            "1 while no valid certificate is held (renewal failing past expiry)",
        )
        self.bundle_version = self._gauge(
            "meshcar_trust_bundle_version", "Version of the trust bundle held"
        )
        self.edge_requests = self._counter(
            "meshcar_edge_requests",
            "Edge HTTP requests (terminate/bridge; passthrough: meshcar_edge_connections)",
            ("route", "mode", "status"),
        )
        self.edge_bytes = self._counter(
            "meshcar_edge_bytes",
            "Payload bytes through the edge",
            ("route", "mode", "direction"),
        )
        self.pool_connections = self._counter(
            "meshcar_upstream_connections", "Upstream mesh connections opened", ("upstream",)
        )

        self.listener_refusals = self._counter(
            "meshcar_listener_connections_refused",
            "Downstream connections refused at the listener's connection limit",
            ("listener",),
        )
        self.upstream_refusals = self._counter(
            "meshcar_upstream_connections_refused",
            "Requests answered 503 at an upstream's connection limit",
            ("upstream",),
        )
        self.upstream_policy = self._counter(
            "meshcar_upstream_policy_events",
            "Traffic policy events per upstream: retry, budget_exhausted (a retry the budget "
            "refused), circuit_open (fast 503), ejected (outlier), request_timeout",
            ("upstream", "event"),
        )
        self.connection_errors = self._counter(
            "meshcar_connection_errors",
            "Connections ended by an unexpected error in meshcar",
            ("listener",),
        )
        # opaque TCP tunnels (sidecar/tcp.py), counted apart from HTTP requests
        self.tcp_connections = self._counter(
            "meshcar_tcp_connections",
            "Opaque TCP tunnels ended, by how (closed, idle, denied, dial_failed, ...)",
            ("direction", "target", "result"),
        )
        self.tcp_bytes = self._counter(
            "meshcar_tcp_bytes",
            "Bytes through opaque TCP tunnels (way up: caller to server, down: back)",
            ("direction", "target", "way"),
        )
        self.tcp_duration = self._histogram(
            "meshcar_tcp_connection_duration_seconds",
            "Lifetime of opaque TCP tunnels",
            (0.01, 0.1, 1, 10, 60, 300, 1800, 3600, 14400),
            ("direction",),
        )

        self.upgraded = self._counter(
            "meshcar_upgraded_connections",
            "Connections switched to another protocol (101: WebSocket, any Upgrade), by end",
            ("listener", "protocol", "end"),
        )
        self.upgraded_active = self._gauge(
            "meshcar_upgraded_connections_active",
            "Switched connections relaying now",
            ("listener", "protocol"),
        )
        self.upgraded_bytes = self._counter(
            "meshcar_upgraded_bytes",
            "Bytes relayed on switched connections (up: client to upstream)",
            ("listener", "direction"),
        )

        # issue 15: the process itself (memory, CPU, open fds; Python's version and GC), the
        # identity's certificate (seconds to expiry and renewal outcomes, labelled by the
        # identity), requests by upstream or peer (bounded: see Bounded), edge passthrough
        # connections apart from HTTP requests
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.identity: str | None = None  # the SPIFFE ID of the certificate (set by the role)
        r.register(_IdentityCollector(self))
        self.peer_names = Bounded(MAX_LABEL_VALUES)
        self.peer_requests = self._counter(
            "meshcar_peer_requests",
            "HTTP requests by upstream (outbound) or calling SPIFFE ID (inbound) and status "
            f"class; past {MAX_LABEL_VALUES} distinct names per process, the rest count as other",
            ("direction", "peer", "code"),
        )
        self.edge_connections = self._counter(
            "meshcar_edge_connections",
            "Edge passthrough connections (TCP, not HTTP requests) ended, by result (closed, "
            "error)",
            ("route", "result"),
        )
        self.edge_connection_duration = self._histogram(
            "meshcar_edge_connection_duration_seconds",
            "Lifetime of edge passthrough connections",
            (0.01, 0.1, 1, 10, 60, 300, 1800, 3600, 14400),
            ("route",),
        )

    def _counter(self, name: str, doc: str, labels: Labels = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: Labels = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def _histogram(
        self, name: str, doc: str, buckets: tuple[float, ...], labels: Labels
    ) -> Histogram:
        return Histogram(name, doc, labels, registry=self.registry, buckets=buckets)

    def observe_peer(self, direction: str, peer: str | None, status: int) -> None:
        """Count one request by its upstream or caller (a bounded label) and status class."""
        name = self.peer_names.label(peer or "none")
        self.peer_requests.labels(direction, name, f"{status // 100}xx").inc()

    def observe_passthrough(
        self, route: str, error: str | None, bytes_up: int, bytes_down: int, seconds: float
    ) -> None:
        """One passthrough connection: a connection, not a request (no status)."""
        self.edge_connections.labels(route, "closed" if error is None else "error").inc()
        self.edge_connection_duration.labels(route).observe(seconds)
        if bytes_up:
            self.edge_bytes.labels(route, "passthrough", "in").inc(bytes_up)
        if bytes_down:
            self.edge_bytes.labels(route, "passthrough", "out").inc(bytes_down)

    def upgrades(self, listener: str) -> UpgradeCounts:
        """The `UpgradeObserver` (net/upgrade.py) of one listener."""
        return UpgradeCounts(self, listener)

    def count_connection_error(self, listener: str) -> None:
        self.connection_errors.labels(listener).inc()

    def observe_request(self, direction: str, status: int, seconds: float) -> None:
        """Count one request (the hot path: label children are cached)."""
        key = (direction, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(direction, str(status))
        child.inc()
        hist = self._latency_children.get(direction)
        if hist is None:
            hist = self._latency_children[direction] = self.latency.labels(direction)
        hist.observe(seconds)

    def observe_edge(
        self, route: str, mode: str, status: int, bytes_in: int, bytes_out: int
    ) -> None:
        self.edge_requests.labels(route, mode, str(status)).inc()
        if bytes_in:
            self.edge_bytes.labels(route, mode, "in").inc(bytes_in)
        if bytes_out:
            self.edge_bytes.labels(route, mode, "out").inc(bytes_out)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class UpgradeCounts:
    """Switched connections of one listener, counted into `Metrics`."""

    def __init__(self, metrics: Metrics, listener: str) -> None:
        self.m = metrics
        self.listener = listener

    def upgrade_opened(self, protocol: str) -> None:
        self.m.upgraded_active.labels(self.listener, protocol).inc()

    def upgrade_closed(self, protocol: str, bytes_up: int, bytes_down: int, end: str) -> None:
        m, name = self.m, self.listener
        m.upgraded_active.labels(name, protocol).dec()
        m.upgraded.labels(name, protocol, end).inc()
        m.upgraded_bytes.labels(name, "up").inc(bytes_up)
        m.upgraded_bytes.labels(name, "down").inc(bytes_down)
