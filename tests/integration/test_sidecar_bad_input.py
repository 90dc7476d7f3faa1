"""Bad input to a sidecar gets a clear answer, and the sidecar keeps serving everyone else."""

from __future__ import annotations

import ssl

import httpx
import pytest
import trio

from tests.integration.conftest import Mesh, sid
from tests.integration.test_sidecar_pair import SMUGGLING_REQUESTS
from tests.support.rawclient import raw_exchange


async def still_serves(mesh: Mesh) -> None:
    async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{mesh.client.outbound_port}") as c:
        r = await c.get("http://api/ok")
    assert r.status_code == 200


@pytest.mark.parametrize("raw", SMUGGLING_REQUESTS)
async def test_smuggling_through_outbound_is_400_and_closed(mesh: Mesh, raw: bytes) -> None:
    out = await raw_exchange(mesh.client.outbound_port, raw)
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    assert b"Connection: close" in out
    assert out.count(b"HTTP/1.1") == 1  # nothing smuggled behind it reached anyone
    await still_serves(mesh)


async def test_malformed_request_line_is_400(mesh: Mesh) -> None:
    out = await raw_exchange(mesh.client.outbound_port, b"\x16\x03\x01garbage\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    await still_serves(mesh)


async def test_https_url_and_connect_are_refused(mesh: Mesh) -> None:
    out = await raw_exchange(
        mesh.client.outbound_port,
        b"GET https://api/ HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 400 ") and b"plain http://" in out
    out = await raw_exchange(
        mesh.client.outbound_port, b"CONNECT api:443 HTTP/1.1\r\nHost: api\r\n\r\n"
    )
    # CONNECT to a mesh upstream's name: refused, naming why (sidecar/egress.py)
    assert out.startswith(b"HTTP/1.1 403 ") and b"mesh upstream 'api'" in out


async def test_tls_garbage_and_plaintext_on_mesh_port(mesh: Mesh) -> None:
    out = await raw_exchange(mesh.server.inbound_port, b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
    assert b"200" not in out  # no plaintext service on the mesh port
    out = await raw_exchange(mesh.server.inbound_port, b"\x16\x03\x01\x00\x05hello" + b"\x00" * 100)
    assert b"HTTP" not in out
    assert mesh.server.metrics.handshakes.labels("inbound", "failure")._value.get() >= 2
    await still_serves(mesh)


async def test_mesh_port_requires_a_client_certificate(mesh: Mesh) -> None:
    ctx = ssl.create_default_context(cadata=mesh.ca.bundle_pem)
    ctx.check_hostname = False
    tcp = await trio.open_tcp_stream("127.0.0.1", mesh.server.inbound_port)
    stream = trio.SSLStream(tcp, ctx)
    with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
        await stream.do_handshake()
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        assert await stream.receive_some(1000) == b""  # TLS 1.3: the alert arrives on read
    await trio.aclose_forcefully(tcp)
    await still_serves(mesh)


async def test_certificate_from_another_ca_is_refused(tmp_path, nursery, mesh: Mesh) -> None:
    from tests.integration.conftest import start_node
    from tests.support.pki import ThrowawayCA

    rogue = await start_node(
        nursery,
        tmp_path,
        ThrowawayCA.create("rogue"),
        "web",
        mesh.app_port,
        [],
        {"api": {"endpoints": [f"127.0.0.1:{mesh.server.inbound_port}"], "spiffe_id": sid("api")}},
    )
    async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{rogue.outbound_port}") as c:
        r = await c.get("http://api/")
    assert r.status_code == 502 and "TLS handshake" in r.text
    await still_serves(mesh)


async def test_app_down_is_503_with_clear_body(tmp_path, nursery, mesh: Mesh) -> None:
    from tests.integration.conftest import start_node
    from tests.support.ports import free_port

    dead_port = free_port()  # our own block: nothing else binds it
    lonely = await start_node(nursery, tmp_path, mesh.ca, "lonely", dead_port, [sid("web")], {})
    web = await start_node(
        nursery,
        tmp_path,
        mesh.ca,
        "web",
        mesh.app_port,
        [],
        {
            "lonely": {
                "endpoints": [f"127.0.0.1:{lonely.inbound_port}"],
                "spiffe_id": sid("lonely"),
            },
            "gone": {"endpoints": [f"127.0.0.1:{dead_port}"], "spiffe_id": sid("gone")},
        },
    )
    async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{web.outbound_port}") as c:
        r = await c.get("http://lonely/")
        assert r.status_code == 503 and "connect to 127.0.0.1" in r.text
        r = await c.get("http://gone/")
        assert r.status_code == 503 and "upstream gone" in r.text


async def test_slow_app_is_504_and_the_sidecar_recovers(mesh: Mesh) -> None:
    mesh.server.inbound.response_timeout = 0.3
    async with httpx.AsyncClient(
        proxy=f"http://127.0.0.1:{mesh.client.outbound_port}", timeout=10
    ) as c:
        r = await c.get("http://api/sleep/5")
        assert r.status_code == 504 and "did not answer within 0.3s" in r.text
        assert (await c.get("http://api/ok")).status_code == 200


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GET http://api/ HTTP/1.1\r\nHost: api\r\nHost: evil\r\n\r\n", b"400"),
        (
            b"GET http://api/ HTTP/1.1\r\nHost: api\r\nX_Forwarded_Client_Cert: URI=spiffe://x/admin\r\n\r\n",
            b"400",
        ),
        (
            b"GET http://api/ HTTP/1.1\r\nHost: api\r\nX: " + b"a" * (100 * 1024) + b"\r\n\r\n",
            b"431",
        ),
    ],
    ids=["two-hosts", "underscore", "head-100k-one-write"],
)
async def test_header_policy_on_the_outbound(mesh: Mesh, raw: bytes, status: bytes) -> None:
    out = await raw_exchange(mesh.client.outbound_port, raw)
    assert out.startswith(b"HTTP/1.1 " + status + b" "), out[:200]
    await still_serves(mesh)
