"""gRPC and HTTP/2 through an in-process sidecar pair (real mTLS on loopback): a grpcio client
speaks h2c (prior knowledge) to the outbound, the sidecars speak h2 (ALPN) to each other, and
the inbound speaks h2c to a grpcio server (`app.protocol: h2c`). Unary, server-streaming,
client-streaming, bidi, deadline exceeded, a 4 MB message, trailers with status details; the
allow list and XFCC exactly as for HTTP/1.1; curl --http2-prior-knowledge."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from concurrent import futures
from pathlib import Path

import pytest
import trio

from tests.integration.conftest import NODES, sid, start_node
from tests.support.pki import ThrowawayCA
from tests.support.ports import free_port

grpc = pytest.importorskip("grpc")

SERVICE = "meshcar.test.Echo"
FOUR_MB = 4 * 1024 * 1024


def _meta(context) -> bytes:
    return json.dumps(sorted((k, v) for k, v in context.invocation_metadata())).encode()


class Echo:
    def __init__(self) -> None:
        self.release = threading.Event()

    def unary(self, request: bytes, context) -> bytes:
        if request == b"meta":
            return _meta(context)
        if request == b"fail":
            context.set_trailing_metadata(
                [("x-detail", "why"), ("grpc-status-details-bin", b"\x08\x03\x12\x03bad")]
            )
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request, see details")
        if request == b"slow":
            self.release.wait(10)
            return b"late"
        return b"echo:" + request[:64] + str(len(request)).encode()

    def big(self, request: bytes, context) -> bytes:
        return b"x" * FOUR_MB

    def server_stream(self, request: bytes, context):
        for i in range(int(request)):
            yield f"item {i}".encode()

    def client_stream(self, requests, context) -> bytes:
        chunks = list(requests)
        return f"{len(chunks)} messages, {sum(map(len, chunks))} bytes".encode()

    def bidi(self, requests, context):
        for r in requests:
            yield b"re:" + r


def start_grpc_server() -> tuple[object, int, Echo]:
    echo = Echo()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_receive_message_length", 8 << 20)],
    )
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(echo.unary),
        "Big": grpc.unary_unary_rpc_method_handler(echo.big),
        "ServerStream": grpc.unary_stream_rpc_method_handler(echo.server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(echo.client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(echo.bidi),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, echo


@pytest.fixture
async def grpc_mesh(tmp_path: Path, nursery: trio.Nursery):
    server, app_port, echo = start_grpc_server()
    ca = ThrowawayCA.create()
    api = await start_node(
        nursery,
        tmp_path,
        ca,
        "api",
        app_port,
        [sid("web")],
        {},
        app={"port": app_port, "protocol": "h2c"},
    )
    ups = {"api": {"endpoints": [f"127.0.0.1:{api.inbound_port}"], "spiffe_id": sid("api")}}
    web = await start_node(nursery, tmp_path, ca, "web", app_port, [], ups)
    yield web, api, echo, ca
    echo.release.set()
    server.stop(0)
    for node in NODES:
        await node.inbound.aclose()
        await node.outbound.aclose()
    NODES.clear()


def channel(port: int):
    return grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.default_authority", "api"),  # the outbound routes on :authority
            ("grpc.enable_http_proxy", 0),
            ("grpc.max_receive_message_length", 8 << 20),
            ("grpc.max_send_message_length", 8 << 20),
        ],
    )


def call_all(port: int, make_channel=None) -> dict:
    out: dict = {}
    with (make_channel or channel)(port) as ch:
        unary = ch.unary_unary(f"/{SERVICE}/Unary")
        out["unary"] = unary(b"hello", timeout=10)
        out["meta"] = json.loads(unary(b"meta", timeout=10))
        try:
            unary(b"fail", timeout=10)
        except grpc.RpcError as exc:
            out["fail"] = (exc.code(), exc.details(), dict(exc.trailing_metadata()))
        out["big_up"] = unary(b"y" * FOUR_MB, timeout=20)
        out["big_down"] = len(ch.unary_unary(f"/{SERVICE}/Big")(b"", timeout=20))
        out["server_stream"] = list(ch.unary_stream(f"/{SERVICE}/ServerStream")(b"5", timeout=10))
        cs = ch.stream_unary(f"/{SERVICE}/ClientStream")
        out["client_stream"] = cs(iter([b"a" * 1000] * 50), timeout=10)
        bidi = ch.stream_stream(f"/{SERVICE}/Bidi")
        out["bidi"] = list(bidi(iter([b"1", b"2", b"3"]), timeout=10))
        try:
            unary(b"slow", timeout=0.5)
        except grpc.RpcError as exc:
            out["deadline"] = exc.code()
    return out


async def test_grpc_through_a_sidecar_pair(grpc_mesh) -> None:
    web, api, echo, _ = grpc_mesh
    out = await trio.to_thread.run_sync(call_all, web.outbound_port)
    assert out["unary"] == b"echo:hello5"
    meta = dict(out["meta"])
    assert meta["x-forwarded-client-cert"].startswith(f"By={sid('api')};Hash=")
    assert meta["x-forwarded-client-cert"].endswith(f";URI={sid('web')}")
    code, details, trailers = out["fail"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details == "bad request, see details"
    assert trailers["x-detail"] == "why"
    assert trailers["grpc-status-details-bin"] == b"\x08\x03\x12\x03bad"
    assert out["big_up"] == b"echo:" + b"y" * 64 + str(FOUR_MB).encode()
    assert out["big_down"] == FOUR_MB
    assert out["server_stream"] == [f"item {i}".encode() for i in range(5)]
    assert out["client_stream"] == b"50 messages, 50000 bytes"
    assert out["bidi"] == [b"re:1", b"re:2", b"re:3"]
    assert out["deadline"] == grpc.StatusCode.DEADLINE_EXCEEDED
    # the sidecars spoke h2 to each other over mTLS, one connection for all the calls
    assert web.metrics.pool_connections.labels("api")._value.get() == 1


async def test_grpc_caller_not_allowed_is_permission_denied(tmp_path, grpc_mesh, nursery) -> None:
    web, api, _, ca = grpc_mesh
    ups = {"api": {"endpoints": [f"127.0.0.1:{api.inbound_port}"], "spiffe_id": sid("api")}}
    intruder = await start_node(nursery, tmp_path, ca, "intruder", 1, [], ups)

    def call() -> object:
        with channel(intruder.outbound_port) as ch:
            try:
                ch.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=10)
            except grpc.RpcError as exc:
                return exc.code(), exc.details()
        return None

    code, details = await trio.to_thread.run_sync(call)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert f"{sid('intruder')} is not allowed to call {sid('api')}" in details
    if shutil.which("curl") is not None:  # a gRPC error is Trailers-Only with HTTP 200
        head = await curl_grpc_head(tmp_path, intruder.outbound_port)
        assert head.startswith("HTTP/2 200"), head
        assert "content-type: application/grpc" in head and "grpc-status: 7" in head, head
        plain = await curl_grpc_head(tmp_path, intruder.outbound_port, grpc_type=False)
        assert plain.startswith("HTTP/2 403"), plain  # not gRPC: the JSON refusal as before


async def curl_grpc_head(tmp_path: Path, port: int, grpc_type: bool = True) -> str:
    """The response head curl --http2-prior-knowledge sees for a gRPC-shaped call to `port`."""
    body = tmp_path / "call.bin"
    body.write_bytes(GRPC_FRAME)
    ctype = "application/grpc" if grpc_type else "application/octet-stream"

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "curl", "-sS", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null",
                "-H", "Host: api", "-H", f"content-type: {ctype}", "-H", "te: trailers",
                "--data-binary", f"@{body}", f"http://127.0.0.1:{port}/{SERVICE}/Unary",
            ],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip

    done = await trio.to_thread.run_sync(run)
    return done.stdout.replace("\r\n", "\n")


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (apt-get install curl)")
async def test_grpc_upstream_unreachable_is_unavailable(tmp_path, grpc_mesh, nursery) -> None:
    """An upstream nobody listens on: grpcio sees UNAVAILABLE with the outbound's message
    (HTTP 200 Trailers-Only, grpc-status 14), not an HTTP 502 it has to guess from."""
    _, _, _, ca = grpc_mesh
    ups = {"api": {"endpoints": [f"127.0.0.1:{free_port()}"], "spiffe_id": sid("api")}}
    lonely = await start_node(nursery, tmp_path, ca, "lonely", 1, [], ups)

    def call() -> object:
        with channel(lonely.outbound_port) as ch:
            try:
                ch.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=10)
            except grpc.RpcError as exc:
                return exc.code(), exc.details()
        return None

    code, details = await trio.to_thread.run_sync(call)
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    assert "api" in details and "Received http2 header" not in details, details
    head = await curl_grpc_head(tmp_path, lonely.outbound_port)
    assert head.startswith("HTTP/2 200") and "grpc-status: 14" in head, head


GRPC_FRAME = b"\x00" + (5).to_bytes(4, "big") + b"hello"  # one uncompressed message


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (apt-get install curl)")
async def test_curl_http2_prior_knowledge(tmp_path: Path, grpc_mesh) -> None:
    web, *_ = grpc_mesh
    body = tmp_path / "req.bin"
    body.write_bytes(GRPC_FRAME)

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "curl", "-sS", "--http2-prior-knowledge", "-o", str(tmp_path / "out.bin"),
                "-w", "%{http_version} %{http_code}", "-H", "Host: api",
                "-H", "content-type: application/grpc", "-H", "te: trailers",
                "--data-binary", f"@{body}",
                f"http://127.0.0.1:{web.outbound_port}/{SERVICE}/Unary",
            ],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip

    done = await trio.to_thread.run_sync(run)
    assert done.stdout == "2 200", (done.stdout, done.stderr)
    assert (tmp_path / "out.bin").read_bytes()[5:] == b"echo:hello5"


@pytest.mark.skipif(shutil.which("h2load") is None, reason="needs h2load (apt nghttp2-client)")
async def test_h2load_through_the_pair(tmp_path: Path, grpc_mesh) -> None:
    web, *_ = grpc_mesh
    body = tmp_path / "req.bin"
    body.write_bytes(GRPC_FRAME)

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "h2load", "-n", "200", "-c", "2", "-m", "10", "-d", str(body),
                "-H", ":authority: api", "-H", "content-type: application/grpc",
                "-H", "te: trailers",
                f"http://127.0.0.1:{web.outbound_port}/{SERVICE}/Unary",
            ],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    done = await trio.to_thread.run_sync(run)
    assert "200 succeeded, 0 failed, 0 errored" in done.stdout, done.stdout + done.stderr
    assert "status codes: 200 2xx" in done.stdout, done.stdout


async def test_draining_lets_a_grpc_call_in_flight_finish(grpc_mesh) -> None:
    """SIGTERM's drain (net/drain.py) counts HTTP/2 streams as requests in flight: the
    process waits for a gRPC call in flight, which completes; the connection gets a
    graceful GOAWAY and the channel's next call goes over a new connection."""
    from meshcar.net.drain import Drain

    web, api, echo, _ = grpc_mesh
    drain = web.outbound.drain = Drain()
    result: list = []

    def slow_then_next() -> None:
        with channel(web.outbound_port) as ch:
            unary = ch.unary_unary(f"/{SERVICE}/Unary")
            result.append(unary(b"slow", timeout=20))
            result.append(unary(b"after", timeout=20))

    async with trio.open_nursery() as n:
        n.start_soon(trio.to_thread.run_sync, slow_then_next)
        with trio.fail_after(20):
            while drain.in_flight != 1:  # the call is in flight: counted
                await trio.sleep(0.01)
        drain.draining = True  # what the shell does on SIGTERM
        echo.release.set()
        with trio.fail_after(20):
            await drain.wait_idle()
    assert result == [b"late", b"echo:after5"]
    assert web.metrics.pool_connections.labels("api")._value.get() >= 1


