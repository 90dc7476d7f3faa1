"""Check an edge config (compose, Kubernetes, demo) against meshcar/demo/scenario.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshcar.demo import scenario as sc
from meshcar.edge.config import EdgeConfig, parse_edge_config


def assert_edge_is_the_scenario(
    raw: dict[str, Any], *, host: Callable[[str], str], spiffe: Callable[[str], str]
) -> EdgeConfig:
    """Load `raw` with the edge's own loader and compare every route with the scenario.
    `host(service)` is how the deployment names a service; `spiffe(service)` its identity."""
    cfg = parse_edge_config(raw, "edge.yaml", Path("/"))
    by_host = {r.host: r for r in cfg.routes}
    assert set(by_host) == {r.host for r in sc.SCENARIO.edge_routes}
    for r in sc.SCENARIO.edge_routes:
        got, svc = by_host[r.host], sc.SCENARIO.service(r.backend)
        assert got.mode == r.mode and got.path_prefix == r.path_prefix
        assert bool(got.hsts) == r.hsts and got.proxy_protocol == r.proxy_protocol
        port = {
            "terminate": svc.app_port,
            "bridge": svc.inbound_port,
            "passthrough": svc.public_tls_port,
        }[r.mode]
        assert [str(e) for e in got.backend.endpoints] == [f"{host(r.backend)}:{port}"]
        assert got.backend.health is not None  # every backend is health-checked
        if r.rate_limit_per_second is not None:
            assert got.rate_limit is not None
            assert (got.rate_limit.per_second, got.rate_limit.burst) == (
                r.rate_limit_per_second,
                r.rate_limit_burst,
            )
        if r.mode == "bridge":
            assert got.backend.spiffe_id == spiffe(r.backend)
    assert cfg.identity is not None and cfg.identity.spiffe_id == spiffe("edge")
    assert cfg.https_listen.port == sc.EDGE_HTTPS_PORT and cfg.http_listen is not None
    assert cfg.http_listen.port == sc.EDGE_HTTP_PORT and cfg.admin_listen.port == sc.EDGE_ADMIN_PORT
    return cfg
