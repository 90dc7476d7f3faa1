"""The edge's per-route traffic policy (`routes[].timeouts/retries/outlier/circuit`, the keys
and behaviour of a sidecar upstream's, net/resilient.py), with misbehaving backends
(tests/support/faulty_app.py): retries of a 503 within the budget, an ejected backend that
stops getting traffic and is readmitted, an active health check's verdict feeding the same
balancer, a fast 503 from the circuit breaker, the connect timeout at its value, and config
errors with file and key."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path

import pytest
import trio

from meshcar.edge.config import parse_edge_config
from meshcar.edge.health import health_loop
from meshcar.errors import ConfigError
from meshcar.tls.store import CredentialStore
from tests.integration.conftest import sid, start_node
from tests.integration.edge_fixtures import public_pki, start_edge, terminate_route, wait_until
from tests.support.echo_app import serve_echo
from tests.support.faulty_app import FaultyApp
from tests.support.pki import ThrowawayCA
from tests.support.ports import free_port
from tests.support.readall import read_to_close


async def _get(
    port: int, ctx: ssl.SSLContext, host: str = "www.test"
) -> tuple[int, dict[str, str], bytes, float]:
    start = trio.current_time()
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    async with trio.SSLStream(tcp, ctx, server_hostname=host) as s:
        await s.send_all(
            b"GET /x HTTP/1.1\r\nHost: %b\r\nConnection: close\r\n\r\n" % host.encode()
        )
        out = await read_to_close(s)
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split(" ", 2)[1]), headers, body, trio.current_time() - start


def _route(*ports: int, **policy: object) -> dict:
    r = terminate_route("www.test", ports[0], **policy)
    r["backend"]["endpoints"] = [f"127.0.0.1:{p}" for p in ports]
    return r


class _Gauge:
    """The health loop's gauge, unread here."""

    def labels(self, *names: str) -> _Gauge:
        return self

    def set(self, value: float) -> None:
        pass


def _events(edge, target: str, event: str) -> float:  # noqa: ANN001
    return edge.metrics.upstream_policy.labels(target, event)._value.get()


async def test_a_503_is_retried_within_the_budget(tmp_path: Path, nursery):
    pki = public_pki(tmp_path)
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    bad = await FaultyApp("bad", "503").start(nursery)
    retries = {"retry_on": [503], "max_attempts": 3, "budget_ratio": 0.25, "min_per_second": 0.1}
    edge = await start_edge(nursery, tmp_path, [_route(bad.port, retries=retries)])
    try:
        first = await _get(edge.https, ctx)
        assert first[0] == 503 and first[1]["x-meshcar-attempts"] in ("2", "3")
        for _ in range(19):
            status, headers, _, _ = await _get(edge.https, ctx)
            assert status == 503 and "x-meshcar-attempts" in headers
        # 20 requests, retries at most 0.25 of them plus the floor (0.1/s over the 10 s window)
        assert 21 <= bad.requests <= 20 + 5 + 1
        assert _events(edge, "www.test", "budget_exhausted") >= 1
        # with a good endpoint beside it (and a budget for half the requests failing once),
        # the 503s never reach the client
        good = await FaultyApp("good").start(nursery)
        no_eject = {"consecutive_failures": 0}
        edge2 = await start_edge(
            nursery,
            tmp_path,
            [_route(bad.port, good.port, retries=retries | {"budget_ratio": 1}, outlier=no_eject)],
        )
        try:
            for _ in range(10):
                status, headers, body, _ = await _get(edge2.https, ctx)
                assert status == 200 and json.loads(body)["name"] == "good", (headers, body)
        finally:
            await edge2.aclose()
    finally:
        await edge.aclose()


