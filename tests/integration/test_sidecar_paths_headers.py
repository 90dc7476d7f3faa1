"""Hostile request targets and headers against a real sidecar pair (mTLS on loopback): the
outbound and the inbound each normalise the target once and forward exactly that, refuse
what cannot be normalised, and never pass a client-written identity header on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import trio

from meshcar.net.connect import open_tls
from tests.integration.conftest import Mesh, sid, start_node
from tests.integration.test_sidecar_bad_input import still_serves
from tests.support.rawclient import raw_exchange


def status_of(out: bytes) -> int:
    assert out.startswith(b"HTTP/1.1 "), out[:200]
    return int(out[9:12])


def app_saw(out: bytes) -> dict:
    """What the echo app received: target and headers (lowercase names, lists of values)."""
    info = json.loads(out.partition(b"\r\n\r\n")[2])
    headers: dict[str, list[str]] = {}
    for k, v in info["headers"]:
        headers.setdefault(k.lower(), []).append(v)
    return {"target": info["target"], "headers": headers}


def req(target: bytes, extra: bytes = b"", host: bytes = b"api") -> bytes:
    return (
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: "
        + host
        + b"\r\n"
        + extra
        + b"Connection: close\r\n\r\n"
    )


async def via_inbound(mesh: Mesh, raw: bytes) -> bytes:
    """Straight to api's mesh port with web's certificate: past the outbound's normaliser.
    Reads one response delimited by Content-Length (every answer here has one)."""
    stream = await open_tls(
        "127.0.0.1", mesh.server.inbound_port, mesh.client.store.client_context()
    )
    out = b""
    with trio.fail_after(10):
        await stream.send_all(raw)
        while True:
            head, sep, body = out.partition(b"\r\n\r\n")
            if sep:
                m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                assert m, head
                if len(body) >= int(m.group(1)):
                    break
            data = await stream.receive_some(65536)
            assert data, out
            out += data
    await trio.aclose_forcefully(stream)
    return out


FORWARDED = [
    (b"http://api/v1/../admin", "/admin"),
    (b"/v1/../admin", "/admin"),
    (b"http://api/v1/%2e%2e/admin", "/admin"),
    (b"http://api//admin", "/admin"),
    (b"http://api/%61dmin", "/admin"),
    (b"http://API:80/a/./b/../c?q=/../x", "/a/c?q=/../x"),
    (b"http://api/%252e%252e/x", "/%252e%252e/x"),
    (b"http://api", "/"),
]


@pytest.mark.parametrize(("target", "seen"), FORWARDED)
async def test_outbound_forwards_the_normalised_target(
    mesh: Mesh, target: bytes, seen: str
) -> None:
    out = await raw_exchange(mesh.client.outbound_port, req(target))
    assert status_of(out) == 200, out[:300]
    assert app_saw(out)["target"] == seen


@pytest.mark.parametrize(
    ("target", "seen"),
    [(t, s) for t, s in FORWARDED if t.startswith(b"/")]
    + [(b"//a//b/./c/..", "/a/b/"), (b"/%7Euser", "/~user")],
)
async def test_inbound_forwards_the_normalised_target(mesh: Mesh, target: bytes, seen: str) -> None:
    out = await via_inbound(mesh, req(target))
    assert status_of(out) == 200, out[:300]
    assert app_saw(out)["target"] == seen


REFUSED = [
    b"/v1/..;/admin",
    b"/v1/%2e%2e;x/admin",
    b"/secret#x",
    b"/a%00",
    b"/a?b=%00",
    b"/a%2fb",
    b"/a%5Cb",
    b"/a\\b",
    b"/a%g1",
    b"*",
]


@pytest.mark.parametrize(
    "target", REFUSED + [b"http://api/..;/x", b"http://api/a#b", b"http://u@api/"]
)
async def test_outbound_refuses_unsafe_targets(mesh: Mesh, target: bytes) -> None:
    out = await raw_exchange(mesh.client.outbound_port, req(target))
    assert status_of(out) == 400 and b"bad request target" in out, out[:300]
    await still_serves(mesh)


@pytest.mark.parametrize("target", REFUSED + [b"http://api/x", b"admin"])
async def test_inbound_refuses_unsafe_targets(mesh: Mesh, target: bytes) -> None:
    out = await via_inbound(mesh, req(target))
    assert status_of(out) == 400, out[:300]
    assert b"bad request target" in out or b"malformed request" in out  # `admin`: llhttp
    await still_serves(mesh)


SPOOFS = [
    b"X-Forwarded-Client-Cert: By=spiffe://meshcar.test/svc/api;URI=spiffe://meshcar.test/svc/admin\r\n",
    b"x-forwarded-client-cert: URI=spiffe://meshcar.test/svc/admin\r\n",
    b"X-FORWARDED-CLIENT-CERT: URI=spiffe://meshcar.test/svc/admin\r\n",
    b"X-Meshcar-Peer-Identity: spiffe://meshcar.test/svc/admin\r\n",
    b"x-MESHCAR-peer-identity: spiffe://meshcar.test/svc/admin\r\n",
    b"Connection: X-Forwarded-Client-Cert\r\n",
]


@pytest.mark.parametrize("spoof", SPOOFS)
@pytest.mark.parametrize("path", ["outbound", "inbound"])
async def test_identity_headers_are_replaced(mesh: Mesh, spoof: bytes, path: str) -> None:
    raw = req(b"/x", extra=spoof)
    out = await (
        raw_exchange(mesh.client.outbound_port, raw)
        if path == "outbound"
        else via_inbound(mesh, raw)
    )
    assert status_of(out) == 200, out[:300]
    h = app_saw(out)["headers"]
    assert h["x-forwarded-client-cert"] == [
        f"By={sid('api')};Hash={h['x-forwarded-client-cert'][0].split('Hash=')[1].split(';')[0]};"
        f"URI={sid('web')}"
    ]
    assert "x-meshcar-peer-identity" not in h


@pytest.mark.parametrize(
    "name", [b"X_Forwarded_Client_Cert", b"X_Meshcar_Peer_Identity", b"x-forwarded_client-cert"]
)
async def test_underscore_variants_are_refused(mesh: Mesh, name: bytes) -> None:
    raw = req(b"/x", extra=name + b": URI=spiffe://meshcar.test/svc/admin\r\n")
    for out in (await raw_exchange(mesh.client.outbound_port, raw), await via_inbound(mesh, raw)):
        assert status_of(out) == 400 and b"underscore" in out
    await still_serves(mesh)


async def test_configured_policy_on_both_sidecars(
    tmp_path: Path, nursery: trio.Nursery, mesh: Mesh
) -> None:
    """http: {underscores: drop, escaped_slashes: keep, merge_slashes: false, limits} on a
    second pair: the dropped headers never reach the app, the path keeps what was asked."""
    http = {
        "path": {"merge_slashes": False, "escaped_slashes": "keep"},
        "headers": {"underscores": "drop", "max_count": 10, "max_value_bytes": 512},
    }
    server = await start_node(
        nursery, tmp_path / "s2", mesh.ca, "api", mesh.app_port, [sid("web")], {}, http=http
    )
    client = await start_node(
        nursery,
        tmp_path / "c2",
        mesh.ca,
        "web",
        mesh.app_port,
        [],
        {"api": {"endpoints": [f"127.0.0.1:{server.inbound_port}"], "spiffe_id": sid("api")}},
        http=http,
    )
    raw = req(
        b"http://api//a%2fb/../c",
        extra=b"X_Forwarded_Client_Cert: URI=spiffe://evil\r\n"
        b"X_Meshcar_Peer_Identity: spiffe://evil\r\nX-Ok: 1\r\n",
    )
    out = await raw_exchange(client.outbound_port, raw)
    assert status_of(out) == 200, out[:300]
    seen = app_saw(out)
    assert seen["target"] == "//c"
    assert not any("_" in k for k in seen["headers"]) and seen["headers"]["x-ok"] == ["1"]
    assert seen["headers"]["x-forwarded-client-cert"][0].endswith(f"URI={sid('web')}")
    out = await raw_exchange(
        client.outbound_port,
        req(b"http://api/", extra=b"".join(b"X-%d: v\r\n" % i for i in range(9))),
    )
    assert status_of(out) == 431
    out = await raw_exchange(
        client.outbound_port, req(b"http://api/", extra=b"X: " + b"v" * 513 + b"\r\n")
    )
    assert status_of(out) == 431
    out = await raw_exchange(
        client.outbound_port, req(b"http://api/", extra=b"X: " + b"v" * 512 + b"\r\n")
    )
    assert status_of(out) == 200


@pytest.mark.parametrize(
    ("target", "host", "seen"),
    [
        (b"http://api/x", b"evil.test", "api"),
        (b"http://API:8080/x", b"api", "API:8080"),
        (b"/x", b"api", "api"),
    ],
)
async def test_absolute_form_authority_replaces_host(
    mesh: Mesh, target: bytes, host: bytes, seen: str
) -> None:
    """RFC 9112 3.2.2: the peer sees the host the outbound routed on, never another Host."""
    out = await raw_exchange(mesh.client.outbound_port, req(target, host=host))
    assert status_of(out) == 200, out[:300]
    assert app_saw(out)["headers"]["host"] == [seen]
