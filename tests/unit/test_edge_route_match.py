"""Edge routing (edge/routes/match.py, rules.py): wildcard hosts (exact > most specific
wildcard), rules by path prefix/exact/regex, method and headers, weighted splits (seeded and
within binomial bounds), config errors all at once with file and key."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from meshcar.edge.config import parse_edge_config
from meshcar.edge.routes.match import Splitter, find_host, host_table
from meshcar.errors import ConfigError


def edge(routes: list[dict[str, Any]], **top: Any) -> Any:
    raw = {
        "listen": {"https": "127.0.0.1:8443"},
        "admin": {"listen": "127.0.0.1:7204"},
        "routes": routes,
        **top,
    }
    return parse_edge_config(raw, "edge.yaml", Path("/tmp"))


def term(host: str, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "host": host,
        "mode": "terminate",
        "tls": {"cert": "s.pem", "key": "s.pem"},
    }
    if "backends" not in extra:
        out["backend"] = {"endpoints": ["127.0.0.1:9000"]}
    return out | extra


@pytest.mark.parametrize(
    ("host", "want"),
    [
        ("api.demo.test", "api.demo.test"),  # exact beats the wildcard
        ("www.demo.test", "*.demo.test"),
        ("x.y.demo.test", "*.demo.test"),  # any depth
        ("b.a.demo.test", "*.a.demo.test"),  # the most specific wildcard
        ("a.demo.test", "*.demo.test"),  # *.a.demo.test is below a.demo.test only
        ("demo.test", None),  # *.demo.test is not demo.test
        ("xdemo.test", None),
        ("other.test", None),
    ],
)
def test_wildcard_hosts(host: str, want: str | None) -> None:
    cfg = edge([term("*.demo.test"), term("api.demo.test"), term("*.a.demo.test")])
    r = cfg.route_for(host)
    assert (r.host if r else None) == want


def test_host_table_is_order_independent_for_specificity() -> None:
    t = host_table(["*.test", "*.b.test", "a.b.test"])
    assert find_host(t, "a.b.test") == 2 and find_host(t, "c.b.test") == 1
    assert find_host(t, "c.test") == 0


def test_bad_hosts_are_refused() -> None:
    with pytest.raises(ConfigError) as ei:
        edge([term("*"), term("a.*.test"), term("*x.test"), term("*.*.test")])
    assert [p.split(":")[1].strip() for p in ei.value.problems] == [
        f"routes[{i}].host" for i in range(4)
    ]


RULES = [
    {"match": {"headers": [{"name": "X-Canary", "value": "1"}]}, "backend": {"endpoints": ["c:1"]}},
    {"match": {"path_exact": "/login", "methods": ["post"]}, "backend": {"endpoints": ["l:1"]}},
    {"match": {"path_regex": "/u/[0-9]+"}, "backend": {"endpoints": ["u:1"]}},
    {
        "match": {"path_prefix": "/api/", "headers": [{"name": "user-agent", "pattern": "^curl/"}]},
        "backend": {"endpoints": ["a:1"]},
    },
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "want"),
    [
        ("GET", "/x", [(b"x-canary", b" 1 ")], "www.test/rules[0]"),
        ("GET", "/x", [(b"x-canary", b"2")], "www.test"),
        ("POST", "/login", [], "www.test/rules[1]"),
        ("GET", "/login", [], "www.test"),
        ("GET", "/u/12", [], "www.test/rules[2]"),
        ("GET", "/u/12/x", [], "www.test"),  # the whole path
        ("GET", "/api/v", [(b"User-Agent", b"curl/8")], "www.test/rules[3]"),
        ("GET", "/api/v", [(b"User-Agent", b"wget")], "www.test"),
        ("GET", "/other", [], "www.test"),  # no rule: the route's own backend
    ],
)
def test_rules_pick_the_backend(method, path, headers, want) -> None:
    cfg = edge([term("www.test", rules=RULES)])
    (route,) = cfg.routes
    split = route.select(method, path, headers)
    assert split is not None and split.keys == (want,)
    if want != "www.test":
        assert dict(route.targets())[want].endpoints[0].host == want[-2].translate(
            {ord("0"): "c", ord("1"): "l", ord("2"): "u", ord("3"): "a"}
        )


def test_no_rule_and_not_the_route_path_is_none() -> None:
    (route,) = edge([term("www.test", rules=RULES[:1], path_exact="/only")]).routes
    assert route.select("GET", "/other", []) is None  # 404
    assert route.select("GET", "/only", []) is route.default_split
    assert route.select("GET", "/other", [(b"x-canary", b"1")]) is route.rules[0].split


def _split_cfg(weights: list[int]) -> Any:
    backends = [
        {"weight": w, "endpoints": [f"127.0.0.1:{9000 + i}"]} for i, w in enumerate(weights)
    ]
    return edge([term("www.test", backends=backends)])


def test_seeded_split_is_deterministic_and_weight_zero_takes_nothing() -> None:
    (route,) = _split_cfg([3, 0, 1]).routes
    split = route.default_split
    a = [Splitter(7).pick(split) for _ in range(1)]
    s1, s2 = Splitter(42), Splitter(42)
    seq1 = [s1.pick(split) for _ in range(200)]
    assert seq1 == [s2.pick(split) for _ in range(200)] and a
    assert "www.test/backends[1]" not in seq1
    assert split.pick(0.0) == "www.test/backends[0]" and split.pick(0.7499) == split.pick(0.0)
    assert split.pick(0.75) == "www.test/backends[2]" and split.pick(0.9999) == split.pick(0.75)


def test_split_holds_its_weights_within_binomial_bounds() -> None:
    """90/10 over N draws: the canary's count within 3.29 sigma (99.9%, two-sided)."""
    (route,) = _split_cfg([90, 10]).routes
    n, p = 20000, 0.1
    got = Counter(Splitter().pick(route.default_split) for _ in range(n))
    bound = 3.29 * math.sqrt(n * p * (1 - p))
    assert abs(got["www.test/backends[1]"] - n * p) <= bound, got


