"""Progress timeouts and connection limits, through the edge and through a sidecar pair,
with real clients on raw sockets.

Timeouts (1 s in these tests): a request body that stalls gets 408 and the connection
closes; a client that stops reading a large response (small SO_RCVBUF) is closed, and so
is the upstream leg; an upstream whose response body stalls ends both connections. Other
clients are served meanwhile. Limits: over a listener's limit an HTTP listener answers 503
(`Connection: close`, JSON) and a TLS listener closes before the handshake; over an
upstream's limit the request is 503 `upstream connection limit` (a passthrough connection
is closed); both are counted in
Prometheus and the listener serves again once the limit clears. Closing is asserted, never
its timing.
"""

from __future__ import annotations

import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from meshcar.admin.metrics import Metrics
from tests.integration.conftest import NODES, start_pair
from tests.integration.edge_fixtures import public_pki, start_edge, terminate_route, wait_until
from tests.support.bad_backend import BadBackend
from tests.support.echo_app import serve_echo
from tests.support.tls_backend import serve_tls_backend

FAST = {"request_body_seconds": 1, "write_seconds": 1, "response_body_seconds": 1}
BIG = 64 * 1024 * 1024  # far more than any socket buffers on the way


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    for fam in metrics.registry.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


@pytest.fixture(autouse=True)
async def _close_nodes():
    yield
    for node in NODES:
        await node.inbound.pool.retire()
        await node.outbound.pool.retire()
    NODES.clear()


async def connect(port: int, *, rcvbuf: int | None = None) -> trio.SocketStream:
    sock = trio.socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def read_to_end(stream: trio.abc.Stream, limit: int = BIG) -> bytes:
    """Everything until the peer closes (EOF or reset); fails the test if it never does."""
    out = bytearray()
    with trio.fail_after(30):
        while len(out) < limit:
            try:
                data = await stream.receive_some(1 << 20)
            except (trio.BrokenResourceError, ssl.SSLError):
                break
            if not data:
                break
            out += data
    return bytes(out)


async def request(
    stream: trio.abc.Stream, target: str, host: str, extra: str = ""
) -> tuple[int, bytes]:
    await stream.send_all(
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n".encode()
    )
    out = await read_to_end(stream)
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class EdgeClient:
    def __init__(self, port: int, ca_file: Path, host: str = "www.test") -> None:
        self.port, self.host = port, host
        self.ctx = ssl.create_default_context(cafile=str(ca_file))

    async def open(self, rcvbuf: int | None = None) -> trio.SSLStream:
        tcp = await connect(self.port, rcvbuf=rcvbuf)
        stream = trio.SSLStream(tcp, self.ctx, server_hostname=self.host)
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return stream

    async def get(self, target: str) -> tuple[int, bytes]:
        stream = await self.open()
        async with stream:
            return await request(stream, target, self.host)


class ProxyClient:
    def __init__(self, port: int) -> None:
        self.port = port

    async def open(self, rcvbuf: int | None = None) -> trio.SocketStream:
        return await connect(self.port, rcvbuf=rcvbuf)

    async def get(self, target: str) -> tuple[int, bytes]:
        async with await self.open() as stream:
            return await request(stream, f"http://api{target}", "api")


async def _edge(nursery: trio.Nursery, tmp: Path, port: int, **top: Any):  # noqa: ANN202
    pki = public_pki(tmp)
    edge = await start_edge(nursery, tmp, [terminate_route("www.test", port)], **top)
    return edge, EdgeClient(edge.https, pki.ca_file)


@dataclass
class Front:
    """The proxy a timeout test talks to: the edge (one terminate route) or a sidecar pair."""

    client: EdgeClient | ProxyClient
    host: str
    prefix: str  # what comes before the path in a request target
    metrics: Metrics
    direction: str  # meshcar_requests_total's label
    pool: Any  # the pool to the backend (edge) or to the peer sidecar (outbound)
    group: str  # that pool's key, the `upstream` label
    edge: Any = None

    async def aclose(self) -> None:
        if self.edge is not None:
            await self.edge.aclose()


async def _front(
    via: str, nursery: trio.Nursery, tmp: Path, port: int, side: str = "client", **top: Any
) -> Front:
    """The edge with `top`, or a sidecar pair whose `side` ("client": the caller's outbound,
    "server": the callee's inbound) has `top`; requests go to the caller's outbound."""
    if via == "edge":
        edge, edge_client = await _edge(nursery, tmp, port, **top)
        return Front(
            edge_client,
            "www.test",
            "",
            edge.metrics,
            "edge-terminate",
            edge.backends.pool,
            "www.test",
            edge,
        )
    node, _ = await start_pair(nursery, tmp, port, **{f"{side}_top": top})
    return Front(
        ProxyClient(node.outbound_port),
        "api",
        "http://api",
        node.metrics,
        "outbound",
        node.outbound.pool,
        "api",
    )