async def test_a_rules_backend_gets_the_routes_policy(tmp_path: Path, nursery):
    pki = public_pki(tmp_path)
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    bad, good = await FaultyApp("bad", "503").start(nursery), await FaultyApp("good").start(nursery)
    route = _route(
        1,  # the route's own backend: never reached, the rule takes /x
        retries={"retry_on": [503], "budget_ratio": 1},
        outlier={"consecutive_failures": 0},
    )
    ports = [f"127.0.0.1:{bad.port}", f"127.0.0.1:{good.port}"]
    route["rules"] = [{"match": {"path_prefix": "/x"}, "backend": {"endpoints": ports}}]
    edge = await start_edge(nursery, tmp_path, [route])
    try:
        for _ in range(30):
            status, _, body, _ = await _get(edge.https, ctx)
            assert status == 200 and json.loads(body)["name"] == "good"
        assert bad.requests >= 1 and _events(edge, "www.test/rules[0]", "retry") == bad.requests
    finally:
        await edge.aclose()


async def test_an_ejected_backend_stops_getting_traffic_and_is_readmitted(tmp_path: Path, nursery):
    pki = public_pki(tmp_path)
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    bad, good = await FaultyApp("bad", "503").start(nursery), await FaultyApp("good").start(nursery)
    outlier = {"consecutive_failures": 2, "base_ejection_seconds": 1.5}
    route = _route(bad.port, good.port, outlier=outlier, retries={"retry_on": [503]})
    edge = await start_edge(nursery, tmp_path, [route])
    try:
        with trio.fail_after(20):
            while _events(edge, "www.test", "ejected") < 1:
                assert (await _get(edge.https, ctx))[0] == 200  # retried on the good one
        ejected_at, seen = trio.current_time(), bad.requests
        bad.mode = "ok"
        for _ in range(20):
            status, _, body, _ = await _get(edge.https, ctx)
            if trio.current_time() - ejected_at >= 1.4:
                break
            assert status == 200 and json.loads(body)["name"] == "good"
        assert bad.requests == seen  # nothing while ejected
        with trio.fail_after(20):  # readmitted once the ejection is over
            while bad.requests == seen:
                await _get(edge.https, ctx)
        assert trio.current_time() - ejected_at >= 1.4
    finally:
        await edge.aclose()


async def test_an_endpoint_failing_active_checks_is_passed_over_by_the_policy(
    tmp_path: Path, nursery
):
    """Active health checks feed the policy's balancer: in only while both agree."""
    pki = public_pki(tmp_path)
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    bad, good = await FaultyApp("bad", "503").start(nursery), await FaultyApp("good").start(nursery)
    route = _route(bad.port, good.port, outlier={"consecutive_failures": 0})
    route["backend"]["health"] = {"interval": 0.1, "fall": 1, "rise": 1}
    edge = await start_edge(nursery, tmp_path, [route])
    try:
        nursery.start_soon(health_loop, edge.cfg.routes[0], edge.backends, _Gauge())
        lb = edge.backends.policies["www.test"].balancer
        await wait_until(lambda: not lb.endpoints[0].healthy)
        for _ in range(20):  # (bad's request count has the checks in it)
            status, _, body, _ = await _get(edge.https, ctx)
            assert status == 200 and json.loads(body)["name"] == "good"
        bad.mode = "ok"
        await wait_until(lambda: lb.endpoints[0].healthy)
    finally:
        await edge.aclose()


async def test_the_circuit_breaker_answers_a_fast_503(tmp_path: Path, nursery):
    pki = public_pki(tmp_path)
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    app = await FaultyApp("hang", "hang").start(nursery)
    edge = await start_edge(nursery, tmp_path, [_route(app.port, circuit={"max_requests": 1})])
    try:
        seen = app.seen
        nursery.start_soon(_get, edge.https, ctx)  # held by the hanging backend
        with trio.fail_after(10):
            await seen.wait()
        status, _, body, took = await _get(edge.https, ctx)
        assert status == 503
        assert "circuit open: 1 requests in flight (max_requests)" in json.loads(body)["message"]
        assert took < 2
        assert _events(edge, "www.test", "circuit_open") == 1
        assert app.requests == 1
    finally:
        await edge.aclose()


