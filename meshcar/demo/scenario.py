"""The one definition of the demo scenario (../shared/SCENARIO.md).

`meshcar demo` builds its processes from this module, and the tests of docker-compose.yml
and deploy/k8s/ compare those files against it, so the three ways of running the scenario
cannot drift apart.  Ports are the loopback ports of `meshcar demo`; containers and pods
reuse the same numbers inside their own network namespaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TRUST_DOMAIN = "meshcar.demo"
CA_PORT = 8600
CERT_TTL_SECONDS = 3600
EDGE_HTTPS_PORT = 8443
EDGE_HTTP_PORT = 8080
EDGE_ADMIN_PORT = 7204
PAYMENTS_PUBLIC_PORT = 9443
PAYMENTS_PUBLIC_HOST = "payments.demo.test"
GRPC_QUOTE_METHOD = "/meshcar.demo.Payments/Quote"  # payments' gRPC method (h2c, grpcwire.py)


def db_upstream(peer: str) -> str:
    """The name of the opaque TCP upstream to `peer`'s ledger database."""
    return f"{peer}-db"


def spiffe_id(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/svc/{name}"


@dataclass(frozen=True)
class Service:
    """One demo service: its app, its sidecar's ports and its mesh policy."""

    name: str
    app_port: int
    inbound_port: int  # the sidecar's mTLS mesh listener
    outbound_port: int  # the sidecar's HTTP proxy for the app (HTTP_PROXY)
    admin_port: int
    allowed_callers: tuple[str, ...]  # service names allowed to call this one
    upstreams: tuple[str, ...]  # service names this one may call
    public_tls_port: int | None = None  # payments' own partner endpoint
    # what the inbound speaks to the app for HTTP/2 callers: h2c for a gRPC server
    app_protocol: str = "http1"
    ledger_port: int | None = None  # the app's ledger database port (opaque TCP, inbound.tcp)
    # (peer, local port): opaque TCP tunnels to a peer's ledger, upstream "<peer>-db"
    db_upstreams: tuple[tuple[str, int], ...] = ()

    @property
    def spiffe_id(self) -> str:
        return spiffe_id(self.name)


@dataclass(frozen=True)
class EdgeRoute:
    host: str
    mode: str  # terminate | bridge | passthrough
    backend: str  # service name
    path_prefix: str = "/"
    hsts: bool = False
    rate_limit_per_second: float | None = None
    rate_limit_burst: int | None = None
    proxy_protocol: str | None = None  # "v2" for passthrough


@dataclass(frozen=True)
class Scenario:
    services: tuple[Service, ...]
    edge_routes: tuple[EdgeRoute, ...] = field(default=())

    def service(self, name: str) -> Service:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)


SCENARIO = Scenario(
    services=(
        Service(
            "web",
            9001,
            7001,
            7101,
            7201,
            allowed_callers=("edge",),
            upstreams=("api", "payments"),
            db_upstreams=(("payments", 7311),),  # refused: payments' allow list is api only
        ),
        Service(
            "api",
            9002,
            7002,
            7102,
            7202,
            allowed_callers=("edge", "web"),
            upstreams=("payments",),
            db_upstreams=(("payments", 7312),),
        ),
        Service(
            "payments",
            9003,
            7003,
            7103,
            7203,
            allowed_callers=("api",),
            upstreams=(),
            public_tls_port=PAYMENTS_PUBLIC_PORT,
            app_protocol="h2c",  # its app also serves gRPC (GRPC_QUOTE_METHOD) over h2c
            ledger_port=9013,
        ),
    ),
    edge_routes=(
        EdgeRoute("www.demo.test", "terminate", "web"),
        EdgeRoute(
            "api.demo.test",
            "bridge",
            "api",
            path_prefix="/v1/",
            hsts=True,
            rate_limit_per_second=20.0,
            rate_limit_burst=40,
        ),
        EdgeRoute("payments.demo.test", "passthrough", "payments", proxy_protocol="v2"),
    ),
)
