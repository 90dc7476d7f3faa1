"""The edge's pure decisions: route by host (and the default route), path prefix/exact,
WAF deny rules, Host header parsing and the HTTP -> HTTPS redirect target."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshcar.edge.config import parse_edge_config
from meshcar.edge.http import Redirector, host_of, split_host_port
from meshcar.proto.http1 import RequestHead


def _cfg(**extra):
    data = {
        "listen": {"https": "127.0.0.1:8443", "http": "127.0.0.1:8080"},
        "admin": {"listen": "127.0.0.1:7204"},
        "routes": [
            {
                "host": "www.test",
                "mode": "terminate",
                "tls": {"cert": "c.pem", "key": "k.pem"},
                "backend": {"endpoints": ["127.0.0.1:9001"]},
            },
            {
                "host": "api.test",
                "mode": "terminate",
                "tls": {"cert": "c.pem", "key": "k.pem"},
                "path_prefix": "/v1/",
                "backend": {"endpoints": ["127.0.0.1:9002"]},
                "deny": [
                    {"name": "read-only", "methods": ["DELETE", "put"]},
                    {"name": "no-admin", "path": "^/v1/admin(/|$)"},
                    {
                        "name": "scanner",
                        "header": {"name": "User-Agent", "pattern": "(?i)sqlmap|nikto"},
                    },
                    {
                        "name": "post-debug",
                        "methods": ["POST"],
                        "path": "/debug",
                        "header": {"name": "X-Debug", "pattern": "^1$"},
                    },
                ],
            },
            {
                "host": "exact.test",
                "mode": "terminate",
                "tls": {"cert": "c.pem", "key": "k.pem"},
                "path_exact": "/only",
                "backend": {"endpoints": ["127.0.0.1:9003"]},
            },
            {
                "host": "pay.test",
                "mode": "passthrough",
                "backend": {"endpoints": ["127.0.0.1:9443"]},
            },
        ],
        **extra,
    }
    return parse_edge_config(data, "edge.yaml", Path("/etc/meshcar"))


def test_route_by_host_and_the_default_route() -> None:
    cfg = _cfg()
    assert cfg.route_for("api.test").backend.endpoints[0].port == 9002
    assert cfg.route_for("nope.test") is None and cfg.route_for(None) is None
    with_default = _cfg(default_route="www.test")
    assert with_default.route_for("nope.test").host == "www.test"
    assert with_default.route_for(None).host == "www.test"
    assert with_default.route_for("pay.test").host == "pay.test"  # an exact host wins


def test_path_prefix_and_exact() -> None:
    cfg = _cfg()
    api, exact, www = (
        cfg.route_for("api.test"),
        cfg.route_for("exact.test"),
        cfg.route_for("www.test"),
    )
    assert api.path_matches("/v1/") and api.path_matches("/v1/pay")
    assert (
        not api.path_matches("/v1") and not api.path_matches("/v2/x") and not api.path_matches("/")
    )
    assert exact.path_matches("/only")
    assert (
        not exact.path_matches("/only/")
        and not exact.path_matches("/onlyx")
        and not exact.path_matches("/")
    )
    assert www.path_matches("/") and www.path_matches("/anything")


@pytest.mark.parametrize(
    ("method", "path", "headers", "rule"),
    [
        ("DELETE", "/v1/x", [], "read-only"),
        ("PUT", "/v1/x", [], "read-only"),
        ("GET", "/v1/admin", [], "no-admin"),
        ("GET", "/v1/admin/users", [], "no-admin"),
        ("GET", "/v1/x", [(b"user-agent", b"SQLMap/1.7")], "scanner"),
        ("GET", "/v1/x", [(b"User-Agent", b"curl/8"), (b"User-Agent", b"nikto")], "scanner"),
        ("POST", "/v1/debug", [(b"X-Debug", b"1")], "post-debug"),
        ("GET", "/v1/x", [], None),
        ("GET", "/v1/administrator", [], None),  # the pattern is anchored at a path segment
        ("POST", "/v1/debug", [(b"X-Debug", b"0")], None),  # all conditions of a rule must hold
        ("GET", "/v1/debug", [(b"X-Debug", b"1")], None),
        ("POST", "/v1/debug", [], None),
    ],
)
def test_waf_rules(method: str, path: str, headers: list, rule: str | None) -> None:
    api = _cfg().route_for("api.test")
    hit = next((r.name for r in api.deny if r.matches(method, path, headers)), None)
    assert hit == rule


def test_host_header_parsing() -> None:
    def req(host: bytes | None) -> RequestHead:
        headers = [(b"Host", host)] if host is not None else []
        return RequestHead(b"GET", b"/", "1.1", headers, True, False, None)

    assert host_of(req(b"WWW.Test:8443")) == "www.test"
    assert host_of(req(b"www.test")) == "www.test"
    assert host_of(req(b"[::1]:8443")) == "[::1]"
    assert host_of(req(None)) is None
    assert split_host_port("[::1]:8080") == ("[::1]", "8080")
    assert split_host_port("[::1]") == ("[::1]", "")
    assert split_host_port("a.test:1") == ("a.test", "1")
    assert split_host_port(":1") == (":1", "")


@pytest.mark.parametrize(
    ("host", "target", "location"),
    [
        ("www.test", "/x?y=1", "https://www.test/x?y=1"),
        ("www.test:443", "/x", "https://www.test/x"),
        (
            "www.test:8080",
            "/a/b?c=d&e",
            "https://www.test:8443/a/b?c=d&e",
        ),  # the HTTP port -> the HTTPS one
        ("www.test:9999", "/x", "https://www.test:9999/x"),  # any other port is kept
        ("[::1]:8080", "/x", "https://[::1]:8443/x"),
        ("www.test", "*", "https://www.test/"),
    ],
)
def test_redirect_location(host: str, target: str, location: str) -> None:
    assert Redirector(_cfg()).location(host, target) == location
