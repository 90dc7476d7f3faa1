"""The edge with real clients, beyond tests/integration/test_edge.py: ClientHello bounds,
the default route, PROXY v1, the public TLS profile, optional client certificates, a
bridge backend with the wrong SPIFFE ID, HTTP health checks with load balancing, access
log entries per mode, and the assembled process (`Edge.run`: plaintext warning, /ready)."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import ssl
from pathlib import Path

import httpx
import pytest
import trio

from meshcar.common import accesslog
from meshcar.edge.config import parse_edge_config
from meshcar.edge.health import health_loop
from meshcar.edge.main import Edge, Gauge
from meshcar.tls.store import CredentialStore
from tests.integration.conftest import sid, start_node
from tests.integration.edge_fixtures import (
    NamedBackend,
    PublicPKI,
    curl,
    headers_of,
    public_pki,
    resolve,
    start_edge,
    terminate_route,
    wait_until,
)
from tests.support.echo_app import serve_echo
from tests.support.pki import ThrowawayCA
from tests.support.ports import free_ports
from tests.support.rawclient import raw_exchange
from tests.support.tls_backend import serve_tls_backend


@pytest.fixture
def pki(tmp_path: Path) -> PublicPKI:
    return public_pki(tmp_path)


def client_hello(sni: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = sni is not None
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


async def test_client_hello_bounds_and_the_default_route(
    tmp_path: Path, pki: PublicPKI, nursery: trio.Nursery
) -> None:
    echo = await serve_echo(nursery)
    edge = await start_edge(
        nursery,
        tmp_path,
        [terminate_route("www.test", echo)],
        hello_timeout=0.3,
        default_route="www.test",
    )
    # half a ClientHello, then silence: closed once hello_timeout is over (not the 3 s we wait)
    hello = client_hello("www.test")
    with trio.fail_after(3):
        assert await raw_exchange(edge.https, hello[:40], wait=3) == b""
    # more than 16 KiB of handshake records without a complete hello: closed
    record = b"\x16\x03\x01\x40\x00" + b"\x01\x00\xff\xff" + b"\x00" * (0x4000 - 4)
    assert await raw_exchange(edge.https, record * 2, wait=3) == b""
    text = edge.metrics.render().decode()
    assert 'meshcar_tls_handshakes_total{direction="edge",result="no_client_hello"} 2.0' in text
    # no SNI (curl sends none for an IP literal): the default route answers
    rc, out, err = await curl(
        "--cacert",
        str(pki.ca_file),
        "--insecure",
        "-H",
        "Host: www.test",
        f"https://127.0.0.1:{edge.https}/dflt",
    )
    assert rc == 0, err
    assert json.loads(out)["target"] == "/dflt"
    # an unknown SNI goes to the default route too
    rc, out, err = await curl(
        "--insecure",
        "--resolve",
        f"other.test:{edge.https}:127.0.0.1",
        "-H",
        "Host: www.test",
        f"https://other.test:{edge.https}/o",
    )
    assert rc == 0 and json.loads(out)["target"] == "/o", err
    await edge.aclose()


async def test_proxy_v1_header_reaches_the_passthrough_backend(
    tmp_path: Path, pki: PublicPKI, nursery: trio.Nursery
) -> None:
    seen: list[dict] = []
    port = await serve_tls_backend(nursery, pki.backend_context("pay.test"), seen)
    edge = await start_edge(
        nursery,
        tmp_path,
        [
            {
                "host": "pay.test",
                "mode": "passthrough",
                "proxy_protocol": "v1",
                "backend": {"endpoints": [f"127.0.0.1:{port}"]},
            }
        ],
    )
    rc, out, err = await curl(
        *resolve(pki.ca_file, "pay.test", edge.https), f"https://pay.test:{edge.https}/"
    )
    assert rc == 0, err
    info = json.loads(out)
    assert info["proxy"]["version"] == 1
    assert (
        info["proxy"]["src"].startswith("127.0.0.1:")
        and info["proxy"]["dst"] == f"127.0.0.1:{edge.https}"
    )
    await edge.aclose()


async def _s_client(port: int, *args: str) -> tuple[str, str]:
    r = await trio.run_process(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "www.test", *args],
        stdin=b"",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return r.stdout.decode(), r.stderr.decode()


async def test_public_tls_is_the_mozilla_intermediate_profile(
    tmp_path: Path, pki: PublicPKI, nursery: trio.Nursery
) -> None:
    echo = await serve_echo(nursery)
    edge = await start_edge(nursery, tmp_path, [terminate_route("www.test", echo)])
    out, _ = await _s_client(edge.https, "-tls1_3")
    assert "New, TLSv1.3" in out
    out, _ = await _s_client(edge.https, "-tls1_2")
    assert "New, TLSv1.2, Cipher is ECDHE-ECDSA-" in out and ("GCM" in out or "CHACHA20" in out)
    # TLS 1.1 and a CBC suite outside the profile are refused
    out, err = await _s_client(edge.https, "-tls1_1", "-cipher", "ALL:@SECLEVEL=0")
    assert "Cipher is (NONE)" in out or "alert" in err
    out, err = await _s_client(edge.https, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA")
    assert "Cipher is (NONE)" in out and "handshake failure" in err
    # a TLS 1.2 client asking to renegotiate (s_client's "R" command) is refused
    r = await trio.run_process(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{edge.https}",
            "-servername",
            "www.test",
            "-tls1_2",
        ],
        stdin=b"R\n",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert "RENEGOTIATING" in r.stderr.decode() and "no renegotiation" in r.stderr.decode(), (
        r.stderr.decode()
    )
    await edge.aclose()


async def test_optional_client_certificate(
    tmp_path: Path, pki: PublicPKI, nursery: trio.Nursery
) -> None:
    echo = await serve_echo(nursery)
    edge = await start_edge(
        nursery,
        tmp_path,
        [
            terminate_route(
                "opt.test", echo, client_auth={"mode": "optional", "ca": "partner-ca.pem"}
            )
        ],
    )
    base = [
        *resolve(pki.ca_file, "opt.test", edge.https),
        "-H",
        "X-Forwarded-Client-Cert: Hash=forged",
    ]
    rc, out, err = await curl(*base, f"https://opt.test:{edge.https}/anon")
    assert rc == 0, err
    assert "x-forwarded-client-cert" not in headers_of(out)  # the forged one is gone, none added
    rc, out, err = await curl(
        *base, "--cert", str(pki.partner), f"https://opt.test:{edge.https}/partner"
    )
    assert rc == 0, err
    xfcc = headers_of(out)["x-forwarded-client-cert"]
    assert len(xfcc) == 1 and xfcc[0].startswith("Hash=") and "forged" not in xfcc[0]
    # a certificate from a CA the route does not trust fails the handshake
    rc, out, err = await curl(
        *base, "--cert", str(pki.stranger), f"https://opt.test:{edge.https}/stranger"
    )
    assert rc != 0 and out == ""
    await edge.aclose()


async def test_bridge_refuses_a_backend_with_another_spiffe_id(
    tmp_path: Path, pki: PublicPKI, nursery: trio.Nursery
) -> None:
    echo = await serve_echo(nursery)
    mesh_ca = ThrowawayCA.create()
    api = await start_node(nursery, tmp_path, mesh_ca, "api", echo, [sid("edge")], {})
    store = CredentialStore(tmp_path / "edge-state")
    store.install(mesh_ca.credential(sid("edge")))
    identity = {
        "spiffe_id": sid("edge"),
        "ca_url": "https://127.0.0.1:1",
        "ca_bundle": "x",
        "state_dir": str(tmp_path / "edge-state"),
    }
    bridge = {"mode": "bridge", "tls": {"cert": "site.pem", "key": "site.pem"}}
    edge = await start_edge(
        nursery,
        tmp_path,
        [
            {
                "host": "api.test",
                **bridge,
                "backend": {
                    "endpoints": [f"127.0.0.1:{api.inbound_port}"],
                    "spiffe_id": sid("api"),
                },
            },
            {
                "host": "www.test",
                **bridge,
                "backend": {
                    "endpoints": [f"127.0.0.1:{api.inbound_port}"],
                    "spiffe_id": sid("payments"),
                },
            },
        ],
        store=store,
        identity=identity,
    )
    rc, out, err = await curl(
        *resolve(pki.ca_file, "api.test", edge.https), f"https://api.test:{edge.https}/ok"
    )
    assert rc == 0 and json.loads(out)["target"] == "/ok", err
    rc, out, _ = await curl(
        *resolve(pki.ca_file, "www.test", edge.https),
        "-w",
        "\n%{http_code}",
        f"https://www.test:{edge.https}/x",
    )
    assert out.endswith("\n502") and sid("payments") in out and sid("api") in out
    await edge.aclose()
    await api.inbound.aclose()


async def test_http_health_checks_eject_and_readmit_with_round_robin(
    tmp_path: Path, pki: PublicPKI, nursery: trio.Nursery
) -> None:
    a, b = await NamedBackend("a").start(nursery), await NamedBackend("b").start(nursery)
    edge = await start_edge(
        nursery,
        tmp_path,
        [
            {
                "host": "www.test",
                "mode": "terminate",
                "tls": {"cert": "site.pem", "key": "site.pem"},
                "backend": {
                    "endpoints": [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"],
                    "health": {
                        "interval": 0.05,
                        "timeout": 1,
                        "path": "/healthz",
                        "fall": 2,
                        "rise": 1,
                    },
                },
            }
        ],
    )
    route = edge.cfg.routes[0]
    gauge = Gauge("up", "x", ["route", "endpoint", "check"], registry=edge.metrics.registry)
    nursery.start_soon(health_loop, route, edge.backends, gauge)
    state_a = edge.backends.balancers["www.test"].states[0]

    async def four() -> list[str]:
        names = []
        for i in range(4):
            rc, out, err = await curl(
                *resolve(pki.ca_file, "www.test", edge.https), f"https://www.test:{edge.https}/{i}"
            )
            assert rc == 0, err
            names.append(json.loads(out)["backend"])
        return names

    assert sorted(await four()) == ["a", "a", "b", "b"]  # round-robin over both
    a.health_status = 503
    await wait_until(lambda: not state_a.healthy)
    assert gauge.labels("www.test", str(state_a.endpoint), "http")._value.get() == 0
    assert await four() == ["b"] * 4
    a.health_status = 200
    await wait_until(lambda: state_a.healthy)
    assert sorted(await four()) == ["a", "a", "b", "b"]
    await edge.aclose()


async def test_access_log_http_entries_and_tcp_only_for_passthrough(
    tmp_path: Path,
    pki: PublicPKI,
    nursery: trio.Nursery,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(accesslog, "_enabled", True)
    echo = await serve_echo(nursery)
    seen: list[dict] = []
    pay = await serve_tls_backend(nursery, pki.backend_context("pay.test"), seen)
    edge = await start_edge(
        nursery,
        tmp_path,
        [
            terminate_route("www.test", echo, deny=[{"name": "no-delete", "methods": ["DELETE"]}]),
            {
                "host": "pay.test",
                "mode": "passthrough",
                "backend": {"endpoints": [f"127.0.0.1:{pay}"]},
            },
        ],
    )
    capsys.readouterr()
    rc, _, err = await curl(
        *resolve(pki.ca_file, "www.test", edge.https), f"https://www.test:{edge.https}/p?q=1"
    )
    assert rc == 0, err
    rc, out, _ = await curl(
        *resolve(pki.ca_file, "www.test", edge.https),
        "-X",
        "DELETE",
        "-w",
        "%{http_code}",
        f"https://www.test:{edge.https}/d",
    )
    assert out.endswith("403")
    rc, _, err = await curl(
        *resolve(pki.ca_file, "pay.test", edge.https), f"https://pay.test:{edge.https}/"
    )
    assert rc == 0, err
    # the relay ends (and logs) once both sides have closed, which can be just after curl exits
    await wait_until(lambda: "meshcar_edge_connections_total{" in edge.metrics.render().decode())
    accesslog.flush()
    entries = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    http = [e for e in entries if e["type"] == "request"]
    tcp = [e for e in entries if e["type"] == "connection"]
    waf = [{k: v for k, v in e.items() if k != "ts"} for e in entries if e["type"] == "waf"]
    ok = next(e for e in http if e["path"] == "/p?q=1")
    assert ok["client"] == "127.0.0.1" and ok["sni"] == "www.test" and ok["host"] == "www.test"
    assert ok["method"] == "GET" and ok["status"] == 200 and ok["mode"] == "terminate"
    assert ok["backend"] == f"127.0.0.1:{echo}" and ok["bytes_out"] > 0 and ok["duration_ms"] > 0
    assert ok["plaintext_backend"] is True
    assert any(e["path"] == "/d" and e["status"] == 403 for e in http)
    assert waf == [
        {
            "type": "waf",
            "client": "127.0.0.1",
            "host": "www.test",
            "method": "DELETE",
            "path": "/d",
            "rule": "no-delete",
            "decision": "deny",
        }
    ]
    # passthrough: one TCP entry, no HTTP entry (the edge never saw the request)
    assert [e["sni"] for e in tcp] == ["pay.test"]
    assert tcp[0]["mode"] == "passthrough" and tcp[0]["backend"] == f"127.0.0.1:{pay}"
    assert tcp[0]["bytes_up"] > 0 and tcp[0]["bytes_down"] > 0 and tcp[0]["duration_ms"] > 0
    assert tcp[0]["client"] == "127.0.0.1"
    assert not any(e.get("host") == "pay.test" or e.get("sni") == "pay.test" for e in http)
    await edge.aclose()


async def test_edge_stamps_request_id_and_trace_and_logs_the_reason(
    tmp_path: Path,
    pki: PublicPKI,
    nursery: trio.Nursery,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 15: the edge keeps a client's x-request-id, starts a span of the client's trace
    (or a new trace), passes both to the backend and logs them; a refusal logs its reason."""
    monkeypatch.setattr(accesslog, "_enabled", True)
    echo = await serve_echo(nursery)
    edge = await start_edge(
        nursery,
        tmp_path,
        [terminate_route("www.test", echo, deny=[{"name": "no-delete", "methods": ["DELETE"]}])],
    )
    capsys.readouterr()
    trace, span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    rc, out, err = await curl(
        *resolve(pki.ca_file, "www.test", edge.https),
        "-H",
        "x-request-id: client-1",
        "-H",
        f"traceparent: 00-{trace}-{span}-01",
        f"https://www.test:{edge.https}/t",
    )
    assert rc == 0, err
    seen = {k.lower(): v for k, v in json.loads(out)["headers"]}
    assert seen["x-request-id"] == "client-1"
    rc, out, _ = await curl(
        *resolve(pki.ca_file, "www.test", edge.https),
        "-X",
        "DELETE",
        "-w",
        "%{http_code}",
        f"https://www.test:{edge.https}/d",
    )
    assert out.endswith("403")
    accesslog.flush()
    http = [
        json.loads(x)
        for x in capsys.readouterr().out.splitlines()
        if x.startswith("{") and '"type":"request"' in x
    ]
    ok = next(e for e in http if e["path"] == "/t")
    assert (ok["request_id"], ok["trace_id"], ok["parent_span_id"]) == ("client-1", trace, span)
    assert seen["traceparent"] == f"00-{trace}-{ok['span_id']}-01"
    assert ok["reason"] is None
    denied = next(e for e in http if e["path"] == "/d")
    assert denied["status"] == 403 and denied["reason"] == "denied"
    assert denied["parent_span_id"] is None and len(denied["request_id"]) == 32
    await edge.aclose()


