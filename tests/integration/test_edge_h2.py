"""HTTP/2 at the edge: terminate and bridge routes with `http2: true` offer h2 by ALPN. gRPC (grpcio over TLS)
through a bridge route to a sidecar whose app is a grpcio server (app.protocol: h2c), every
call kind of test_grpc; httpx and curl with h2 on a terminate route (HTTP/1.1 backend),
HSTS kept; an HTTP/1.1-only client still gets HTTP/1.1."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
import trio

from meshcar.tls.store import CredentialStore
from tests.integration.conftest import NODES, sid, start_node
from tests.integration.edge_fixtures import public_pki, start_edge, terminate_route
from tests.integration.test_grpc import FOUR_MB, SERVICE, call_all, start_grpc_server
from tests.support.echo_app import serve_echo
from tests.support.pki import ThrowawayCA

grpc = pytest.importorskip("grpc")


@pytest.fixture
async def h2_edge(tmp_path: Path, nursery: trio.Nursery):
    server, grpc_port, echo = start_grpc_server()
    pki = public_pki(tmp_path)
    mesh_ca = ThrowawayCA.create()
    h2c = {"port": grpc_port, "protocol": "h2c"}
    api = await start_node(nursery, tmp_path, mesh_ca, "api", grpc_port, [sid("edge")], {}, app=h2c)
    store = CredentialStore(tmp_path / "edge-state")
    store.install(mesh_ca.credential(sid("edge")))
    echo_port = await serve_echo(nursery)
    routes = [
        terminate_route("www.test", echo_port, hsts=True, http2=True, max_body_bytes=1000),
        {
            "host": "api.test",
            "mode": "bridge",
            "tls": {"cert": "site.pem", "key": "site.pem"},
            "backend": {"endpoints": [f"127.0.0.1:{api.inbound_port}"], "spiffe_id": sid("api")},
            "http2": True,
            "max_body_bytes": 6 << 20,  # the 4 MB message passes; 8 MB streamed does not
        },
        terminate_route("opt.test", echo_port),  # http2 not set: http/1.1 only
        terminate_route(
            "secure.test",
            echo_port,
            http2=True,
            rate_limit={"per_second": 0.001, "burst": 2},
            max_body_bytes=1000,
        ),
    ]
    identity = {
        "spiffe_id": sid("edge"),
        "ca_url": "https://127.0.0.1:1",
        "ca_bundle": "x",
        "state_dir": str(tmp_path / "edge-state"),
    }
    edge = await start_edge(nursery, tmp_path, routes, store, identity=identity)
    yield edge, pki, api
    echo.release.set()
    server.stop(0)
    await edge.aclose()
    for node in NODES:
        await node.inbound.aclose()
        await node.outbound.aclose()
    NODES.clear()


async def test_grpc_through_a_bridge_route(h2_edge) -> None:
    edge, pki, api = h2_edge
    roots = pki.ca_file.read_bytes()

    def tls_channel(port: int):
        return grpc.secure_channel(
            f"127.0.0.1:{port}",
            grpc.ssl_channel_credentials(root_certificates=roots),
            options=[
                ("grpc.ssl_target_name_override", "api.test"),
                ("grpc.default_authority", "api.test"),
                ("grpc.enable_http_proxy", 0),
                ("grpc.max_receive_message_length", 8 << 20),
                ("grpc.max_send_message_length", 8 << 20),
            ],
        )

    out = await trio.to_thread.run_sync(call_all, edge.https, tls_channel)
    assert out["unary"] == b"echo:hello5"
    meta = dict(out["meta"])
    assert meta["x-forwarded-client-cert"].endswith(f";URI={sid('edge')}")
    code, details, trailers = out["fail"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details == "bad request, see details"
    assert trailers["grpc-status-details-bin"] == b"\x08\x03\x12\x03bad"
    assert out["big_up"].endswith(str(FOUR_MB).encode()) and out["big_down"] == FOUR_MB
    assert out["server_stream"] == [f"item {i}".encode() for i in range(5)]
    assert out["client_stream"] == b"50 messages, 50000 bytes"
    assert out["bidi"] == [b"re:1", b"re:2", b"re:3"]
    assert out["deadline"] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert edge.metrics.handshakes.labels("bridge", "full")._value.get() == 1


async def test_h2_on_a_terminate_route(h2_edge) -> None:
    edge, pki, _ = h2_edge
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    base = f"https://127.0.0.1:{edge.https}"
    www = {"sni_hostname": "www.test"}
    transport = httpx.AsyncHTTPTransport(http2=True, verify=ctx)
    hdrs = {"Host": "www.test"}
    async with httpx.AsyncClient(transport=transport, base_url=base, timeout=20) as c:
        r = await c.get("/v1/x?y=1", headers=hdrs, extensions=www)  # by IP, SNI www.test
    assert r.http_version == "HTTP/2" and r.status_code == 200, r.text
    assert r.json()["target"] == "/v1/x?y=1"
    assert "strict-transport-security" in r.headers
    async with httpx.AsyncClient(verify=ctx, base_url=base, timeout=20) as c:
        r = await c.get("/", headers=hdrs, extensions=www)
    assert r.http_version == "HTTP/1.1" and r.status_code == 200


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (apt-get install curl)")
@pytest.mark.parametrize("host, version", [("www.test", "2"), ("opt.test", "1.1")])
async def test_curl_http2_on_the_edge(h2_edge, host: str, version: str) -> None:
    edge, pki, _ = h2_edge

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "curl", "-sS", "--http2", "--cacert", str(pki.ca_file),
                "--resolve", f"{host}:{edge.https}:127.0.0.1",
                "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                f"https://{host}:{edge.https}/hello",
            ],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip

    done = await trio.to_thread.run_sync(run)
    assert done.stdout == f"{version} 200", (done.stdout, done.stderr)  # http2: true routes only


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (apt-get install curl)")
async def test_edge_refusals_and_limits_on_h2(h2_edge) -> None:
    """The route's policy holds on HTTP/2 streams: the rate limit's 429 with Retry-After on
    the same connection, max_body_bytes' 413, and the edge's request metric and log."""
    edge, pki, _ = h2_edge

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "curl", "-sS", "--http2", "--cacert", str(pki.ca_file),
                "--resolve", f"secure.test:{edge.https}:127.0.0.1", *args,
            ],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip

    url = f"https://secure.test:{edge.https}/x"
    done = await trio.to_thread.run_sync(
        lambda: run("-o", "/dev/null", "-w", "%{http_code}", "--data-binary", "x" * 2000, url)
    )
    assert done.stdout == "413", done.stdout  # declared too big (and one token spent)
    args = [a for _ in range(6) for a in ("-o", "/dev/null", url)]
    done = await trio.to_thread.run_sync(lambda: run("-w", "%{http_version} %{http_code}\n", *args))
    lines = done.stdout.splitlines()
    assert lines[0] == "2 200" and lines[1:] == ["2 429"] * 5, (done.stdout, done.stderr)
    done = await trio.to_thread.run_sync(lambda: run("-i", url))
    assert done.stdout.startswith("HTTP/2 429") and "retry-after: " in done.stdout
    ok = edge.metrics.registry.get_sample_value(
        "meshcar_edge_requests_total",
        {"route": "secure.test", "mode": "terminate", "status": "429"},
    )
    assert ok == 6


class RawH2:
    """A raw h2 client (the h2 library) over TLS to the edge: streams of our choosing."""

    def __init__(self, stream: trio.SSLStream) -> None:
        import h2.config
        import h2.connection

        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.status: dict[int, int] = {}
        self.body: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.reset: dict[int, int] = {}

    @classmethod
    async def open(cls, port: int, ca_file: Path, host: str) -> RawH2:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        ctx.set_alpn_protocols(["h2"])
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        tls = trio.SSLStream(tcp, ctx, server_hostname=host)
        await tls.do_handshake()
        assert tls.selected_alpn_protocol() == "h2"
        c = cls(tls)
        await c.flush()
        return c

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def until(self, done) -> None:
        import h2.events

        while not done():
            data = await self.stream.receive_some(65536)
            assert data, "the edge closed the connection"
            for ev in self.conn.receive_data(data):
                sid = getattr(ev, "stream_id", 0)
                if isinstance(ev, h2.events.ResponseReceived):
                    self.status[sid] = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    self.body[sid] = self.body.get(sid, b"") + ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded):
                    self.ended.add(sid)
                elif isinstance(ev, h2.events.StreamReset):
                    self.reset[sid] = int(ev.error_code)
            await self.flush()


async def test_streamed_h2_body_past_max_body_bytes_gets_413(h2_edge) -> None:
    """A request body of undeclared length (DATA frames, no content-length) past the route's
    max_body_bytes: 413 on that stream and RST_STREAM NO_ERROR for the rest of its body;
    a GET opened meanwhile and a streamed body under the limit on the same connection are
    answered (other streams unaffected)."""
    edge, pki, _ = h2_edge
    c = await RawH2.open(edge.https, pki.ca_file, "www.test")

    def head(method: bytes) -> list[tuple[bytes, bytes]]:
        return [(b":method", method), (b":scheme", b"https"), (b":authority", b"www.test")] + [
            (b":path", b"/up")
        ]

    with trio.fail_after(30):
        c.conn.send_headers(1, head(b"POST"))
        c.conn.send_data(1, b"a" * 800)
        await c.flush()
        c.conn.send_headers(3, head(b"GET"), end_stream=True)
        c.conn.send_data(1, b"b" * 800)  # 1600 > 1000, the body not ended
        await c.flush()
        await c.until(lambda: 1 in c.ended and 3 in c.ended)
        assert c.status[1] == 413, c.body.get(1)
        assert b"larger than 1000 bytes" in c.body[1]
        assert c.reset.get(1, 0) == 0  # NO_ERROR: the rest of the body is not wanted
        assert c.status[3] == 200
        c.conn.send_headers(5, head(b"POST"))
        c.conn.send_data(5, b"c" * 600)
        c.conn.send_data(5, b"d" * 300, end_stream=True)
        await c.flush()
        await c.until(lambda: 5 in c.ended)
    assert c.status[5] == 200 and json.loads(c.body[5])["body_length"] == 900, c.body[5][-300:]
    await c.stream.aclose()


async def test_grpc_stream_past_max_body_bytes_on_a_bridge_route(h2_edge) -> None:
    """A client-streaming call (no content-length) past the bridge route's max_body_bytes:
    RESOURCE_EXHAUSTED with the edge's message (413 as gRPC, Trailers-Only), and the same
    channel's next call is answered."""
    edge, pki, _ = h2_edge
    roots = pki.ca_file.read_bytes()

    def calls() -> tuple:
        with grpc.secure_channel(
            f"127.0.0.1:{edge.https}",
            grpc.ssl_channel_credentials(root_certificates=roots),
            options=[
                ("grpc.ssl_target_name_override", "api.test"),
                ("grpc.default_authority", "api.test"),
                ("grpc.enable_http_proxy", 0),
            ],
        ) as ch:
            cs = ch.stream_unary(f"/{SERVICE}/ClientStream")
            try:
                cs(iter([b"m" * (1 << 20)] * 8), timeout=30)
                big = None
            except grpc.RpcError as exc:
                big = (exc.code(), exc.details())
            return big, ch.unary_unary(f"/{SERVICE}/Unary")(b"after", timeout=10)

    big, after = await trio.to_thread.run_sync(calls)
    assert big is not None and big[0] == grpc.StatusCode.RESOURCE_EXHAUSTED, big
    assert f"request body larger than {6 << 20} bytes" in big[1], big
    assert after == b"echo:after5"