async def test_the_connect_timeout_fires_at_its_value(tmp_path: Path, nursery):
    pki = public_pki(tmp_path)
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    # a listener whose accept queue is full: the kernel drops further SYNs, connects hang
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(full.getsockname())
        fillers.append(s)
    route = _route(
        full.getsockname()[1], timeouts={"connect_seconds": 0.6}, retries={"max_attempts": 1}
    )
    edge = await start_edge(nursery, tmp_path, [route])
    try:
        status, _, body, took = await _get(edge.https, ctx)
        assert status == 504, body
        assert "timed out" in json.loads(body)["message"]
        assert 0.6 <= took < 5
    finally:
        await edge.aclose()
        for s in [full, *fillers]:
            s.close()


async def test_a_bridge_route_through_the_policy(tmp_path: Path, nursery):
    """mTLS to a real sidecar through the policy's balancer (a dead endpoint beside it is
    retried as a connect failure), and the connect timeout covering the TLS handshake."""
    pki = public_pki(tmp_path)
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    echo_port = await serve_echo(nursery)
    mesh_ca = ThrowawayCA.create()
    api = await start_node(nursery, tmp_path, mesh_ca, "api", echo_port, [sid("edge")], {})
    silent = await FaultyApp("silent", "silent").start(nursery)
    store = CredentialStore(tmp_path / "edge-state")
    store.install(mesh_ca.credential(sid("edge")))

    def bridge(host: str, ports: list[int], **policy: object) -> dict:
        return {
            "host": host,
            "mode": "bridge",
            "tls": {"cert": "site.pem", "key": "site.pem"},
            "backend": {
                "endpoints": [f"127.0.0.1:{p}" for p in ports],
                "spiffe_id": sid("api"),
            },
            **policy,
        }

    identity = {
        "spiffe_id": sid("edge"),
        "ca_url": "https://127.0.0.1:1",
        "ca_bundle": "x",
        "state_dir": str(tmp_path / "edge-state"),
    }
    routes = [
        bridge("www.test", [free_port(), api.inbound_port], outlier={"consecutive_failures": 0}),
        bridge(
            "api.test",
            [silent.port],
            timeouts={"connect_seconds": 0.6},
            retries={"max_attempts": 1},
        ),
    ]
    edge = await start_edge(nursery, tmp_path, routes, store, identity=identity)
    try:
        attempts = set()
        for _ in range(10):
            status, headers, body, _ = await _get(edge.https, ctx)
            assert status == 200, body
            attempts.add(headers["x-meshcar-attempts"])
        assert attempts <= {"1", "2"} and _events(edge, "www.test", "retry") >= 1
        status, _, body, took = await _get(edge.https, ctx, "api.test")
        assert status == 504, body
        assert "timed out" in json.loads(body)["message"]
        assert 0.6 <= took < 5
    finally:
        await edge.aclose()
        await api.inbound.aclose()


def test_traffic_policy_errors_name_file_and_key_all_at_once(tmp_path: Path):
    raw = {
        "listen": {"https": "127.0.0.1:1"},
        "admin": {"listen": "127.0.0.1:1"},
        "routes": [
            terminate_route(
                "www.test",
                1,
                timeouts={"connect_seconds": 0, "idle_seconds": "x"},
                retries={"retry_on": ["teapot"], "max_attempts": 0, "bogus": 1},
            ),
            terminate_route(
                "api.test",
                1,
                outlier={"base_ejection_seconds": 10, "max_ejection_seconds": 5},
                circuit={"max_requests": 0},
            ),
            {
                "host": "p.test",
                "mode": "passthrough",
                "backend": {"endpoints": ["127.0.0.1:1"]},
                "retries": {},
            },
        ],
    }
    with pytest.raises(ConfigError) as exc:
        parse_edge_config(raw, "edge.yaml", tmp_path)
    got = exc.value.problems
    for k in (
        "routes[0].timeouts.connect_seconds: must be",
        "routes[0].timeouts.idle_seconds: must be",
        "routes[0].retries.retry_on[0]: 'teapot' is not",
        "routes[0].retries.max_attempts: must be",
        "routes[0].retries.bogus: unknown key",
        "routes[1].outlier.max_ejection_seconds: must not be less",
        "routes[1].circuit.max_requests: must be",
        "routes[2].retries: passthrough routes never decrypt",
    ):
        assert any(p.startswith(f"edge.yaml: {k}") for p in got), (k, got)