def test_bad_rules_and_splits_are_all_reported_with_file_and_key() -> None:
    routes = [
        term(
            "www.test",
            backends=[{"weight": -1, "endpoints": ["x:1"], "colour": 1}, {"endpoints": []}],
            rules=[
                {"match": {"path_regex": "(", "path_prefix": "/a/../b", "methods": "GET"}},
                {"match": {"headers": [{"value": "x"}]}, "backend": {"endpoints": ["y:1"]}},
                {
                    "match": {},
                    "backend": {"endpoints": ["y:1"]},
                    "backends": [{"endpoints": ["z:1"]}],
                },
                "no",
            ],
        ),
        term("zero", backends=[{"weight": 0, "endpoints": ["x:1"]}]),
        {
            "host": "p.test",
            "mode": "passthrough",
            "backends": [{"endpoints": ["x:1"]}],
            "rules": [],
        },
    ]
    with pytest.raises(ConfigError) as ei:
        edge(routes)
    keys = [p.split(": ")[1] for p in ei.value.problems]
    assert all(p.startswith("edge.yaml: ") for p in ei.value.problems)
    for want in [
        "routes[0].backends[0].colour",
        "routes[0].backends[0].weight",
        "routes[0].backends[1].endpoints",
        "routes[0].rules[0].match.path_prefix",
        "routes[0].rules[0].match.path_regex",
        "routes[0].rules[0].match.methods",
        "routes[0].rules[0].backend",
        "routes[0].rules[1].match.headers[0]",
        "routes[0].rules[2].backend",
        "routes[0].rules[3]",
        "routes[1].backends",
        "routes[2].backends",
        "routes[2].rules",
    ]:
        assert want in keys, (want, ei.value.problems)
