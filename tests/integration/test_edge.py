"""The edge in-process with real TLS on loopback and real clients (curl, openssl, raw sockets):
terminate, bridge and passthrough on one listener, and the L7 features."""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme

from meshcar.admin.metrics import Metrics
from meshcar.edge.config import EdgeConfig, parse_edge_config
from meshcar.edge.http import Backends, Redirector, TerminatingProxy
from meshcar.edge.listener import TLSListener
from meshcar.tls.store import CredentialStore
from tests.integration.conftest import sid, start_node
from tests.integration.edge_fixtures import serve_tls_listener
from tests.support.echo_app import serve_echo
from tests.support.pki import ThrowawayCA
from tests.support.ports import free_port
from tests.support.rawclient import raw_exchange
from tests.support.tls_backend import serve_tls_backend


@dataclass
class EdgeEnv:
    tmp: Path
    https: int
    http: int
    public_ca: Path  # verifies the edge's and the passthrough backend's certificates
    partner_cert: Path  # a client certificate the passthrough backend and secure.test accept
    seen_by_backend: list[dict]
    metrics: Metrics
    cfg: EdgeConfig
    backends: Backends
    echo_port: int


async def _port(nursery: trio.Nursery, handler) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


@pytest.fixture
async def edge(tmp_path: Path, nursery: trio.Nursery):
    public = trustme.CA()
    public.cert_pem.write_to_path(str(tmp_path / "public-ca.pem"))
    site = public.issue_cert("www.test", "api.test", "secure.test")
    site.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "site.pem"))
    partner_ca = trustme.CA()
    partner_ca.cert_pem.write_to_path(str(tmp_path / "partner-ca.pem"))
    partner = partner_ca.issue_cert("partner@example.com", common_name="partner")
    partner.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "partner.pem"))

    # passthrough backend: its own certificate for pay.test, client certificate required
    pay_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    public.issue_cert("pay.test").configure_cert(pay_ctx)
    pay_ctx.load_verify_locations(cafile=str(tmp_path / "partner-ca.pem"))
    pay_ctx.verify_mode = ssl.CERT_REQUIRED
    seen: list[dict] = []
    pay_port = await serve_tls_backend(nursery, pay_ctx, seen)

    echo_port = await serve_echo(nursery)
    mesh_ca = ThrowawayCA.create()
    api = await start_node(nursery, tmp_path, mesh_ca, "api", echo_port, [sid("edge")], {})
    dead = free_port()  # nothing listens there: our own block, unbound
    cfg = parse_edge_config(
        {
            "listen": {"https": "127.0.0.1:1", "http": "127.0.0.1:1"},
            "admin": {"listen": "127.0.0.1:1"},
            "routes": [
                {
                    "host": "www.test",
                    "mode": "terminate",
                    "tls": {"cert": "site.pem", "key": "site.pem"},
                    "backend": {"endpoints": [f"127.0.0.1:{echo_port}"]},
                    "max_body_bytes": 1000,
                    "headers": {"add": {"X-Edge": "yes"}, "remove": ["X-Internal"]},
                    "deny": [
                        {"name": "no-admin", "path": "^/admin"},
                        {
                            "name": "no-scanner",
                            "header": {"name": "User-Agent", "pattern": "sqlmap"},
                        },
                    ],
                },
                {
                    "host": "api.test",
                    "mode": "bridge",
                    "tls": {"cert": "site.pem", "key": "site.pem"},
                    "path_prefix": "/v1/",
                    "hsts": True,
                    "rate_limit": {"per_second": 1, "burst": 5},
                    "backend": {
                        "endpoints": [f"127.0.0.1:{api.inbound_port}"],
                        "spiffe_id": sid("api"),
                    },
                },
                {
                    "host": "secure.test",
                    "mode": "terminate",
                    "tls": {"cert": "site.pem", "key": "site.pem"},
                    "client_auth": {"mode": "required", "ca": "partner-ca.pem"},
                    "backend": {"endpoints": [f"127.0.0.1:{echo_port}"]},
                },
                {
                    "host": "pay.test",
                    "mode": "passthrough",
                    "proxy_protocol": "v2",
                    "backend": {"endpoints": [f"127.0.0.1:{pay_port}"]},
                },
                {
                    "host": "lb.test",
                    "mode": "passthrough",
                    "backend": {
                        "endpoints": [f"127.0.0.1:{dead}", f"127.0.0.1:{pay_port}"],
                        "health": {"interval": 0.05, "timeout": 0.5, "fall": 1, "rise": 1},
                    },
                },
            ],
            "identity": {
                "spiffe_id": sid("edge"),
                "ca_url": "https://127.0.0.1:1",
                "ca_bundle": "x",
                "state_dir": str(tmp_path / "edge-state"),
            },
        },
        "edge.yaml",
        tmp_path,
    )
    store = CredentialStore(tmp_path / "edge-state")
    store.install(mesh_ca.credential(sid("edge")))
    metrics = Metrics()
    backends = Backends(cfg, store, metrics)
    proxy = TerminatingProxy(cfg, backends, metrics)
    https = await serve_tls_listener(nursery, TLSListener(cfg, proxy, backends.balancers, metrics))
    http = await _port(nursery, Redirector(cfg).handle_connection)
    yield EdgeEnv(
        tmp_path,
        https,
        http,
        tmp_path / "public-ca.pem",
        tmp_path / "partner.pem",
        seen,
        metrics,
        cfg,
        backends,
        echo_port,
    )
    await backends.pool.retire()
    await api.inbound.aclose()


