"""The demo scenario's edge configuration, built from meshcar/demo/scenario.py.

`meshcar demo` (loopback), docker-compose and the Kubernetes manifests all describe the
same edge: this function is the one place that turns `SCENARIO.edge_routes` into an edge
config (docs/EDGE.md); callers say where each backend lives and where the files are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshcar.demo import scenario as sc


def edge_config_for(
    scenario: sc.Scenario,
    *,
    https: str,
    http: str,
    admin: str,
    identity: dict[str, Any],
    cert: str,
    key: str,
    endpoint: Callable[[sc.Service, str], str],
    passthrough_source: str | None = None,
) -> dict[str, Any]:
    """`endpoint(service, kind)` names where a backend listens; kind is "app" (terminate:
    plain HTTP to the app), "mesh" (bridge: the service's sidecar inbound) or "public"
    (passthrough: the service's own TLS endpoint). `passthrough_source`: the local address
    passthrough connections come from (the one address the backend trusts PROXY headers from)."""
    routes: list[dict[str, Any]] = []
    for r in scenario.edge_routes:
        svc = scenario.service(r.backend)
        route: dict[str, Any] = {"host": r.host, "mode": r.mode}
        if r.mode == "passthrough":
            route["backend"] = {
                "endpoints": [endpoint(svc, "public")],
                "health": {"interval": 2.0, "timeout": 1.0},
            }
            if r.proxy_protocol:
                route["proxy_protocol"] = r.proxy_protocol
            if passthrough_source:
                route["source_address"] = passthrough_source
        else:
            route["tls"] = {"cert": cert, "key": key}
            backend: dict[str, Any] = {
                "endpoints": [endpoint(svc, "mesh" if r.mode == "bridge" else "app")],
                "health": {"interval": 2.0, "timeout": 1.0, "path": "/healthz"},
            }
            if r.mode == "bridge":
                backend["spiffe_id"] = svc.spiffe_id
            route["backend"] = backend
            if r.path_prefix != "/":
                route["path_prefix"] = r.path_prefix
            if r.hsts:
                route["hsts"] = True
            if r.rate_limit_per_second is not None:
                route["rate_limit"] = {
                    "per_second": r.rate_limit_per_second,
                    "burst": r.rate_limit_burst or 1,
                }
        routes.append(route)
    return {
        "identity": identity,
        "listen": {"https": https, "http": http},
        "admin": {"listen": admin},
        "routes": routes,
        "log_level": "info",
    }
