"""HTTP/2 from the app, HTTP/1.1 to the peer's app (`app.protocol: http1`, the default):
an h2c client (httpx, prior knowledge) through an in-process sidecar pair to the HTTP/1.1
echo app; heads, bodies both ways (a body of unknown length goes chunked), HEAD, 204, XFCC,
identity headers stripped, the HTTP/1.1 pool reused."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from tests.integration.conftest import Mesh, sid

pytest.importorskip("h2")


def h2c(mesh: Mesh) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{mesh.client.outbound_port}",
        http1=False,
        http2=True,  # plain http with http1=False: HTTP/2 with prior knowledge
        headers={"Host": "api"},
        timeout=20,
        trust_env=False,
    )


async def test_h2c_to_an_http1_app(mesh: Mesh) -> None:
    async with h2c(mesh) as c:
        r = await c.get(
            "/v1/hello?x=1",
            headers={"X-Forwarded-Client-Cert": "By=evil;URI=spiffe://meshcar.test/svc/admin"},
        )
        assert r.http_version == "HTTP/2" and r.status_code == 200, r.text
        info = r.json()
        assert info["target"] == "/v1/hello?x=1"
        xfcc = [v for k, v in info["headers"] if k.lower() == "x-forwarded-client-cert"]
        assert xfcc == [xfcc[0]] and xfcc[0].endswith(f";URI={sid('web')}")
        assert xfcc[0].startswith(f"By={sid('api')};Hash=")
        size = 3_000_000
        body = bytes(range(256)) * (size // 256)

        async def gen():
            for i in range(0, len(body), 65536):
                yield body[i : i + 65536]

        for content in (body, gen()):  # with content-length, then of unknown length
            r = await c.post("/upload", content=content)
            assert r.status_code == 200, r.text
            assert r.json()["body_length"] == len(body)
            assert r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
        r = await c.get(f"/bytes/{size}")
        assert len(r.content) == size
        r = await c.head("/x")
        assert r.status_code == 200 and r.content == b""
        r = await c.get("/status/204")
        assert r.status_code == 204 and r.content == b""
    # all of it went over one h2 mesh connection, and the inbound's HTTP/1.1 app pool
    assert mesh.client.metrics.pool_connections.labels("api")._value.get() == 1
    assert mesh.server.inbound.pool.idle_count() >= 1


async def test_h2c_unknown_service_is_502(mesh: Mesh) -> None:
    async with h2c(mesh) as c:
        r = await c.get("/", headers={"Host": "example.com"})
    assert r.status_code == 502 and "unknown service 'example.com'" in r.text