async def test_a_draining_inbound_lets_other_streams_of_the_connection_finish(grpc_mesh) -> None:
    """The inbound drains: its graceful GOAWAY (sent when the first stream ends) must not cut
    the other streams the outbound still has on that mesh connection."""
    from meshcar.net.drain import Drain

    web, api, echo, _ = grpc_mesh
    drain = api.inbound.drain = Drain()
    more = threading.Event()
    result: dict = {}

    def calls() -> None:
        with channel(web.outbound_port) as ch:
            bidi = ch.stream_stream(f"/{SERVICE}/Bidi")

            def messages():
                yield b"1"
                more.wait(20)
                yield b"2"

            replies = bidi(messages(), timeout=20)
            result["first"] = next(replies)
            slow = ch.unary_unary(f"/{SERVICE}/Unary").future(b"slow", timeout=20)
            result["slow"] = slow.result()  # ends first: the inbound's GOAWAY goes out
            more.set()
            result["rest"] = list(replies)

    async with trio.open_nursery() as n:
        n.start_soon(trio.to_thread.run_sync, calls)
        with trio.fail_after(20):
            while drain.in_flight != 2:  # both streams in flight at the inbound
                await trio.sleep(0.01)
        drain.draining = True
        echo.release.set()
    assert result == {"first": b"re:1", "slow": b"late", "rest": [b"re:2"]}
