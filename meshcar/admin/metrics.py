"""Prometheus metrics of one sidecar or edge process (one registry per process object)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._request_children: dict[tuple[str, int], Counter] = {}
        self._latency_children: dict[str, Histogram] = {}
        r = self.registry
        self.requests = Counter(
            "meshcar_requests", "HTTP requests proxied", ["direction", "status"], registry=r
        )
        self.latency = Histogram(
            "meshcar_request_duration_seconds",
            "Time from request head to end of response",
            ["direction"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.handshakes = Counter(
            "meshcar_tls_handshakes", "TLS handshakes", ["direction", "result"], registry=r
        )
        self.authz_denials = Counter(
            "meshcar_authz_denials", "Requests refused by the allow list", ["peer"], registry=r
        )
        self.authz_decisions = Counter(  # common/authz.py: labels bounded by the config
            "meshcar_authz_decisions",
            "Authorization decisions: allow, deny, would_deny (an audit rule's dry run); the "
            "rule that decided (default: none) and the deny reason (caller, host, method, path, "
            "no_identity)",
            ["decision", "policy", "reason"],
            registry=r,
        )
        self.cert_not_after = Gauge(
            "meshcar_certificate_not_after_seconds",
            "Unix time the current SVID expires",
            registry=r,
        )
        self.renewals = Counter(
            "meshcar_certificate_renewals", "Certificate renewals", ["result"], registry=r
        )
        self.identity_expired = Gauge(
            "meshcar_identity_expired",
            "1 while no valid certificate is held (renewal failing past expiry)",
            registry=r,
        )
        self.bundle_version = Gauge(
            "meshcar_trust_bundle_version", "Version of the trust bundle held", registry=r
        )
        self.edge_requests = Counter(
            "meshcar_edge_requests",
            "Edge requests (terminate/bridge) or connections (passthrough)",
            ["route", "mode", "status"],
            registry=r,
        )
        self.edge_bytes = Counter(
            "meshcar_edge_bytes",
            "Payload bytes through the edge",
            ["route", "mode", "direction"],
            registry=r,
        )
        self.pool_connections = Counter(
            "meshcar_upstream_connections",
            "Upstream mesh connections opened",
            ["upstream"],
            registry=r,
        )

        self.listener_refusals = Counter(
            "meshcar_listener_connections_refused",
            "Downstream connections refused at the listener's connection limit",
            ["listener"],
            registry=r,
        )
        self.upstream_refusals = Counter(
            "meshcar_upstream_connections_refused",
            "Requests answered 503 at an upstream's connection limit",
            ["upstream"],
            registry=r,
        )
        self.connection_errors = Counter(
            "meshcar_connection_errors",
            "Connections ended by an unexpected error in meshcar",
            ["listener"],
            registry=r,
        )
        # opaque TCP tunnels (sidecar/tcp.py), counted apart from HTTP requests
        self.tcp_connections = Counter(
            "meshcar_tcp_connections",
            "Opaque TCP tunnels ended, by how (closed, idle, denied, dial_failed, ...)",
            ["direction", "target", "result"],
            registry=r,
        )
        self.tcp_bytes = Counter(
            "meshcar_tcp_bytes",
            "Bytes through opaque TCP tunnels (way up: caller to server, down: back)",
            ["direction", "target", "way"],
            registry=r,
        )
        self.tcp_duration = Histogram(
            "meshcar_tcp_connection_duration_seconds",
            "Lifetime of opaque TCP tunnels",
            ["direction"],
            registry=r,
            buckets=(0.01, 0.1, 1, 10, 60, 300, 1800, 3600, 14400),
        )

        self.upgraded = Counter(
            "meshcar_upgraded_connections",
            "Connections switched to another protocol (101: WebSocket, any Upgrade), by end",
            ["listener", "protocol", "end"],
            registry=r,
        )
        self.upgraded_active = Gauge(
            "meshcar_upgraded_connections_active",
            "Switched connections relaying now",
            ["listener", "protocol"],
            registry=r,
        )
        self.upgraded_bytes = Counter(
            "meshcar_upgraded_bytes",
            "Bytes relayed on switched connections (up: client to upstream)",
            ["listener", "direction"],
            registry=r,
        )

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
