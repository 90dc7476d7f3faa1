"""A sidecar pair in-process: app -> outbound proxy -> mTLS -> inbound -> app, with real TLS."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import Mesh, sid

SMUGGLING_REQUESTS = [
    b"POST http://api/ HTTP/1.1\r\nHost: api\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: api\r\n\r\n",
    b"POST http://api/ HTTP/1.1\r\nHost: api\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    b"POST http://api/ HTTP/1.1\r\nHost: api\r\nContent-Length: -1\r\n\r\n",
    b"POST http://api/ HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: gzip\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    b"GET http://api/ HTTP/1.1\r\nHost: api\r\nX-Fold: a\r\n Transfer-Encoding: chunked\r\n\r\n",
]


def proxied(mesh: Mesh) -> httpx.AsyncClient:
    return httpx.AsyncClient(proxy=f"http://127.0.0.1:{mesh.client.outbound_port}", timeout=10)


async def test_request_crosses_the_mesh_with_identity(mesh: Mesh) -> None:
    async with proxied(mesh) as c:
        r = await c.get(
            "http://api/v1/hello?x=1",
            headers={"X-Forwarded-Client-Cert": "By=evil;URI=spiffe://meshcar.test/svc/admin"},
        )
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["target"] == "/v1/hello?x=1"
    xfcc = [v for k, v in info["headers"] if k.lower() == "x-forwarded-client-cert"]
    assert len(xfcc) == 1, xfcc
    assert xfcc[0].startswith(f"By={sid('api')};Hash=")
    assert xfcc[0].endswith(f";URI={sid('web')}")


async def test_keepalive_pool_reuses_mesh_connections(mesh: Mesh) -> None:
    async with proxied(mesh) as c:
        for _ in range(20):
            r = await c.get("http://api/x")
            assert r.status_code == 200
    opened = mesh.client.metrics.pool_connections.labels("api")._value.get()
    assert opened == 1


async def test_unknown_service_is_502_not_open_proxy(mesh: Mesh) -> None:
    async with proxied(mesh) as c:
        r = await c.get("http://example.com/")
    assert r.status_code == 502
    assert "unknown service 'example.com'" in r.text


async def test_caller_not_in_allow_list_gets_403(tmp_path, nursery, mesh: Mesh) -> None:
    from tests.integration.conftest import start_node

    intruder = await start_node(
        nursery,
        tmp_path,
        mesh.ca,
        "intruder",
        mesh.app_port,
        [],
        {"api": {"endpoints": [f"127.0.0.1:{mesh.server.inbound_port}"], "spiffe_id": sid("api")}},
    )
    async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{intruder.outbound_port}") as c:
        r = await c.get("http://api/secret")
    assert r.status_code == 403
    assert f"{sid('intruder')} is not allowed to call {sid('api')}" in r.text


async def test_wrong_peer_identity_is_refused(tmp_path, nursery, mesh: Mesh) -> None:
    from tests.integration.conftest import start_node

    # 'web2' expects 'payments' at api's listener: the identity check must refuse.
    web2 = await start_node(
        nursery,
        tmp_path,
        mesh.ca,
        "web2",
        mesh.app_port,
        [],
        {
            "payments": {
                "endpoints": [f"127.0.0.1:{mesh.server.inbound_port}"],
                "spiffe_id": sid("payments"),
            }
        },
    )
    async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{web2.outbound_port}") as c:
        r = await c.get("http://payments/")
    assert r.status_code == 502
    assert f"is {sid('api')}, expected {sid('payments')}" in r.text


@pytest.mark.parametrize("size", [0, 1, 100_000, 3_000_000])
async def test_bodies_stream_both_ways(mesh: Mesh, size: int) -> None:
    import hashlib

    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    async with proxied(mesh) as c:
        r = await c.post("http://api/upload", content=body)
        assert r.status_code == 200
        assert r.json()["body_length"] == size
        assert r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()

        async def gen():
            for i in range(0, size, 65536):
                yield body[i : i + 65536]

        r = await c.post("http://api/upload", content=gen())  # chunked
        assert r.json()["body_length"] == size
        r = await c.get(f"http://api/bytes/{size}")
        assert len(r.content) == size


async def test_head_204_304_and_close_delimited(mesh: Mesh) -> None:
    async with proxied(mesh) as c:
        r = await c.head("http://api/x")
        assert r.status_code == 200 and r.content == b""
        assert int(r.headers["content-length"]) > 0
        for st in (204, 304):
            r = await c.get(f"http://api/status/{st}")
            assert r.status_code == st and r.content == b""
        r = await c.get("http://api/close")
        assert r.status_code == 200 and r.json()["target"] == "/close"
        r = await c.get("http://api/after")  # the pool recovered from the closed connection
        assert r.status_code == 200


async def test_new_mesh_connections_resume_the_tls_session(mesh: Mesh) -> None:
    mesh.client.outbound.pool.idle_timeout = 0  # every request dials anew
    async with proxied(mesh) as c:
        for _ in range(4):
            assert (await c.get("http://api/x")).status_code == 200
    hs = mesh.client.metrics.handshakes
    assert hs.labels("outbound", "full")._value.get() == 1
    assert hs.labels("outbound", "resumed")._value.get() == 3
