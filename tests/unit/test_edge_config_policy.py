"""Edge config validation (every problem at once) and the pure policies: rate limit, balancer."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcar.edge.config import (
    BridgeRoute,
    Mode,
    PassthroughRoute,
    TerminateRoute,
    parse_edge_config,
)
from meshcar.edge.policy import Balancer, RateLimiter
from meshcar.errors import ConfigError
from meshcar.sidecar.config import HostPort

GOOD = {
    "listen": {"https": "127.0.0.1:8443", "http": "127.0.0.1:8080"},
    "admin": {"listen": "127.0.0.1:7204"},
    "routes": [
        {
            "host": "www.test",
            "mode": "terminate",
            "tls": {"cert": "c.pem", "key": "k.pem"},
            "backend": {
                "endpoints": ["127.0.0.1:9001", "127.0.0.1:9002"],
                "balance": "least_connections",
            },
            "deny": [
                {
                    "name": "admin",
                    "methods": ["post"],
                    "path": "^/admin",
                    "header": {"name": "X-Bad", "pattern": "yes"},
                }
            ],
        },
        {
            "host": "pay.test",
            "mode": "passthrough",
            "proxy_protocol": "v1",
            "backend": {"endpoints": ["127.0.0.1:9443"]},
        },
    ],
}


def test_good_config_parses() -> None:
    cfg = parse_edge_config(GOOD, "edge.yaml", Path("/etc/meshcar"))
    www = cfg.route_for("www.test")
    assert www is not None and www.cert_file == Path("/etc/meshcar/c.pem")
    assert www.backend.balance == "least_connections" and len(www.backend.endpoints) == 2
    rule = www.deny[0]
    assert rule.matches("POST", "/admin/x", [(b"X-Bad", b"yes")])
    assert not rule.matches("GET", "/admin/x", [(b"X-Bad", b"yes")])
    assert not rule.matches("POST", "/admin/x", [])
    assert cfg.route_for("unknown.test") is None and cfg.route_for(None) is None
    assert cfg.route_for("pay.test").proxy_protocol == "v1"
    assert cfg.hello_timeout == cfg.handshake_timeout == 10.0
    assert (
        parse_edge_config(dict(GOOD, handshake_timeout=2.5), "edge.yaml").handshake_timeout == 2.5
    )


def test_each_mode_parses_to_its_own_route_type() -> None:
    raw = {
        **GOOD,
        "identity": {
            "spiffe_id": "spiffe://t.test/edge",
            "ca_url": "https://127.0.0.1:8600",
            "ca_bundle": "ca.pem",
            "state_dir": "state",
        },
        "routes": [
            *GOOD["routes"],
            {
                "host": "api.test",
                "mode": "bridge",
                "tls": {"cert": "c.pem", "key": "k.pem"},
                "backend": {"endpoints": ["127.0.0.1:9003"], "spiffe_id": "spiffe://t.test/api"},
            },
        ],
    }
    cfg = parse_edge_config(raw, "edge.yaml", Path("/etc/meshcar"))
    www, pay, api = cfg.route_for("www.test"), cfg.route_for("pay.test"), cfg.route_for("api.test")
    assert isinstance(www, TerminateRoute) and www.mode is Mode.TERMINATE
    assert isinstance(pay, PassthroughRoute) and pay.mode is Mode.PASSTHROUGH
    assert isinstance(api, BridgeRoute) and api.mode is Mode.BRIDGE
    # a str: logs, metrics labels and JSON carry the plain mode name
    assert api.mode == "bridge" and f"{pay.mode}" == "passthrough" and str(www.mode) == "terminate"
    assert pay.path_matches("/anything") and pay.deny == () and pay.client_auth is None


def test_every_problem_at_once() -> None:
    bad = {
        "listen": {"https": "nohost"},
        "admin": {},
        "bogus": 1,
        "routes": [
            {"host": "Bad_Host", "mode": "terminate", "backend": {"endpoints": []}},
            {
                "host": "b.test",
                "mode": "bridge",
                "tls": {"cert": "c", "key": "k"},
                "backend": {"endpoints": ["127.0.0.1:1"]},
                "rate_limit": {"per_second": 0},
                "deny": [{"path": "("}],
                "hsts": "sometimes",
            },
            {
                "host": "p.test",
                "mode": "passthrough",
                "hsts": True,
                "proxy_protocol": "v3",
                "backend": {"endpoints": ["127.0.0.1:2"]},
            },
            {"host": "x.test", "mode": "teleport", "backend": {}},
        ],
        "default_route": "nowhere.test",
        "hello_timeout": 0,
        "handshake_timeout": "soon",
    }
    with pytest.raises(ConfigError) as err:
        parse_edge_config(bad, "edge.yaml")
    text = "\n".join(err.value.problems)
    for key in [
        "listen.https",
        "admin.listen",
        "bogus",
        "routes[0].host",
        "routes[0].tls",
        "routes[0].backend.endpoints",
        "routes[1].backend.spiffe_id",
        "routes[1].rate_limit.per_second",
        "routes[1].deny[0].path",
        "routes[1].hsts",
        "routes[2].hsts",
        "routes[2].proxy_protocol",
        "routes[3].mode",
        "identity",
        "default_route",
        "hello_timeout",
        "handshake_timeout",
    ]:
        assert f"edge.yaml: {key}:" in text, (key, text)


def test_duplicate_hosts_are_refused() -> None:
    dup = dict(GOOD, routes=[GOOD["routes"][1], GOOD["routes"][1]])
    with pytest.raises(ConfigError, match="pay.test has two routes"):
        parse_edge_config(dup, "edge.yaml")


def test_rate_limiter_burst_then_refill() -> None:
    rl = RateLimiter(rate=2.0, burst=3)
    assert [rl.allow("a", 0.0)[0] for _ in range(4)] == [True, True, True, False]
    ok, retry = rl.allow("a", 0.0)
    assert not ok and retry == 1
    assert rl.allow("b", 0.0)[0]  # per client IP
    assert rl.allow("a", 0.5)[0]  # one token back after 1/rate seconds
    assert not rl.allow("a", 0.5)[0]


def test_rate_limiter_forgets_old_clients() -> None:
    rl = RateLimiter(rate=1.0, burst=1, max_clients=2)
    for ip in ("a", "b", "c"):
        rl.allow(ip, 0.0)
    assert rl.allow("a", 0.0)[0]  # 'a' was evicted, so it starts with a full bucket


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(min_value=0, max_value=100), min_size=1, max_size=50),
    st.floats(min_value=0.1, max_value=50),
    st.integers(min_value=1, max_value=20),
)
def test_rate_limiter_never_exceeds_rate_plus_burst(
    times: list[float], rate: float, burst: int
) -> None:
    rl = RateLimiter(rate, burst)
    ts = sorted(times)
    allowed = sum(rl.allow("c", t)[0] for t in ts)
    assert allowed <= burst + rate * (ts[-1] - ts[0]) + 1e-6


def eps(n: int) -> tuple[HostPort, ...]:
    return tuple(HostPort("127.0.0.1", 9000 + i) for i in range(n))


def test_round_robin_skips_ejected_and_readmits() -> None:
    b = Balancer(eps(3), fall=2, rise=2)
    assert [b.pick().endpoint.port for _ in range(3)] == [9000, 9001, 9002]
    s1 = b.states[1]
    assert b.report(s1, False) is None
    assert b.report(s1, False) == "ejected"
    assert {b.pick().endpoint.port for _ in range(6)} == {9000, 9002}
    assert b.report(s1, True) is None
    assert b.report(s1, True) == "readmitted"
    assert {b.pick().endpoint.port for _ in range(6)} == {9000, 9001, 9002}
    for s in b.states:
        s.healthy = False
    assert b.pick() is None


def test_least_connections() -> None:
    b = Balancer(eps(3), policy="least_connections")
    b.states[0].active, b.states[1].active, b.states[2].active = 5, 1, 3
    assert b.pick().endpoint.port == 9001


def test_admin_public_paths() -> None:
    assert parse_edge_config(GOOD, "edge.yaml").admin_public_paths == {
        b"/live",
        b"/ready",
        b"/metrics",
    }
    cfg = dict(GOOD, admin=dict(GOOD["admin"], public_paths=["/ready"]))
    assert parse_edge_config(cfg, "edge.yaml").admin_public_paths == {b"/ready"}
    with pytest.raises(
        ConfigError, match=r"admin.public_paths: '/shutdown' cannot be served off loopback"
    ):
        parse_edge_config(
            dict(GOOD, admin=dict(GOOD["admin"], public_paths=["/shutdown"])), "edge.yaml"
        )


@pytest.mark.parametrize(
    "value, ok", [(30, True), (0.5, True), (0, False), ("2", False), (True, False)]
)
def test_pool_idle_seconds(value: object, ok: bool) -> None:
    if ok:
        assert (
            parse_edge_config(dict(GOOD, pool_idle_seconds=value), "edge.yaml").pool_idle_seconds
            == value
        )
    else:
        with pytest.raises(ConfigError, match="pool_idle_seconds: must be a number"):
            parse_edge_config(dict(GOOD, pool_idle_seconds=value), "edge.yaml")
    assert parse_edge_config(GOOD, "edge.yaml").pool_idle_seconds == 30.0
