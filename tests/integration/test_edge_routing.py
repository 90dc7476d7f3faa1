"""Edge routing on a real edge (TLS on loopback, curl and raw TLS clients): wildcard hosts by
SNI and by Host (exact > most specific wildcard), passthrough by wildcard SNI, several routes
per host (rules by path, method, header), weighted splits within binomial bounds."""

from __future__ import annotations

import json
import math
import re
import ssl
from pathlib import Path

import pytest
import trio
import trustme

from meshcar.common import accesslog
from tests.integration.edge_fixtures import NamedBackend, curl, start_edge
from tests.support.tls_backend import serve_tls_backend


@pytest.fixture(autouse=True)
def _flush_access_log():
    """This test's access lines go to its own output, not the next test's."""
    yield
    accesslog.flush()


@pytest.fixture
def wild_pki(tmp_path: Path) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert(
        "*.demo.test", "api.demo.test", "*.a.demo.test", "*.y.demo.test"
    ).private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "wild.pem"))
    return ca, tmp_path / "ca.pem"


def route(host: str, backend: NamedBackend | None = None, **extra) -> dict:  # noqa: ANN003
    out = {"host": host, "mode": "terminate", "tls": {"cert": "wild.pem", "key": "wild.pem"}}
    if backend is not None:
        out["backend"] = {"endpoints": [f"127.0.0.1:{backend.port}"]}
    return out | extra


async def get(port: int, ca: Path, sni: str, path: str = "/", *args: str) -> tuple[int, str]:
    rc, out, err = await curl(
        "--cacert",
        str(ca),
        "--resolve",
        f"{sni}:{port}:127.0.0.1",
        "-w",
        "\n%{http_code}",
        *args,
        f"https://{sni}:{port}{path}",
    )
    if rc != 0:
        return 0, err
    body, _, code = out.rpartition("\n")
    return int(code), body


def who(body: str) -> str:
    return json.loads(body)["backend"]


async def test_wildcard_hosts_by_sni_and_by_host(
    tmp_path: Path, nursery: trio.Nursery, wild_pki
) -> None:
    _, ca = wild_pki
    exact, wide, deep = [await NamedBackend(n).start(nursery) for n in ("exact", "wide", "deep")]
    edge = await start_edge(
        nursery,
        tmp_path,
        [route("*.demo.test", wide), route("api.demo.test", exact), route("*.a.demo.test", deep)],
    )
    for sni, want in [
        ("api.demo.test", "exact"),
        ("www.demo.test", "wide"),
        ("x.y.demo.test", "wide"),
        ("b.a.demo.test", "deep"),
    ]:
        status, body = await get(edge.https, ca, sni)
        assert status == 200 and who(body) == want, (sni, status, body)
    # the Host header routes on the same rules once the TLS is up (same client-auth needs)
    status, body = await get(edge.https, ca, "www.demo.test", "/", "-H", "Host: api.demo.test")
    assert status == 200 and who(body) == "exact"
    status, body = await get(edge.https, ca, "api.demo.test", "/", "-H", "Host: q.a.demo.test")
    assert status == 200 and who(body) == "deep"
    # *.demo.test is not demo.test: no route for that SNI, the connection is closed
    status, _ = await get(edge.https, ca, "demo.test")
    assert status == 0
    await edge.aclose()


