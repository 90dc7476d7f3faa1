"""Pool hygiene: bytes a backend writes after a complete response, or while its keep-alive
connection sits idle in a pool, are nobody's response. They must never reach the next
client (a different client connection). Vectors (RFC 9112 6.3, 9.3.2): extra bytes after a
204, a 304, a HEAD answer with Content-Length, a Content-Length body (in the same write and
in a later one), and unsolicited bytes on an idle connection. Each through the edge
(terminate and bridge), through a sidecar pair, and from the outbound's mTLS pool
straight to a misbehaving peer holding the upstream's SVID, with a real raw-socket backend
(tests/support/bad_backend.py); the next clients get their own answer, and a clean
connection is still reused (TLS 1.3 session tickets are not taken for unsolicited data)."""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from meshcar.admin.metrics import Metrics
from meshcar.net.pool import Pool
from meshcar.tls.store import CredentialStore
from tests.integration.conftest import NODES, sid, start_node
from tests.integration.edge_fixtures import public_pki, start_edge, terminate_route, wait_until
from tests.support.bad_backend import BadBackend
from tests.support.pki import ThrowawayCA

Fetch = Callable[[str, str], Awaitable[tuple[int, bytes, bytes]]]


async def http_exchange(
    port: int, method: str, target: str, host: str, ctx: ssl.SSLContext | None = None
) -> tuple[int, bytes, bytes]:
    """One request on a new client connection (Connection: close): (status, head, body)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream: trio.abc.Stream = tcp
    if ctx is not None:
        stream = trio.SSLStream(tcp, ctx, server_hostname=host)
    async with stream:
        await stream.send_all(
            f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        out = b""
        with trio.fail_after(10):
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                out += data
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


@dataclass
class Path_:
    fetch: Fetch
    pool: Pool  # the pool whose connections reach the misbehaving backend
    tls_handshakes: Callable[[], float] | None  # handshakes on the pooled TLS leg, if any


POOLS: list[Pool] = []


@pytest.fixture(autouse=True)
async def _close_pools():
    yield
    for node in NODES:
        POOLS.extend([node.inbound.pool, node.outbound.pool])
    NODES.clear()
    while POOLS:
        await POOLS.pop().retire()


def _handshakes(metrics: Metrics, direction: str) -> Callable[[], float]:
    def total() -> float:
        return sum(
            s.value
            for m in metrics.handshakes.collect()
            for s in m.samples
            if s.name.endswith("_total") and s.labels.get("direction") == direction
        )

    return total


async def _edge_path(nursery: trio.Nursery, tmp: Path, backend: BadBackend, mode: str) -> Path_:
    pki = public_pki(tmp)
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if mode == "terminate":
        edge = await start_edge(nursery, tmp, [terminate_route("www.test", backend.port)])
        POOLS.append(edge.backends.pool)
        pool, hs = edge.backends.pool, None
        host = "www.test"
    else:
        mesh_ca = ThrowawayCA.create()
        api = await start_node(nursery, tmp, mesh_ca, "api", backend.port, [sid("edge")], {})
        store = CredentialStore(tmp / "edge-state")
        store.install(mesh_ca.credential(sid("edge")))
        identity = {
            "spiffe_id": sid("edge"),
            "ca_url": "https://127.0.0.1:1",
            "ca_bundle": "x",
            "state_dir": str(tmp / "edge-state"),
        }
        edge = await start_edge(
            nursery,
            tmp,
            [
                {
                    "host": "api.test",
                    "mode": "bridge",
                    "tls": {"cert": "site.pem", "key": "site.pem"},
                    "backend": {
                        "endpoints": [f"127.0.0.1:{api.inbound_port}"],
                        "spiffe_id": sid("api"),
                    },
                },
            ],
            store=store,
            identity=identity,
        )
        POOLS.append(edge.backends.pool)
        pool, hs = api.inbound.pool, _handshakes(api.metrics, "inbound")
        host = "api.test"

    async def fetch(method: str, target: str) -> tuple[int, bytes, bytes]:
        return await http_exchange(edge.https, method, target, host, client_ctx)

    return Path_(fetch, pool, hs)


async def _mesh_path(
    nursery: trio.Nursery, tmp: Path, backend: BadBackend, ca: ThrowawayCA
) -> Path_:
    """The outbound's mTLS pool, straight to a misbehaving peer that holds api's SVID."""
    client = await start_node(
        nursery,
        tmp,
        ca,
        "web",
        backend.port,
        [],
        {"api": {"endpoints": [f"127.0.0.1:{backend.port}"], "spiffe_id": sid("api")}},
    )

    async def fetch(method: str, target: str) -> tuple[int, bytes, bytes]:
        return await http_exchange(client.outbound_port, method, target, "api")

    return Path_(fetch, client.outbound.pool, _handshakes(client.metrics, "outbound"))


async def _sidecar_path(nursery: trio.Nursery, tmp: Path, backend: BadBackend) -> Path_:
    ca = ThrowawayCA.create()
    server = await start_node(nursery, tmp, ca, "api", backend.port, [sid("web")], {})
    client = await start_node(
        nursery,
        tmp,
        ca,
        "web",
        backend.port,
        [],
        {"api": {"endpoints": [f"127.0.0.1:{server.inbound_port}"], "spiffe_id": sid("api")}},
    )

    async def fetch(method: str, target: str) -> tuple[int, bytes, bytes]:
        return await http_exchange(client.outbound_port, method, target, "api")

    return Path_(fetch, server.inbound.pool, _handshakes(server.metrics, "inbound"))


VECTORS = [
    ("GET", "/204", 204),
    ("GET", "/304", 304),
    ("HEAD", "/head", 200),
    ("GET", "/cl-same", 200),
    ("GET", "/cl-later", 200),
    ("GET", "/idle", 200),
]


@pytest.mark.parametrize(
    "via", ["edge-terminate", "edge-bridge", "sidecar-pair", "outbound-mesh-pool"]
)
@pytest.mark.parametrize(("method", "target", "status"), VECTORS, ids=[v[1][1:] for v in VECTORS])
async def test_bytes_after_a_response_never_reach_the_next_client(
    via: str, method: str, target: str, status: int, tmp_path: Path, nursery: trio.Nursery
) -> None:
    if via == "outbound-mesh-pool":
        ca = ThrowawayCA.create()
        peer = CredentialStore(tmp_path / "fake-api")
        peer.install(ca.credential(sid("api")))
        backend = await BadBackend(tls=peer.server_context()).start(nursery)
        path = await _mesh_path(nursery, tmp_path, backend, ca)
    elif via == "sidecar-pair":
        backend = await BadBackend().start(nursery)
        path = await _sidecar_path(nursery, tmp_path, backend)
    else:
        backend = await BadBackend().start(nursery)
        path = await _edge_path(nursery, tmp_path, backend, via.removeprefix("edge-"))

    got, _, body = await path.fetch(method, target)
    assert got == status
    assert b"INJECTED" not in body
    if status == 200 and method == "GET":
        assert json.loads(body)["target"] == target
    else:
        assert body == b""
    if target == "/idle":
        await wait_until(lambda: path.pool.idle_count() > 0)  # the connection sits idle, pooled
    backend.trigger()
    with trio.fail_after(5):
        await backend.injected.wait()

    got, head, body = await path.fetch("GET", "/ok")
    assert b"INJECTED" not in body, (head, body)
    assert got == 200 and json.loads(body)["target"] == "/ok"
    first = json.loads(body)["conn"]

    # The listener keeps serving, and a clean connection is still reused (on the TLS leg too).
    handshakes = path.tls_handshakes() if path.tls_handshakes else 0.0
    got, _, body = await path.fetch("GET", "/ok")
    assert got == 200 and json.loads(body) == {"ok": True, "target": "/ok", "conn": first}
    if path.tls_handshakes:
        assert path.tls_handshakes() == handshakes
    assert backend.requests.count("GET /ok") == 2