async def test_h2_bridge_connections_resume_tls_sessions(h2_edge) -> None:
    """Issue 13: each h2 bridge connection (edge -> backend sidecar, a new one per client
    connection) did a full TLS handshake; the second now resumes the first one's session
    through the mTLS dialer's session cache, as HTTP/1.1 bridge connections do."""
    edge, pki, _ = h2_edge
    roots = pki.ca_file.read_bytes()

    def unary(msg: bytes) -> bytes:  # a channel each: a client connection each
        with grpc.secure_channel(
            f"127.0.0.1:{edge.https}",
            grpc.ssl_channel_credentials(root_certificates=roots),
            options=[
                ("grpc.ssl_target_name_override", "api.test"),
                ("grpc.default_authority", "api.test"),
                ("grpc.enable_http_proxy", 0),
            ],
        ) as ch:
            return ch.unary_unary(f"/{SERVICE}/Unary")(msg, timeout=10)

    assert await trio.to_thread.run_sync(unary, b"one") == b"echo:one3"
    assert await trio.to_thread.run_sync(unary, b"two") == b"echo:two3"

    def hs(result: str) -> float:
        return edge.metrics.handshakes.labels("bridge", result)._value.get()

    assert (hs("full"), hs("resumed"), hs("failure")) == (1, 1, 0)