async def test_assembled_edge_warns_about_plaintext_and_becomes_ready(
    tmp_path: Path, pki: PublicPKI, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    echo = await serve_echo(nursery)
    https, http, admin = free_ports(3)
    cfg = parse_edge_config(
        {
            "listen": {"https": f"127.0.0.1:{https}", "http": f"127.0.0.1:{http}"},
            "admin": {"listen": f"127.0.0.1:{admin}"},
            "routes": [terminate_route("www.test", echo)],
        },
        "edge.yaml",
        tmp_path,
    )
    edge = Edge(cfg)
    with caplog.at_level(logging.WARNING, logger="meshcar.edge"):
        await nursery.start(edge.run)
    warning = [json.loads(r.getMessage()) for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == [
        {
            "event": "edge.plaintext_backend",
            "route": "www.test",
            "message": "TLS ends at the edge; the leg to the backend is unencrypted HTTP",
        }
    ]
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{admin}/ready")
        assert r.status_code == 200 and r.json()["ready"] is True
        r = await client.get(f"http://127.0.0.1:{http}/x?y=1", headers={"Host": f"www.test:{http}"})
        assert r.status_code == 301 and r.headers["location"] == f"https://www.test:{https}/x?y=1"
    rc, out, err = await curl(
        *resolve(pki.ca_file, "www.test", https), f"https://www.test:{https}/via-edge"
    )
    assert rc == 0 and json.loads(out)["target"] == "/via-edge", err
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{admin}/metrics")).text
    assert 'meshcar_edge_requests_total{mode="terminate",route="www.test",status="200"} 1.0' in text
    nursery.cancel_scope.cancel()


async def test_bulk_bodies_both_ways_through_a_terminated_connection(
    tmp_path: Path, pki: PublicPKI, nursery: trio.Nursery
) -> None:
    # large enough that the edge's direct socket writes and reads hit EAGAIN and wait
    echo = await serve_echo(nursery)
    edge = await start_edge(nursery, tmp_path, [terminate_route("www.test", echo)])
    size = 8 * 1024 * 1024
    rc, out, err = await curl(
        *resolve(pki.ca_file, "www.test", edge.https),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        f"https://www.test:{edge.https}/bytes/{size}",
    )
    assert rc == 0 and out == f"200 {size}", err
    body = tmp_path / "upload.bin"
    data = bytes(range(256)) * (4 * 1024 * 1024 // 256)
    body.write_bytes(data)
    rc, out, err = await curl(
        *resolve(pki.ca_file, "www.test", edge.https),
        "--data-binary",
        f"@{body}",
        f"https://www.test:{edge.https}/upload",
    )
    assert rc == 0, err
    info = json.loads(out)
    assert (
        info["body_length"] == len(data) and info["body_sha256"] == hashlib.sha256(data).hexdigest()
    )
    await edge.aclose()


def handshakes(edge, result: str) -> float:  # noqa: ANN001
    """meshcar_tls_handshakes_total{direction="edge",result=...} as the edge counts it."""
    return edge.metrics.handshakes.labels("edge", result)._value.get()


async def test_handshake_outcomes_are_told_apart(
    tmp_path: Path, pki: PublicPKI, nursery: trio.Nursery
) -> None:
    echo = await serve_echo(nursery)
    edge = await start_edge(
        nursery,
        tmp_path,
        [terminate_route("www.test", echo)],
        default_route="www.test",
        handshake_timeout=0.3,
    )
    # `openssl s_time -new` completes each handshake and closes at once, without reading the
    # session tickets the edge sends after it: every one is a full handshake, not a failure
    r = await trio.run_process(
        ["openssl", "s_time", "-connect", f"127.0.0.1:{edge.https}", "-new", "-time", "1"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    made = int(r.stdout.decode().split(" connections in ")[0].split()[-1])
    assert made > 10, r.stdout.decode()
    await wait_until(lambda: handshakes(edge, "full") >= made)
    assert handshakes(edge, "failure") == handshakes(edge, "aborted") == 0

    hello = client_hello("www.test")
    # the client goes away after the edge's first flight: with a reset, and with a plain close
    for linger in (True, False):
        with trio.fail_after(3):
            stream = await trio.open_tcp_stream("127.0.0.1", edge.https)
            await stream.send_all(hello)
            assert (await stream.receive_some(5))[:1] == b"\x16"  # the ServerHello record
            if linger:  # close() sends a reset
                stream.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            await stream.aclose()
    await wait_until(lambda: handshakes(edge, "aborted") == 2)

    # a hello and then silence: closed once handshake_timeout (0.3 s) is over
    with trio.fail_after(3):
        reply = await raw_exchange(edge.https, hello, wait=3)
    assert reply[:1] == b"\x16"
    await wait_until(lambda: handshakes(edge, "timeout") == 1)

    # no cipher in common: the client gets the edge's alert, counted as a failure
    r = await trio.run_process(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{edge.https}",
            "-servername",
            "www.test",
            "-tls1_2",
            "-cipher",
            "AES128-SHA",
        ],
        stdin=b"",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert r.returncode != 0 and "alert handshake failure" in r.stderr.decode(), r.stderr.decode()
    await wait_until(lambda: handshakes(edge, "failure") == 1)
    assert handshakes(edge, "full") >= made and handshakes(edge, "aborted") == 2

    # half a hello and then end of stream: closed at once, not after hello_timeout (10 s)
    with trio.fail_after(3):
        stream = await trio.open_tcp_stream("127.0.0.1", edge.https)
        await stream.send_all(hello[:40])
        await stream.send_eof()
        assert await stream.receive_some(100) == b""
        await stream.aclose()
    await wait_until(lambda: handshakes(edge, "no_client_hello") == 1)

    rc, out, err = await curl(
        *resolve(pki.ca_file, "www.test", edge.https), f"https://www.test:{edge.https}/ok"
    )
    assert rc == 0 and json.loads(out)["target"] == "/ok", err
    await edge.aclose()
