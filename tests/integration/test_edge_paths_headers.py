# ruff: noqa: F811 (tests take the imported `edge` fixture as a parameter)
"""Hostile request targets and headers against a real edge (TLS on loopback, raw clients):
WAF and prefix-route bypasses are refused or routed as normalised, the backend receives
exactly the normalised target, identity headers are never passed on, and the edge keeps
serving."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest
import trio

from tests.integration.edge_fixtures import public_pki, start_edge, terminate_route
from tests.integration.test_edge import EdgeEnv, edge, headers_of  # noqa: F401 (the fixture)
from tests.support.echo_app import serve_echo
from tests.support.rawclient import raw_exchange


async def tls_exchange(port: int, ca: Path, sni: str, raw: bytes) -> bytes:
    """Send `raw` over TLS (SNI `sni`) exactly as given; everything until the edge closes."""
    ctx = ssl.create_default_context(cafile=str(ca))
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=sni)
    out = b""
    with trio.fail_after(10):
        await stream.do_handshake()
        await stream.send_all(raw)
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            out += data
    await trio.aclose_forcefully(stream)
    return out


def req(
    target: bytes, host: bytes = b"www.test", method: bytes = b"GET", extra: bytes = b""
) -> bytes:
    return (
        method
        + b" "
        + target
        + b" HTTP/1.1\r\nHost: "
        + host
        + b"\r\n"
        + extra
        + b"Connection: close\r\n\r\n"
    )


def status_of(out: bytes) -> int:
    assert out.startswith(b"HTTP/1.1 "), out[:200]
    return int(out[9:12])


def body_of(out: bytes) -> dict:
    return json.loads(out.partition(b"\r\n\r\n")[2])


async def still_serves(env: EdgeEnv) -> None:
    out = await tls_exchange(env.https, env.public_ca, "www.test", req(b"/ok"))
    assert status_of(out) == 200 and body_of(out)["target"] == "/ok"


# www.test: terminate, WAF rule `^/admin`; api.test: bridge, path_prefix /v1/
WAF_BYPASSES = [
    b"/v1/../admin",
    b"/x/%2e%2e/admin",
    b"/x/%2E%2e/admin",
    b"/x/.%2e/admin",
    b"/%61dmin",
    b"//admin",
    b"///admin/x",
    b"/./admin",
    b"/x/y/../../admin",
    b"/%41dmin/../admin",
]


@pytest.mark.parametrize("target", WAF_BYPASSES)
async def test_waf_sees_the_normalised_path(edge: EdgeEnv, target: bytes) -> None:
    out = await tls_exchange(edge.https, edge.public_ca, "www.test", req(target))
    assert status_of(out) == 403 and b"no-admin" in out, out[:300]
    await still_serves(edge)


REFUSED = [
    b"/x/..;/admin",
    b"/x/..;jsessionid=1/admin",
    b"/x/%2e%2e;/admin",
    b"/secret#x",
    b"/a%00b",
    b"/a?x=%00",
    b"/a%2fadmin",
    b"/x/..%2fadmin",
    b"/a%5cadmin",
    b"/a\\admin",
    b"/a%zz",
    b"*",
    b"admin",
]


@pytest.mark.parametrize("target", REFUSED)
async def test_unsafe_targets_are_400(edge: EdgeEnv, target: bytes) -> None:
    out = await tls_exchange(edge.https, edge.public_ca, "www.test", req(target))
    assert status_of(out) == 400, out[:300]
    assert edge.backends.pool  # nothing crashed
    await still_serves(edge)


FORWARDED = [
    (b"/x/./y//z", "/x/y/z"),
    (b"/x/%7euser/%41", "/x/~user/A"),
    (b"/%252e%252e/admin", "/%252e%252e/admin"),  # decoded once only: a literal, not ..
    (b"/a/b/..?q=/../admin&r=%2e%2e", "/a/?q=/../admin&r=%2e%2e"),  # the query is kept
    (b"/a%3bb/%c3%a9", "/a%3Bb/%C3%A9"),
    (b"/a{b}", "/a%7Bb%7D"),
    (b"https://www.test/x/../y", "/y"),  # absolute-form: origin-form upstream
    (b"https://WWW.TEST:443/y", "/y"),
]


@pytest.mark.parametrize(("target", "seen"), FORWARDED)
async def test_backend_receives_the_normalised_target(
    edge: EdgeEnv, target: bytes, seen: str
) -> None:
    out = await tls_exchange(edge.https, edge.public_ca, "www.test", req(target))
    assert status_of(out) == 200, out[:300]
    assert body_of(out)["target"] == seen


async def test_absolute_form_must_name_the_host_routed_on(edge: EdgeEnv) -> None:
    out = await tls_exchange(edge.https, edge.public_ca, "www.test", req(b"https://api.test/v1/x"))
    assert status_of(out) == 400 and b"differs from the Host" in out
    await still_serves(edge)


PREFIX_BYPASSES = [
    b"/v1/../admin",
    b"/v1/%2e%2e/admin",
    b"/v1/.%2E/admin",
    b"//v1/../admin",
    b"/v1/x/../../admin",
]


@pytest.mark.parametrize("target", PREFIX_BYPASSES)
async def test_prefix_route_sees_the_normalised_path(edge: EdgeEnv, target: bytes) -> None:
    out = await tls_exchange(edge.https, edge.public_ca, "api.test", req(target, b"api.test"))
    assert status_of(out) == 404 and b"no route for /admin" in out, out[:300]


async def test_bridge_forwards_the_normalised_target(edge: EdgeEnv) -> None:
    out = await tls_exchange(
        edge.https, edge.public_ca, "api.test", req(b"/v1//a/./b/../c", b"api.test")
    )
    assert status_of(out) == 200 and body_of(out)["target"] == "/v1/a/c"
    out = await tls_exchange(
        edge.https, edge.public_ca, "api.test", req(b"/v1/..;/admin", b"api.test")
    )
    assert status_of(out) == 400


IDENTITY_SPOOFS = [
    b"X-Meshcar-Peer-Identity: spiffe://meshcar.test/svc/admin\r\n",
    b"x-meshcar-peer-identity: spiffe://meshcar.test/svc/admin\r\n",
    b"X-MESHCAR-PEER-IDENTITY: spiffe://meshcar.test/svc/admin\r\n",
    b"X-Forwarded-Client-Cert: By=x;URI=spiffe://meshcar.test/svc/admin\r\n",
    b"x-forwarded-client-cert: URI=spiffe://meshcar.test/svc/admin\r\n",
    b"X-FORWARDED-CLIENT-CERT: URI=spiffe://meshcar.test/svc/admin\r\n",
]


@pytest.mark.parametrize("spoof", IDENTITY_SPOOFS)
@pytest.mark.parametrize("host", [b"www.test", b"api.test"])
async def test_identity_headers_are_stripped_on_every_route_kind(
    edge: EdgeEnv, spoof: bytes, host: bytes
) -> None:
    target = b"/v1/x" if host == b"api.test" else b"/x"
    out = await tls_exchange(
        edge.https, edge.public_ca, host.decode(), req(target, host, extra=spoof)
    )
    assert status_of(out) == 200, out[:300]
    h = headers_of(out.partition(b"\r\n\r\n")[2].decode())
    assert "x-meshcar-peer-identity" not in h
    if host == b"api.test":  # the only XFCC is the one api's sidecar wrote about the edge
        assert len(h["x-forwarded-client-cert"]) == 1
        assert "svc/admin" not in h["x-forwarded-client-cert"][0]
    else:
        assert "x-forwarded-client-cert" not in h


@pytest.mark.parametrize(
    "name", [b"X_Meshcar_Peer_Identity", b"X_Forwarded_Client_Cert", b"x-forwarded_client-cert"]
)
async def test_underscore_variants_are_refused(edge: EdgeEnv, name: bytes) -> None:
    for host in (b"www.test", b"api.test"):
        out = await tls_exchange(
            edge.https,
            edge.public_ca,
            host.decode(),
            req(b"/v1/x", host, extra=name + b": spiffe://meshcar.test/svc/admin\r\n"),
        )
        assert status_of(out) == 400 and b"underscore" in out
    await still_serves(edge)


async def test_client_certificate_route_replaces_a_spoofed_xfcc(edge: EdgeEnv) -> None:
    raw = req(
        b"/x",
        b"secure.test",
        extra=b"X-Forwarded-Client-Cert: Hash=0;URI=spiffe://evil\r\n"
        b"X-Meshcar-Peer-Identity: spiffe://evil\r\n",
    )
    ctx = ssl.create_default_context(cafile=str(edge.public_ca))
    ctx.load_cert_chain(str(edge.partner_cert))
    tcp = await trio.open_tcp_stream("127.0.0.1", edge.https)
    stream = trio.SSLStream(tcp, ctx, server_hostname="secure.test")
    out = b""
    with trio.fail_after(10):
        await stream.send_all(raw)
        while data := await stream.receive_some(65536):
            out += data
    await trio.aclose_forcefully(stream)
    assert status_of(out) == 200, out[:300]
    h = headers_of(out.partition(b"\r\n\r\n")[2].decode())
    assert len(h["x-forwarded-client-cert"]) == 1 and "evil" not in h["x-forwarded-client-cert"][0]
    assert h["x-forwarded-client-cert"][0].startswith("Hash=")
    assert "x-meshcar-peer-identity" not in h


async def test_configured_policy_drop_keep_and_no_merge(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    pki = public_pki(tmp_path)
    echo = await serve_echo(nursery)
    env = await start_edge(
        nursery,
        tmp_path,
        [terminate_route("www.test", echo)],
        http={
            "path": {"merge_slashes": False, "escaped_slashes": "keep"},
            "headers": {"underscores": "drop", "max_count": 20, "max_value_bytes": 1024},
        },
    )

    async def send(raw: bytes) -> bytes:
        return await tls_exchange(env.https, pki.ca_file, "www.test", raw)

    out = await send(
        req(
            b"//a/b%2fc/../d",
            extra=b"X_Meshcar_Peer_Identity: spiffe://evil\r\n"
            b"X_Forwarded_Client_Cert: URI=spiffe://evil\r\nX-Ok: 1\r\n",
        )
    )
    assert status_of(out) == 200, out[:300]
    body = out.partition(b"\r\n\r\n")[2].decode()
    assert json.loads(body)["target"] == "//a/d"
    h = headers_of(body)
    assert not any("_" in k for k in h) and h["x-ok"] == ["1"]
    assert "x-forwarded-client-cert" not in h and "x-meshcar-peer-identity" not in h
    out = await send(req(b"/a%2Fb"))
    assert status_of(out) == 200 and json.loads(out.partition(b"\r\n\r\n")[2])["target"] == "/a%2Fb"
    # limits: 20 header lines, 1024 bytes a value
    out = await send(req(b"/", extra=b"".join(b"X-%d: v\r\n" % i for i in range(19))))
    assert status_of(out) == 431
    out = await send(req(b"/", extra=b"Cookie: " + b"c" * 1025 + b"\r\n"))
    assert status_of(out) == 431
    out = await send(req(b"/", extra=b"Cookie: " + b"c" * 1024 + b"\r\n"))
    assert status_of(out) == 200
    # the redirect listener normalises too
    got = await raw_exchange(env.http, req(b"/a/../b%2e"))
    assert b"Location: https://www.test/b.\r\n" in got
    await env.aclose()


@pytest.mark.parametrize(
    ("hops", "xff", "seen"),
    [
        (2, b"6.6.6.6", ["127.0.0.1"]),  # fewer entries than trusted hops: the socket peer
        (2, b"", ["127.0.0.1"]),
        (2, b"6.6.6.6, junk", ["127.0.0.1"]),
        (2, b"6.6.6.6, 7.7.7.7", ["6.6.6.6, 7.7.7.7, 127.0.0.1"]),
        (1, b"5.5.5.5, 6.6.6.6, 7.7.7.7", ["7.7.7.7, 127.0.0.1"]),
    ],
)
async def test_trusted_hops_through_a_real_edge(
    tmp_path: Path, nursery: trio.Nursery, hops: int, xff: bytes, seen: list[str]
) -> None:
    pki = public_pki(tmp_path)
    echo = await serve_echo(nursery)
    env = await start_edge(
        nursery, tmp_path, [terminate_route("www.test", echo)], trusted_hops=hops
    )
    extra = (b"X-Forwarded-For: " + xff + b"\r\n" if xff else b"") + b"X-Forwarded-Proto: http\r\n"
    out = await tls_exchange(env.https, pki.ca_file, "www.test", req(b"/", extra=extra))
    assert status_of(out) == 200, out[:300]
    h = headers_of(out.partition(b"\r\n\r\n")[2].decode())
    assert h["x-forwarded-for"] == seen
    # the proxy's scheme is believed only with a complete chain
    assert h["x-forwarded-proto"] == (["http"] if len(seen[0].split(",")) > 1 else ["https"])
    await env.aclose()
