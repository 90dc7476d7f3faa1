"""meshcar/dashboard/model.py: metrics and access-log entries -> the mesh the page shows."""

from __future__ import annotations

import datetime as dt

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from meshcar.admin import recent
from meshcar.dashboard.main import demo_targets, main, parse_target
from meshcar.dashboard.model import (
    Snapshot,
    build_mesh,
    compute_edges,
    direction_stats,
    histogram_quantile,
    parse_metrics,
    sample_quantile,
)

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
TD = "spiffe://meshcar.demo/svc"


def _metrics(observations: list[tuple[str, int, float]]) -> str:
    """The exposition text of a registry with the sidecar's request metrics observed."""
    r = CollectorRegistry()
    c = Counter("meshcar_requests", "", ["direction", "status"], registry=r)
    h = Histogram(
        "meshcar_request_duration_seconds",
        "",
        ["direction"],
        registry=r,
        buckets=(0.001, 0.005, 0.01, 0.1, 1),
    )
    for direction, status, seconds in observations:
        c.labels(direction, str(status)).inc()
        h.labels(direction).observe(seconds)
    return generate_latest(r).decode()


def test_histogram_quantile_interpolates_as_prometheus_does() -> None:
    buckets = [(0.1, 50.0), (0.2, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)  # from 0 to the first bound
    assert histogram_quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None
    # past the highest finite bound: that bound (Prometheus answers the same)
    assert histogram_quantile(0.99, [(0.1, 1.0), (float("inf"), 10.0)]) == pytest.approx(0.1)


def test_sample_quantile_is_nearest_rank() -> None:
    assert sample_quantile(0.5, [5.0, 1.0, 3.0, 2.0, 4.0]) == 3.0
    assert sample_quantile(0.99, [float(i) for i in range(1, 101)]) == 99.0
    assert sample_quantile(0.5, []) is None


def test_direction_stats_from_the_exposition() -> None:
    text = _metrics(
        [("inbound", 200, 0.002)] * 8 + [("inbound", 503, 0.5)] * 2 + [("outbound", 404, 0.02)]
    )
    stats = direction_stats(parse_metrics(text))
    assert stats["inbound"]["requests"] == 10
    assert stats["inbound"]["success_rate"] == 0.8
    assert 1 < stats["inbound"]["p50_ms"] <= 5  # inside the (1 ms, 5 ms] bucket
    assert 100 < stats["inbound"]["p99_ms"] <= 1000
    assert stats["outbound"] == {
        "requests": 1,
        "success_rate": 1.0,  # a 4xx is an answer: the caller's problem
        "p50_ms": pytest.approx(55.0),
        "p99_ms": pytest.approx(99.1),
    }


def _entry(**kw: object) -> dict:
    return {"ts": "2026-01-01T12:00:00.000Z", "type": "request", **kw}


def _snaps() -> list[Snapshot]:
    web = Snapshot("web", "http://127.0.0.1:1", certs={"spiffe_id": f"{TD}/web"})
    api = Snapshot(
        "api",
        "http://127.0.0.1:2",
        certs={"spiffe_id": f"{TD}/api", "not_after": "2026-01-01T13:30:00+00:00"},
    )
    edge = Snapshot(
        "edge",
        "http://127.0.0.1:3",
        certs={"spiffe_id": f"{TD}/edge", "not_after": "2026-01-01T11:00:00+00:00"},
        routes=[
            {"host": "www.test", "mode": "terminate", "endpoints": ["127.0.0.1:8080"]},
            {"host": "api.test", "mode": "bridge", "endpoints": ["127.0.0.1:15001"]},
        ],
        metrics=(
            "# TYPE meshcar_edge_requests counter\n"
            'meshcar_edge_requests_total{route="www.test",mode="terminate",status="200"} 3\n'
            'meshcar_edge_requests_total{route="www.test",mode="terminate",status="502"} 1\n'
        ),
    )
    web.recent = [
        # counted by api's inbound entries, not twice
        _entry(direction="outbound", upstream="api", status=200, duration_ms=9.0, seq=1),
        _entry(direction="outbound", upstream="payments", status=503, duration_ms=1.0, seq=2),
    ]
    api.recent = [
        _entry(direction="inbound", peer=f"{TD}/web", status=200, duration_ms=d, seq=i)
        for i, d in enumerate([1.0, 2.0, 3.0, 40.0], 1)
    ] + [
        _entry(direction="inbound", peer=f"{TD}/web", status=500, duration_ms=5.0, seq=5),
        _entry(direction="inbound", peer=f"{TD}/edge", status=200, duration_ms=2.0, seq=6),
        _entry(direction="inbound", peer="spiffe://other.org/ns/x/sa/batch", status=403, seq=7),
    ]
    edge.recent = [
        _entry(mode="terminate", host="www.test", status=200, duration_ms=3.0, seq=1),
        {"ts": "2026-01-01T12:00:01.000Z", "type": "connection", "event": "closed", "seq": 2},
    ]
    return [web, api, edge]


def test_edges_name_caller_and_callee_once() -> None:
    edges = {(e["caller"], e["callee"]): e for e in compute_edges(_snaps())}
    assert set(edges) == {
        ("web", "api"),
        ("edge", "api"),  # a bridge route: the edge's identity seen by api's inbound
        ("batch", "api"),  # an identity no target holds: its SPIFFE ID's last segment
        ("web", "payments"),  # an upstream that is no target: from the caller's outbound
        ("edge", "www.test"),
    }
    wa = edges[("web", "api")]
    assert wa["requests"] == 5 and wa["success_rate"] == 0.8
    assert wa["p50_ms"] == 3.0 and wa["p99_ms"] == 40.0
    assert (
        edges[("batch", "api")]["success_rate"] == 1.0 and edges[("batch", "api")]["p50_ms"] is None
    )
    assert edges[("web", "payments")]["success_rate"] == 0.0


def test_build_mesh_services_identities_routes_tail() -> None:
    mesh = build_mesh(_snaps(), NOW)
    by_name = {s["name"]: s for s in mesh["services"]}
    assert [by_name[n]["role"] for n in ("web", "api", "edge")] == ["sidecar", "sidecar", "edge"]
    assert by_name["payments"]["role"] == "external" and by_name["www.test"]["role"] == "external"
    assert by_name["api"]["identity"]["expires_in_seconds"] == 5400
    assert by_name["edge"]["identity"]["expires_in_seconds"] == -3600  # expired: negative
    assert by_name["web"]["identity"]["expires_in_seconds"] is None  # no not_after reported
    routes = mesh["routes"]
    assert list(routes) == ["bridge", "terminate"]
    (www,) = routes["terminate"]
    assert www["host"] == "www.test" and www["requests"] == 4 and www["success_rate"] == 0.75
    assert routes["bridge"][0]["requests"] == 0 and routes["bridge"][0]["success_rate"] is None
    tail = mesh["tail"]
    assert tail[0]["target"] == "edge" and tail[0]["type"] == "connection"  # newest first
    assert len(tail) == 2 + 2 + 7


def test_an_unreachable_target_is_shown_with_its_error() -> None:
    mesh = build_mesh([Snapshot("web", "http://127.0.0.1:1", error="ConnectError")], NOW)
    (web,) = mesh["services"]
    assert web["error"] == "ConnectError" and web["identity"] is None and web["traffic"] == {}


def test_recent_ring_buffer_is_bounded_and_paged_by_sequence() -> None:
    recent.clear()
    for i in range(recent.RECENT_MAX + 5):
        recent.record({"n": i})
    kept = recent.recent()
    assert len(kept) == recent.RECENT_MAX and kept[0]["n"] == 5  # the oldest dropped
    last = kept[-1]["seq"]
    recent.record({"n": "new"})
    assert [e["n"] for e in recent.recent(after=last)] == ["new"]
    assert len(recent.recent(limit=3)) == 3
    recent.clear()


def test_parse_target() -> None:
    assert parse_target("api=http://127.0.0.1:15001/") == ("api", "http://127.0.0.1:15001")
    for bad in ("api", "=http://x", "api=127.0.0.1:1"):
        with pytest.raises(Exception, match="NAME=http"):
            parse_target(bad)


PEER_METRICS = (
    "# TYPE meshcar_peer_requests counter\n"
    f'meshcar_peer_requests_total{{direction="inbound",peer="{TD}/web",code="2xx"}} 90\n'
    f'meshcar_peer_requests_total{{direction="inbound",peer="{TD}/web",code="5xx"}} 10\n'
    'meshcar_peer_requests_total{direction="inbound",peer="other",code="4xx"} 2\n'
)


def test_per_peer_counters_give_an_edges_requests_and_success_rate() -> None:
    """Counted since the process started (meshcar_peer_requests_total), not only the last 200
    entries; the latency still comes from the entries (no per-peer histogram)."""
    snaps = _snaps()
    snaps[1].metrics = PEER_METRICS  # api
    snaps[0].metrics = (  # web: outbound to api is api's inbound edge, counted once
        "# TYPE meshcar_peer_requests counter\n"
        'meshcar_peer_requests_total{direction="outbound",peer="api",code="2xx"} 90\n'
        'meshcar_peer_requests_total{direction="outbound",peer="ledger",code="2xx"} 4\n'
    )
    edges = {(e["caller"], e["callee"]): e for e in build_mesh(snaps, NOW)["edges"]}
    wa = edges[("web", "api")]
    assert (wa["requests"], wa["success_rate"], wa["source"]) == (100, 0.9, "metrics")
    assert wa["p50_ms"] == 3.0  # from api's recent inbound entries
    assert edges[("other", "api")]["requests"] == 2  # past the label bound: "other"
    ledger = edges[("web", "ledger")]
    assert ledger["requests"] == 4 and ledger["p50_ms"] is None  # no entry in the window
    assert edges[("edge", "api")]["source"] == "recent"  # not counted by peer: the window


def test_passthrough_routes_count_connections() -> None:
    snaps = _snaps()
    snaps[2].routes = [{"host": "pay.test", "mode": "passthrough", "endpoints": ["127.0.0.1:9"]}]
    snaps[2].metrics = (
        "# TYPE meshcar_edge_connections counter\n"
        'meshcar_edge_connections_total{route="pay.test",result="closed"} 3\n'
        'meshcar_edge_connections_total{route="pay.test",result="error"} 1\n'
    )
    (pay,) = build_mesh(snaps, NOW)["routes"]["passthrough"]
    assert pay["requests"] == 4 and pay["success_rate"] == 0.75


def test_from_demo_reads_every_demo_service_and_the_edge() -> None:
    from meshcar.demo import scenario as sc

    targets = dict(demo_targets())
    assert set(targets) == {s.name for s in sc.SCENARIO.services} | {"edge"}
    assert targets["api"] == f"http://127.0.0.1:{sc.SCENARIO.service('api').admin_port}"
    assert targets["edge"] == f"http://127.0.0.1:{sc.EDGE_ADMIN_PORT}"


def test_a_non_loopback_listen_address_needs_allow_remote(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--from-demo", "--listen", "0.0.0.0:9900"])
    assert exc.value.code == 2 and "--allow-remote" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])  # no target at all
    assert "--from-demo" in capsys.readouterr().err