async def test_passthrough_by_wildcard_sni(tmp_path: Path, nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("*.pass.test").configure_cert(ctx)
    seen: list[dict] = []
    port = await serve_tls_backend(nursery, ctx, seen)
    edge = await start_edge(
        nursery,
        tmp_path,
        [
            {
                "host": "*.pass.test",
                "mode": "passthrough",
                "backend": {"endpoints": [f"127.0.0.1:{port}"]},
            }
        ],
    )
    status, body = await get(edge.https, tmp_path / "ca.pem", "db.pass.test")
    assert status == 200, body
    assert len(seen) == 1 and seen[0]["client_subject"] is None  # the backend's own TLS
    await edge.aclose()


async def test_rules_route_by_path_method_and_header(
    tmp_path: Path, nursery: trio.Nursery, wild_pki
) -> None:
    _, ca = wild_pki
    names = ("main", "canary", "login", "users", "api")
    b = {n: await NamedBackend(n).start(nursery) for n in names}

    def to(n: str) -> dict:
        return {"endpoints": [f"127.0.0.1:{b[n].port}"]}

    rules = [
        {"match": {"headers": [{"name": "x-canary", "value": "1"}]}, "backend": to("canary")},
        {"match": {"path_exact": "/login", "methods": ["POST"]}, "backend": to("login")},
        {"match": {"path_regex": "/users/[0-9]+"}, "backend": to("users")},
        {"match": {"path_prefix": "/api/"}, "backend": to("api")},
    ]
    edge = await start_edge(
        nursery, tmp_path, [route("www.demo.test", b["main"], rules=rules, path_prefix="/app")]
    )
    cases = [
        (["-H", "X-Canary: 1"], "/anything", 200, "canary"),
        (["-X", "POST"], "/login", 200, "login"),
        ([], "/login", 404, None),  # GET /login: no rule, not under the route's /app
        ([], "/users/42", 200, "users"),
        ([], "/users/42/x", 404, None),
        ([], "/api/v1", 200, "api"),
        ([], "/x/../api/v1", 200, "api"),  # matched on the normalised path
        ([], "/app/page", 200, "main"),
    ]
    for args, path, status, want in cases:
        got, body = await get(edge.https, ca, "www.demo.test", path, "--path-as-is", *args)
        assert got == status, (args, path, got, body)
        if want:
            assert who(body) == want, (args, path, body)
    assert b["api"].requests == ["/api/v1", "/api/v1"]
    await edge.aclose()


async def _count_over(port: int, ca: Path, sni: str, n: int) -> dict[str, int]:
    """n requests on one keep-alive TLS connection (SNI `sni`); answers counted by backend."""
    ctx = ssl.create_default_context(cafile=str(ca))
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, ctx, server_hostname=sni)
    counts: dict[str, int] = {}
    buf = b""
    req = f"GET / HTTP/1.1\r\nHost: {sni}\r\n\r\n".encode()
    with trio.fail_after(120):
        for _ in range(n):
            await tls.send_all(req)
            while True:
                head, sep, rest = buf.partition(b"\r\n\r\n")
                m = re.search(rb"(?i)content-length:\s*(\d+)", head) if sep else None
                if m and len(rest) >= int(m.group(1)):
                    size = int(m.group(1))
                    name = json.loads(rest[:size])["backend"]
                    counts[name] = counts.get(name, 0) + 1
                    buf = rest[size:]
                    break
                data = await tls.receive_some(65536)
                assert data, buf
                buf += data
    await tls.aclose()
    return counts


async def test_weighted_split_holds_within_binomial_bounds(
    tmp_path: Path, nursery: trio.Nursery, wild_pki
) -> None:
    _, ca = wild_pki
    stable, canary, drained = [
        await NamedBackend(n).start(nursery) for n in ("stable", "canary", "off")
    ]
    split = [
        {"weight": 90, "endpoints": [f"127.0.0.1:{stable.port}"]},
        {"weight": 10, "endpoints": [f"127.0.0.1:{canary.port}"]},
        {"weight": 0, "endpoints": [f"127.0.0.1:{drained.port}"]},
    ]
    edge = await start_edge(nursery, tmp_path, [route("*.demo.test", backends=split)])
    n, p = 1000, 0.1
    counts = await _count_over(edge.https, ca, "shop.demo.test", n)
    bound = 3.29 * math.sqrt(n * p * (1 - p))  # 99.9%, two-sided
    assert sum(counts.values()) == n and "off" not in counts, counts
    assert abs(counts.get("canary", 0) - n * p) <= bound, counts
    # each split backend has its own balancer and pool group
    assert set(edge.backends.balancers) == {f"*.demo.test/backends[{i}]" for i in range(3)}
    await edge.aclose()