# -- timeouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["edge", "sidecar"])
async def test_a_stalled_request_body_gets_408_and_the_connection_closes(
    via: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    front = await _front(via, nursery, tmp_path, await serve_echo(nursery), timeouts=FAST)
    client = front.client
    stalled = await client.open()
    await stalled.send_all(
        f"POST {front.prefix}/upload HTTP/1.1\r\nHost: {front.host}\r\n".encode()
        + b"Content-Length: 1000\r\n\r\n"
        + b"x" * 10
    )  # ... and the other 990 bytes never come
    # other clients are served meanwhile
    status, body = await client.get("/other")
    assert status == 200 and json.loads(body)["target"] == "/other"
    out = await read_to_end(stalled)
    await stalled.aclose()
    assert out.startswith(b"HTTP/1.1 408 "), out[:200]
    assert b"Connection: close" in out and b"request body" in out
    status, _ = await client.get("/after")
    assert status == 200
    await front.aclose()


@pytest.mark.parametrize("via", ["edge", "sidecar"])
async def test_a_client_that_stops_reading_a_large_response_is_closed(
    via: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    front = await _front(via, nursery, tmp_path, await serve_echo(nursery), timeouts=FAST)
    client = front.client
    slow = await client.open(rcvbuf=4096)
    await slow.send_all(
        f"GET {front.prefix}/bytes/{BIG} HTTP/1.1\r\nHost: {front.host}\r\n\r\n".encode()
    )
    status, _ = await client.get("/other")  # served while the slow client holds its response
    assert status == 200
    # the proxy gives up on the client that does not read (logged as 499), closing both legs
    labels = {"direction": front.direction, "status": "499"}
    await wait_until(
        lambda: metric(front.metrics, "meshcar_requests_total", **labels) == 1, timeout=30
    )
    got = await read_to_end(slow)  # what was in flight, then the close: far from the whole body
    await slow.aclose()
    assert got.startswith(b"HTTP/1.1 200 ") and len(got) < BIG // 2
    status, _ = await client.get("/after")
    assert status == 200
    await front.aclose()


@pytest.mark.parametrize("via", ["edge", "sidecar"])
async def test_an_upstream_body_that_stalls_closes_both_connections(
    via: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend = await BadBackend().start(nursery)
    front = await _front(via, nursery, tmp_path, backend.port, "server", timeouts=FAST)
    with trio.fail_after(30):
        stream = await front.client.open()
        async with stream:
            status, body = await request(stream, f"{front.prefix}/stall", front.host)
    assert status == 200 and body == b"0123456789"  # truncated: 10 of 100 bytes, then closed
    status, body = await front.client.get("/ok")
    assert status == 200 and json.loads(body)["target"] == "/ok"
    await front.aclose()


# -- listener limits ---------------------------------------------------------------------------


async def test_edge_https_listener_limit_closes_before_tls_and_recovers(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    echo = await serve_echo(nursery)
    edge, client = await _edge(nursery, tmp_path, echo, limits={"max_connections": 2})
    assert edge.tls is not None
    holders = [await connect(edge.https), await connect(edge.https)]  # silent: they hold slots
    await wait_until(lambda: edge.tls.conn_limit.open == 2)
    third = await connect(edge.https)
    assert await read_to_end(third) == b""  # closed at once: no handshake, no bytes
    await third.aclose()
    assert metric(edge.metrics, "meshcar_listener_connections_refused_total", listener="https") == 1
    for h in holders:
        await h.aclose()
    await wait_until(lambda: edge.tls.conn_limit.open == 0)
    status, _ = await client.get("/again")
    assert status == 200
    await edge.aclose()


async def test_edge_http_listener_limit_answers_503(tmp_path: Path, nursery: trio.Nursery) -> None:
    echo = await serve_echo(nursery)
    edge, _ = await _edge(nursery, tmp_path, echo, limits={"max_connections": 1})
    holder = await connect(edge.http)
    await holder.send_all(
        b"GET / HTTP/1.1\r\nHost: www.test\r\n"
    )  # an unfinished head holds the slot
    await trio.sleep(0)
    # the redirect listener: the second connection gets 503 and a JSON reason
    second = await connect(edge.http)
    status, body = await request(second, "/x", "www.test")
    await second.aclose()
    assert status == 503 and "connection limit" in json.loads(body)["message"]
    assert metric(edge.metrics, "meshcar_listener_connections_refused_total", listener="http") == 1
    await holder.aclose()
    with trio.fail_after(10):
        while True:  # the slot frees once the edge has seen the close
            async with await connect(edge.http) as s:
                status, _ = await request(s, "/x", "www.test")
            if status == 301:
                break
    await edge.aclose()


async def test_sidecar_listener_limits(tmp_path: Path, nursery: trio.Nursery) -> None:
    echo = await serve_echo(nursery)
    web, api = await start_pair(
        nursery,
        tmp_path,
        echo,
        client_top={"limits": {"max_connections": 1}},
        server_top={"limits": {"max_connections": 1}},
    )
    proxy = ProxyClient(web.outbound_port)
    # outbound (plain HTTP): 503 with Connection: close over the limit
    holder = await proxy.open()
    await wait_until(lambda: web.outbound.conn_limit("outbound").open == 1)
    second = await proxy.open()
    await second.send_all(b"GET http://api/x HTTP/1.1\r\nHost: api\r\n\r\n")
    out = await read_to_end(second)
    await second.aclose()
    assert out.startswith(b"HTTP/1.1 503 ") and b"Connection: close" in out
    assert b"outbound listener connection limit (1) reached" in out
    assert (
        metric(web.metrics, "meshcar_listener_connections_refused_total", listener="outbound") == 1
    )
    await holder.aclose()
    await wait_until(lambda: web.outbound.conn_limit("outbound").open == 0)
    status, _ = await proxy.get("/x")
    assert status == 200
    # inbound (mTLS): closed before the handshake over the limit; the caller sees a 502
    await web.outbound.pool.close_all()
    await wait_until(lambda: api.inbound.conn_limit.open == 0)
    mesh_holder = await connect(api.inbound_port)
    await wait_until(lambda: api.inbound.conn_limit.open == 1)
    status, body = await proxy.get("/y")
    assert status == 502
    assert (
        metric(api.metrics, "meshcar_listener_connections_refused_total", listener="inbound") >= 1
    )
    await mesh_holder.aclose()
    await wait_until(lambda: api.inbound.conn_limit.open == 0)
    status, _ = await proxy.get("/y")
    assert status == 200


# -- upstream limits ---------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["edge", "sidecar"])
async def test_upstream_connection_limit_is_503_and_recovers(
    via: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend = await BadBackend().start(nursery)
    front = await _front(
        via, nursery, tmp_path, backend.port, limits={"max_upstream_connections": 1}
    )
    client, pool, group, metrics = front.client, front.pool, front.group, front.metrics
    results: list[tuple[int, bytes]] = []

    async def held() -> None:
        results.append(await client.get("/hold"))

    nursery.start_soon(held)
    await wait_until(lambda: backend.holding == 1)
    assert pool.open_count(group) == 1
    status, body = await client.get("/second")
    assert status == 503 and "upstream connection limit (1) reached" in json.loads(body)["message"]
    assert metric(metrics, "meshcar_upstream_connections_refused_total", upstream=group) == 1
    backend.release()
    await wait_until(lambda: len(results) == 1)
    assert results[0][0] == 200
    status, body = await client.get("/third")  # on the connection the first one gave back
    assert status == 200 and json.loads(body)["target"] == "/third"
    assert pool.open_count(group) == 1
    await front.aclose()


async def test_edge_passthrough_upstream_limit_closes_and_recovers(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    pki = public_pki(tmp_path)
    pay = await serve_tls_backend(nursery, pki.backend_context("pay.test"), [])
    edge = await start_edge(
        nursery,
        tmp_path,
        [
            {
                "host": "pay.test",
                "mode": "passthrough",
                "backend": {"endpoints": [f"127.0.0.1:{pay}"]},
            }
        ],
        limits={"max_upstream_connections": 1},
    )
    client = EdgeClient(edge.https, pki.ca_file, host="pay.test")
    state = edge.backends.balancers["pay.test"].states[0]
    first = await client.open()  # relayed end to end; the backend waits for its request
    await wait_until(lambda: state.active == 1)
    with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
        await client.open()  # the edge closes: no relay over the backend's limit
    assert (
        metric(edge.metrics, "meshcar_upstream_connections_refused_total", upstream="pay.test") == 1
    )
    status, _ = await request(first, "/", "pay.test")
    await first.aclose()
    assert status == 200
    await wait_until(lambda: state.active == 0)
    status, _ = await client.get("/")
    assert status == 200
    await edge.aclose()