async def curl(*args: str) -> tuple[int, str, str]:
    r = await trio.run_process(
        ["curl", "-sS", "--max-time", "10", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return r.returncode, r.stdout.decode(), r.stderr.decode()


def resolve(env: EdgeEnv, host: str) -> list[str]:
    return ["--cacert", str(env.public_ca), "--resolve", f"{host}:{env.https}:127.0.0.1"]


def headers_of(body: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in json.loads(body)["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


async def test_terminate_replaces_forwarding_headers(edge: EdgeEnv) -> None:
    rc, out, err = await curl(
        *resolve(edge, "www.test"),
        "-H",
        "X-Forwarded-For: 6.6.6.6",
        "-H",
        "X-Forwarded-Client-Cert: URI=spiffe://evil",
        "-H",
        "X-Internal: 1",
        "-H",
        "Forwarded: for=6.6.6.6",
        f"https://www.test:{edge.https}/x?y=1",
    )
    assert rc == 0, err
    h = headers_of(out)
    assert h["x-forwarded-for"] == ["127.0.0.1"]
    assert h["x-forwarded-proto"] == ["https"]
    assert h["x-forwarded-host"] == ["www.test"]
    assert "x-forwarded-client-cert" not in h and "forwarded" not in h and "x-internal" not in h
    assert h["x-edge"] == ["yes"]
    assert json.loads(out)["target"] == "/x?y=1"
    text = edge.metrics.render().decode()
    assert 'meshcar_edge_requests_total{mode="terminate",route="www.test",status="200"} 1.0' in text


async def test_bridge_reencrypts_with_the_edge_identity_and_adds_hsts(edge: EdgeEnv) -> None:
    rc, out, err = await curl(
        *resolve(edge, "api.test"),
        "-i",
        "-H",
        "X-Forwarded-Client-Cert: URI=spiffe://evil",
        f"https://api.test:{edge.https}/v1/hello",
    )
    assert rc == 0, err
    head, _, body = out.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200")
    assert "Strict-Transport-Security: max-age=31536000" in head
    h = headers_of(body)
    assert len(h["x-forwarded-client-cert"]) == 1
    assert h["x-forwarded-client-cert"][0].endswith(f"URI={sid('edge')}")  # set by api's sidecar
    assert h["x-forwarded-proto"] == ["https"] and h["x-forwarded-for"] == ["127.0.0.1"]
    rc, out, _ = await curl(
        *resolve(edge, "api.test"),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        f"https://api.test:{edge.https}/admin",
    )
    assert out == "404"  # only /v1/ is routed


async def test_passthrough_keeps_the_backend_certificate_and_its_client_auth(edge: EdgeEnv) -> None:
    base = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{edge.https}",
        "-servername",
        "pay.test",
        "-CAfile",
        str(edge.public_ca),
        "-verify_return_error",
        "-quiet",
    ]
    r = await trio.run_process(
        [*base, "-cert", str(edge.partner_cert)],
        stdin=b"GET / HTTP/1.1\r\nHost: pay.test\r\n\r\n",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    text = r.stdout.decode()
    assert "HTTP/1.1 200" in text, r.stderr.decode()
    info = json.loads(text.split("\r\n\r\n", 1)[1])
    assert info["client_subject"]["commonName"] == "partner"
    assert info["proxy"]["version"] == 2 and info["proxy"]["src"].startswith("127.0.0.1:")
    assert info["proxy"]["dst"] == f"127.0.0.1:{edge.https}"
    # the backend's own certificate, not the edge's
    r = await trio.run_process(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{edge.https}",
            "-servername",
            "pay.test",
            "-showcerts",
        ],
        stdin=b"",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    pem = r.stdout.decode()
    pem = pem[
        pem.index("-----BEGIN CERTIFICATE-----") : pem.index("-----END CERTIFICATE-----") + 25
    ]
    san = await trio.run_process(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName"],
        stdin=pem.encode(),
        capture_stdout=True,
    )
    assert "DNS:pay.test" in san.stdout.decode() and "www.test" not in san.stdout.decode()
    # without a client certificate the backend itself refuses the handshake
    r = await trio.run_process(
        base,
        stdin=b"GET / HTTP/1.1\r\nHost: pay.test\r\n\r\n",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert "HTTP/1.1 200" not in r.stdout.decode()
    assert "certificate required" in r.stderr.decode()
    text = edge.metrics.render().decode()
    # a passthrough connection is counted as a connection, not as a request with status 0
    assert 'meshcar_edge_connections_total{result="closed",route="pay.test"}' in text
    assert not [
        ln
        for ln in text.splitlines()
        if ln.startswith("meshcar_edge_requests_total{") and 'mode="passthrough"' in ln
    ]
    assert 'direction="edge-passthrough"' not in text
    assert 'meshcar_edge_bytes_total{direction="out",mode="passthrough",route="pay.test"}' in text


async def test_edge_certificate_for_terminated_hosts(edge: EdgeEnv) -> None:
    r = await trio.run_process(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{edge.https}",
            "-servername",
            "api.test",
            "-CAfile",
            str(edge.public_ca),
            "-verify_return_error",
            "-verify_hostname",
            "api.test",
        ],
        stdin=b"",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert "Verify return code: 0 (ok)" in r.stdout.decode()


async def raw(port: int, data: bytes, pieces: int = 1) -> bytes:
    return await raw_exchange(port, data, pieces=pieces, wait=3, require_close=False)


def client_hello(sni: str | None) -> bytes:
    ctx = ssl.create_default_context()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=sni)
    if sni is None:
        ctx.check_hostname = False
        obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO())
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


async def test_unknown_and_missing_sni_and_garbage_are_closed(edge: EdgeEnv) -> None:
    assert await raw(edge.https, client_hello("nope.test")) == b""
    assert await raw(edge.https, client_hello(None)) == b""
    assert await raw(edge.https, b"GET / HTTP/1.1\r\nHost: www.test\r\n\r\n") == b""
    assert await raw(edge.https, b"\x16\x03\x01\xff\xff" + b"\x00" * 50) == b""
    rc, _, err = await curl(
        *resolve(edge, "www.test"), f"https://www.test:{edge.https}/still-serving"
    )
    assert rc == 0, err


async def test_split_client_hello_is_reassembled(edge: EdgeEnv) -> None:
    hello = client_hello("www.test")
    reply = await raw(edge.https, hello, pieces=4)
    assert reply[:1] == b"\x16"  # a ServerHello came back: the edge parsed the split hello


async def test_redirect_to_https(edge: EdgeEnv) -> None:
    rc, out, _ = await curl("-i", "-H", "Host: www.test", f"http://127.0.0.1:{edge.http}/a/b?c=d")
    assert out.startswith("HTTP/1.1 301")
    assert "Location: https://www.test/a/b?c=d\r\n" in out
    edge.cfg = edge.cfg  # the edge listens on https port edge.https in this test
    r = Redirector(edge.cfg)
    assert (
        r.location(f"www.test:{edge.cfg.http_listen.port}", "/x")
        == f"https://www.test:{edge.cfg.https_listen.port}/x"
    )
    assert r.location("www.test:443", "/x") == "https://www.test/x"


async def test_rate_limit_gives_429_with_retry_after(edge: EdgeEnv) -> None:
    # 1/s, burst 5: 20 requests from one curl on one keep-alive connection take a fraction
    # of a second even on a loaded machine (8 curl processes in a row could take longer
    # than the refill and see no 429). The bucket may be partly spent by earlier tests.
    url = f"https://api.test:{edge.https}/v1/x"
    args = [a for _ in range(20) for a in ("-o", "/dev/null", url)]
    rc, out, _ = await curl(*resolve(edge, "api.test"), "-w", "%{http_code}\n", *args)
    codes = out.split()
    assert len(codes) == 20 and set(codes) <= {"200", "429"}, codes
    assert codes[0] == "200" and "429" in codes and codes.count("200") <= 5 + 2, codes
    rc, out, _ = await curl(*resolve(edge, "api.test"), "-i", f"https://api.test:{edge.https}/v1/x")
    assert out.startswith("HTTP/1.1 429") and "Retry-After: " in out


async def test_body_limit_413(edge: EdgeEnv) -> None:
    rc, out, _ = await curl(
        *resolve(edge, "www.test"),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--data-binary",
        "x" * 2000,
        f"https://www.test:{edge.https}/up",
    )
    assert out == "413"
    rc, out, _ = await curl(
        *resolve(edge, "www.test"),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        "x" * 2000,
        f"https://www.test:{edge.https}/up",
    )
    assert out == "413"
    rc, out, _ = await curl(
        *resolve(edge, "www.test"),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--data-binary",
        "x" * 10,
        f"https://www.test:{edge.https}/up",
    )
    assert out == "200"


async def test_waf_denies_by_path_and_header(edge: EdgeEnv) -> None:
    for extra in (
        ["https://www.test:{p}/admin/users"],
        ["-A", "sqlmap/1.0", "https://www.test:{p}/"],
    ):
        args = [a.format(p=edge.https) for a in extra]
        rc, out, _ = await curl(*resolve(edge, "www.test"), "-w", "%{http_code}", *args)
        assert out.endswith("403") and "denied by rule" in out


async def test_misdirected_request_421(edge: EdgeEnv) -> None:
    # TLS with SNI www.test (no client cert needed), then Host secure.test (client cert required)
    rc, out, _ = await curl(
        *resolve(edge, "www.test"),
        "-H",
        "Host: secure.test",
        "-w",
        "%{http_code}",
        f"https://www.test:{edge.https}/",
    )
    assert out.endswith("421")
    # the right SNI with the partner certificate works
    rc, out, err = await curl(
        *resolve(edge, "secure.test"),
        "--cert",
        str(edge.partner_cert),
        f"https://secure.test:{edge.https}/",
    )
    assert rc == 0 and json.loads(out)["target"] == "/", err
    xfcc = headers_of(out)["x-forwarded-client-cert"]
    assert len(xfcc) == 1 and xfcc[0].startswith("Hash=")


async def test_health_checks_eject_and_readmit(edge: EdgeEnv, nursery: trio.Nursery) -> None:
    from meshcar.edge.health import health_loop
    from meshcar.edge.main import Gauge

    gauge = Gauge("up", "x", ["route", "endpoint", "check"], registry=edge.metrics.registry)
    route = next(r for r in edge.cfg.routes if r.host == "lb.test")
    bal = edge.backends.balancers["lb.test"]
    dead = bal.states[0]
    nursery.start_soon(health_loop, route, edge.backends, gauge)
    with trio.fail_after(5):
        while dead.healthy:
            await trio.sleep(0.02)
    assert gauge.labels("lb.test", str(dead.endpoint), "tcp")._value.get() == 0
    picks = {str(bal.pick().endpoint) for _ in range(6)}
    assert picks == {str(bal.states[1].endpoint)}
    listener = trio.socket.socket()
    listener.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
    await listener.bind((dead.endpoint.host, dead.endpoint.port))
    listener.listen()
    try:
        with trio.fail_after(5):
            while not dead.healthy:
                await trio.sleep(0.02)
    finally:
        listener.close()


async def test_bridge_new_connections_after_a_credential_swap(edge: EdgeEnv) -> None:
    """Round 1: after a renewal the bridge offered the old session to the new context and
    every new backend connection failed, forever, while /ready stayed true."""

    async def get(path: str) -> str:
        rc, out, err = await curl(
            *resolve(edge, "api.test"),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"https://api.test:{edge.https}{path}",
        )
        assert rc == 0, err
        return out

    assert await get("/v1/a") == "200"
    await edge.backends.pool.close_all()  # as an idle timeout would
    assert await get("/v1/b") == "200"  # a new connection, resuming the cached session
    store = edge.backends.store
    assert store is not None
    cred = store.credential
    assert cred is not None
    from dataclasses import replace

    for version in (1, 2):  # a renewal-like swap, then a bundle change
        store.install(replace(cred, bundle_version=cred.bundle_version + version))
        await edge.backends.pool.close_all()
        # one request each: the route's rate limit (burst 5) covers the whole test
        assert await get(f"/v1/after-{version}") == "200"

    # the bridge dials through the one mTLS dialer (common/mtls.py), which counts them: a full
    # handshake, one resumed with the same context, a full one after each swap (none counted before)
    def hs(result: str) -> float:
        return edge.metrics.handshakes.labels("bridge", result)._value.get()

    assert (hs("full"), hs("resumed"), hs("failure")) == (3, 1, 0)
    assert edge.metrics.pool_connections.labels("api.test")._value.get() == 4
