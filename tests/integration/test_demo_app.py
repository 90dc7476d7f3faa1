"""The demo app in-process on loopback: honest echo, keep-alive, HEAD, peer calls, TLS mode."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from meshcar.demo.app import AppConfig, DemoServer, build_tls
from meshcar.demo.pki import ensure_public_pki
from meshcar.proto.proxy_protocol import ProxyPolicy, encode_v2
from tests.support.nagle_app import assert_no_ack_stall


@contextmanager
def serve(config: AppConfig) -> Iterator[int]:
    server = DemoServer(config)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def app(name: str, proxy: str | None = None, **kw: object) -> AppConfig:
    return AppConfig(name, "127.0.0.1", 0, proxy, kw.pop("tls", None), **kw)  # type: ignore[arg-type]


def test_echo_is_honest_and_keeps_the_connection_alive() -> None:
    with serve(app("api")) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.putrequest("POST", "/v1/echo?x=1")
            for name, value in [
                ("X-Forwarded-Client-Cert", "By=a;URI=spiffe://td/one"),
                ("X-Forwarded-Client-Cert", "URI=spiffe://td/two"),
                ("Content-Length", "8"),
            ]:
                conn.putheader(name, value)
            conn.endheaders(b"helloabc")
            r = conn.getresponse()
            doc = json.loads(r.read())
            first_sock = conn.sock
            assert r.status == 200 and r.getheader("Content-Type") == "application/json"
            assert doc["service"] == "api" and doc["method"] == "POST"
            assert doc["path"] == "/v1/echo?x=1" and doc["body_bytes"] == 8
            assert "X-Forwarded-Client-Cert: By=a;URI=spiffe://td/one" in doc["headers"]
            assert "X-Forwarded-Client-Cert: URI=spiffe://td/two" in doc["headers"]
            assert doc["peer"] == "spiffe://td/two"

            conn.request("HEAD", "/anything")
            r = conn.getresponse()
            assert r.status == 200 and int(r.getheader("Content-Length")) > 0
            assert r.read() == b""
            conn.request("GET", "/again")
            r = conn.getresponse()
            assert json.loads(r.read())["peer"] is None
            assert conn.sock is first_sock  # one connection for all three
        finally:
            conn.close()


def test_keepalive_responses_do_not_wait_for_a_delayed_ack() -> None:
    # Head and body in two writes with Nagle on made every response after the first on a
    # keep-alive connection wait ~40 ms for the client's delayed ACK of the head: a stall
    # detector, not a performance bound (tests/support/nagle_app.py).
    with serve(app("api")) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        ms = []
        try:
            for i in range(40):
                start = time.perf_counter()
                conn.request("GET", f"/n{i}")
                r = conn.getresponse()
                assert r.status == 200 and json.loads(r.read())["path"] == f"/n{i}"
                ms.append((time.perf_counter() - start) * 1000)
        finally:
            conn.close()
    assert_no_ack_stall(ms)


def test_chunked_body_gets_411_not_a_hand_parse() -> None:
    with serve(app("api")) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.putrequest("POST", "/v1/echo")
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders(b"5\r\nhello\r\n0\r\n\r\n")
            r = conn.getresponse()
            assert r.status == 411 and "Content-Length" in json.loads(r.read())["error"]
        finally:
            conn.close()


def test_api_pay_goes_through_the_proxy_in_absolute_form() -> None:
    # A demo app standing in for the sidecar's outbound proxy reports what it received.
    with (
        serve(app("sidecar-stand-in")) as proxy_port,
        serve(app("api", f"http://127.0.0.1:{proxy_port}")) as api_port,
    ):
        conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=10)
        try:
            conn.request("GET", "/v1/pay")
            r = conn.getresponse()
            doc = json.loads(r.read())
        finally:
            conn.close()
    assert r.status == 200
    seen = doc["payments"]["body"]
    assert doc["payments"]["status"] == 200
    assert seen["path"] == "http://payments/v1/charge"
    assert "Host: payments" in seen["headers"]


def test_peer_call_without_a_sidecar_is_an_honest_502() -> None:
    with serve(app("web", None)) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/try-payments")
            r = conn.getresponse()
            doc = json.loads(r.read())
        finally:
            conn.close()
    assert r.status == 502 and "HTTP_PROXY" in doc["payments"]["error"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    d: Path = tmp_path_factory.mktemp("pki")
    return ensure_public_pki(d, payments_host="payments.demo.test", edge_hosts=("www.demo.test",))


def _client_ctx(pki, with_cert: bool) -> ssl.SSLContext:  # noqa: ANN001
    ctx = ssl.create_default_context(cafile=str(pki.edge_ca))
    if with_cert:
        ctx.load_cert_chain(str(pki.partner_cert), str(pki.partner_key))
    return ctx


def _tls_get(port: int, ctx: ssl.SSLContext, prefix: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(prefix)
        with ctx.wrap_socket(raw, server_hostname="payments.demo.test") as tls:
            tls.sendall(b"GET /v1/charge HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    return data


def test_tls_mode_requires_a_partner_certificate(pki) -> None:  # noqa: ANN001
    tls = build_tls(str(pki.payments_cert), str(pki.payments_key), str(pki.partner_ca))
    with serve(app("payments", tls=tls)) as port:
        ok = _tls_get(port, _client_ctx(pki, True))
        assert ok.startswith(b"HTTP/1.1 200")
        doc = json.loads(ok.split(b"\r\n\r\n", 1)[1])
        assert doc["tls"]["client_cert_subject"] == "commonName=partner.example"
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            _tls_get(port, _client_ctx(pki, False))


def test_tls_mode_accepts_a_proxy_v2_header_before_the_handshake(pki) -> None:  # noqa: ANN001
    tls = build_tls(str(pki.payments_cert), str(pki.payments_key), str(pki.partner_ca))
    policy = ProxyPolicy.parse(["127.0.0.1/32"], required=False)  # direct clients below too
    with serve(app("payments", tls=tls, proxy_protocol=policy)) as port:
        header = encode_v2(("203.0.113.7", 40000), ("127.0.0.1", 9443))
        data = _tls_get(port, _client_ctx(pki, True), prefix=header)
        doc = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert doc["proxy_protocol"]["source"] == "203.0.113.7:40000"
        assert doc["proxy_protocol"]["version"] == 2
        direct = json.loads(_tls_get(port, _client_ctx(pki, True)).split(b"\r\n\r\n", 1)[1])
        assert "proxy_protocol" not in direct
        # A malformed header (v2 signature, bad version) closes the connection before TLS.
        with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            _tls_get(port, _client_ctx(pki, True), prefix=header[:12] + b"\x99" + header[13:])


def test_peer_calls_reuse_one_keepalive_connection_to_the_sidecar() -> None:
    """The app keeps one client per sidecar proxy: a client made per call cost 50-250 ms
    (an SSL context and a CA bundle load, even for plain HTTP) on every request."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    ports: set[int] = set()

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            ports.add(self.client_address[1])
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        with serve(app("api", f"http://127.0.0.1:{proxy.server_address[1]}")) as api_port:
            for _ in range(3):
                conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=10)
                try:
                    conn.request("GET", "/v1/pay")
                    doc = json.loads(conn.getresponse().read())
                finally:
                    conn.close()
                assert doc["payments"]["status"] == 200
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert len(ports) == 1, ports  # one connection for three calls
