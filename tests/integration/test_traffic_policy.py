"""Traffic policy of an outbound upstream, end to end over real mTLS on loopback: a client
sidecar ("web") calls upstream `api` whose endpoints are real api sidecars in front of
misbehaving apps (tests/support/faulty_app.py: slow, hanging, answering 503, resetting,
accepting and never answering), or a fake peer holding api's SVID.

Timeouts are asserted with a lower bound (the configured value) and a generous upper one;
retries against the budget's arithmetic; ejection and readmission on the apps' request
counts; every wait is on a request count, a metric or a response, never a sleep."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest
import trio

from meshcar.sidecar.inbound import Inbound  # noqa: F401  (the server nodes' listener)
from tests.integration.conftest import NODES, Node, sid, start_node
from tests.support.faulty_app import FaultyApp
from tests.support.pki import ThrowawayCA
from tests.support.readall import read_to_close


@pytest.fixture(autouse=True)
async def _close_nodes():
    yield
    for node in NODES:
        await node.inbound.aclose()
        await node.outbound.aclose()
    NODES.clear()


async def get(port: int, target: str = "/x", method: str = "GET", body: bytes = b"") -> tuple:
    """One request on a new connection: (status, headers dict, body, seconds)."""
    start = trio.current_time()
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        extra = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
        await s.send_all(
            f"{method} {target} HTTP/1.1\r\nHost: api\r\n{extra}Connection: close\r\n\r\n".encode()
            + body
        )
        out = await read_to_close(s)
    head, _, rest = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, rest, trio.current_time() - start


def events(node: Node, event: str) -> float:
    return node.metrics.upstream_policy.labels("api", event)._value.get()


async def client_for(
    nursery: trio.Nursery, tmp: Path, ca: ThrowawayCA, ports: list[int], **traffic: object
) -> Node:
    return await start_node(
        nursery,
        tmp,
        ca,
        "web",
        1,
        [],
        {
            "api": {
                "endpoints": [f"127.0.0.1:{p}" for p in ports],
                "spiffe_id": sid("api"),
                **traffic,
            }
        },
    )


async def api_node(nursery: trio.Nursery, tmp: Path, ca: ThrowawayCA, app: FaultyApp) -> Node:
    await app.start(nursery)
    return await start_node(nursery, tmp / app.name, ca, "api", app.port, [sid("web")], {})


async def test_per_try_timeout_fires_at_its_value_with_a_clear_504(tmp_path, nursery):
    ca = ThrowawayCA.create()
    api = await api_node(nursery, tmp_path, ca, FaultyApp("a", "hang"))
    web = await client_for(
        nursery,
        tmp_path,
        ca,
        [api.inbound_port],
        timeouts={"per_try_seconds": 0.5},
        retries={"retry_on": []},
    )
    status, _, body, took = await get(web.outbound_port)
    assert status == 504
    assert "upstream api" in json.loads(body)["message"]
    assert "0.5s" in json.loads(body)["message"]
    assert 0.5 <= took < 5


async def test_request_timeout_bounds_the_whole_exchange_with_its_retries(tmp_path, nursery):
    ca = ThrowawayCA.create()
    app = FaultyApp("a", "hang")
    api = await api_node(nursery, tmp_path, ca, app)
    web = await client_for(
        nursery,
        tmp_path,
        ca,
        [api.inbound_port],
        timeouts={"per_try_seconds": 0.3, "request_seconds": 1.0},
        retries={"retry_on": ["timeout"], "max_attempts": 10, "min_per_second": 100},
        outlier={"consecutive_failures": 0},
    )
    status, _, body, took = await get(web.outbound_port)
    assert status == 504
    assert "request timeout (1s" in json.loads(body)["message"]
    assert 1.0 <= took < 6
    assert app.requests >= 2  # per-try timeouts were retried inside the request timeout
    assert events(web, "request_timeout") == 1


async def test_connect_timeout_fires_at_its_value(tmp_path, nursery):
    ca = ThrowawayCA.create()
    silent = await FaultyApp("s", "silent").start(nursery)  # TCP accepted, no TLS handshake
    web = await client_for(
        nursery,
        tmp_path,
        ca,
        [silent.port],
        timeouts={"connect_seconds": 0.5},
        retries={"max_attempts": 1},
    )
    status, _, body, took = await get(web.outbound_port)
    assert status == 504
    assert "timed out" in json.loads(body)["message"]
    assert 0.5 <= took < 5


async def test_a_503_is_retried_on_another_try_and_the_app_sees_the_attempts(tmp_path, nursery):
    ca = ThrowawayCA.create()
    good, bad = FaultyApp("good"), FaultyApp("bad", "503")
    a = await api_node(nursery, tmp_path, ca, good)
    b = await api_node(nursery, tmp_path, ca, bad)
    web = await client_for(
        nursery,
        tmp_path,
        ca,
        [a.inbound_port, b.inbound_port],
        retries={"retry_on": [503], "max_attempts": 5, "min_per_second": 1000},
        outlier={"consecutive_failures": 0},
    )
    attempts = []
    for _ in range(30):
        status, headers, body, _ = await get(web.outbound_port)
        assert status == 200, body
        assert json.loads(body)["name"] == "good"
        attempts.append(int(headers["x-meshcar-attempts"]))
    assert bad.requests > 0  # the 503s were held back and retried
    assert sum(n - 1 for n in attempts) == bad.requests == events(web, "retry")


async def test_retries_stay_within_the_budget_under_a_failure_storm(tmp_path, nursery):
    ca = ThrowawayCA.create()
    app = FaultyApp("storm", "503")
    api = await api_node(nursery, tmp_path, ca, app)
    web = await client_for(
        nursery,
        tmp_path,
        ca,
        [api.inbound_port],
        retries={
            "retry_on": [503],
            "max_attempts": 3,
            "budget_ratio": 0.2,
            "min_per_second": 0,
            "window_seconds": 600,
        },
    )
    n = 50
    for _ in range(n):
        status, _, _, _ = await get(web.outbound_port)
        assert status == 503  # the last answer always goes through
    retries = events(web, "retry")
    assert 0 < retries <= 0.2 * n
    assert app.requests == n + retries
    assert events(web, "budget_exhausted") > 0


async def test_a_reset_before_the_response_is_retried(tmp_path, nursery):
    ca = ThrowawayCA.create()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cred = ca.credential(sid("api"))
    cert = tmp_path / "api.pem"
    cert.write_text(cred.chain_pem + cred.key_pem)
    ctx.load_cert_chain(cert)
    resetter = await FaultyApp("reset", "reset", tls=ctx).start(nursery)
    good = FaultyApp("good")
    a = await api_node(nursery, tmp_path, ca, good)
    web = await client_for(
        nursery,
        tmp_path,
        ca,
        [resetter.port, a.inbound_port],
        retries={"retry_on": ["reset"], "max_attempts": 3, "min_per_second": 1000},
        outlier={"consecutive_failures": 0},
    )
    for _ in range(20):
        status, _, body, _ = await get(web.outbound_port)
        assert status == 200, body
    assert resetter.requests > 0
    assert events(web, "retry") == resetter.requests


async def test_an_ejected_endpoint_gets_no_traffic_and_is_readmitted(tmp_path, nursery):
    ca = ThrowawayCA.create()
    # the failing endpoint answers fastest, so the latency balancer alone would favour it
    good, bad = FaultyApp("good", "slow", delay=0.02), FaultyApp("bad", "503")
    a = await api_node(nursery, tmp_path, ca, good)
    b = await api_node(nursery, tmp_path, ca, bad)
    web = await client_for(
        nursery,
        tmp_path,
        ca,
        [a.inbound_port, b.inbound_port],
        retries={"retry_on": []},
        outlier={"consecutive_failures": 3, "base_ejection_seconds": 4, "max_ejected_percent": 50},
    )
    for _ in range(300):
        await get(web.outbound_port)
        if events(web, "ejected"):
            break
    assert events(web, "ejected") == 1 and bad.requests == 3, (bad.requests, good.requests)
    for _ in range(30):
        status, _, body, _ = await get(web.outbound_port)
        assert status == 200 and json.loads(body)["name"] == "good"
    assert bad.requests == 3  # ejected: no traffic
    bad.mode = "ok"
    ejected_at = trio.current_time()
    with trio.fail_after(20):
        while bad.requests == 3:  # each probe is a real request; it ends when b is picked
            await get(web.outbound_port)
            await trio.sleep(0.02)
    assert trio.current_time() - ejected_at < 15
    assert events(web, "ejected") == 1  # the cap (50% of 2) and the count held


async def test_circuit_breaker_answers_a_fast_503_over_max_requests(tmp_path, nursery):
    ca = ThrowawayCA.create()
    app = FaultyApp("slow", "hang")
    api = await api_node(nursery, tmp_path, ca, app)
    web = await client_for(nursery, tmp_path, ca, [api.inbound_port], circuit={"max_requests": 2})
    done = trio.Event()

    async def held() -> None:
        with trio.move_on_after(30):
            await get(web.outbound_port)
        done.set()

    async with trio.open_nursery() as n:
        n.start_soon(held)
        n.start_soon(held)
        with trio.fail_after(10):
            while app.requests < 2:
                await app.seen.wait()
        status, _, body, took = await get(web.outbound_port)
        assert status == 503
        assert "circuit open" in json.loads(body)["message"]
        assert "max_requests" in json.loads(body)["message"]
        assert took < 2
        assert events(web, "circuit_open") == 1
        n.cancel_scope.cancel()


async def test_endpoints_given_as_names_are_resolved(tmp_path, nursery):
    ca = ThrowawayCA.create()
    good = FaultyApp("good")
    a = await api_node(nursery, tmp_path, ca, good)
    web = await start_node(
        nursery,
        tmp_path,
        ca,
        "web",
        1,
        [],
        {
            "api": {
                "endpoints": [f"localhost:{a.inbound_port}"],
                "spiffe_id": sid("api"),
                "dns_refresh_seconds": 0.1,
            }
        },
    )
    for _ in range(5):
        status, _, body, _ = await get(web.outbound_port)
        assert status == 200, body  # a ::1 address (nothing listens there) is retried
    hosts = {e.host for e in web.outbound.policies["api"].balancer.endpoints}
    assert "127.0.0.1" in hosts


async def test_a_body_is_retried_only_when_it_was_buffered(tmp_path, nursery):
    ca = ThrowawayCA.create()
    app = FaultyApp("storm", "503")
    api = await api_node(nursery, tmp_path, ca, app)
    web = await client_for(
        nursery,
        tmp_path,
        ca,
        [api.inbound_port],
        retries={"retry_on": [503], "max_attempts": 3, "min_per_second": 1000, "buffer_bytes": 10},
    )
    status, headers, _, _ = await get(web.outbound_port, method="PUT", body=b"small")
    assert status == 503 and headers["x-meshcar-attempts"] == "3"
    assert app.requests == 3  # buffered: sent three times
    status, headers, _, _ = await get(web.outbound_port, method="PUT", body=b"x" * 20)
    assert status == 503 and headers["x-meshcar-attempts"] == "1"
    assert app.requests == 4  # over buffer_bytes: streamed once, never again
    status, headers, _, _ = await get(web.outbound_port, method="POST", body=b"small")
    assert status == 503 and headers["x-meshcar-attempts"] == "1"
    assert app.requests == 5  # not idempotent: sent once


async def test_max_connections_of_an_upstream_is_a_fast_503(tmp_path, nursery):
    ca = ThrowawayCA.create()
    app = FaultyApp("slow", "hang")
    api = await api_node(nursery, tmp_path, ca, app)
    web = await client_for(
        nursery, tmp_path, ca, [api.inbound_port], circuit={"max_connections": 1}
    )

    async def held() -> None:
        with trio.move_on_after(30):
            await get(web.outbound_port)

    async with trio.open_nursery() as n:
        n.start_soon(held)
        with trio.fail_after(10):
            while app.requests < 1:
                await app.seen.wait()
        status, _, body, took = await get(web.outbound_port)
        assert status == 503
        assert "connection limit (1)" in json.loads(body)["message"]
        assert took < 2
        assert events(web, "circuit_open") == 1
        n.cancel_scope.cancel()
