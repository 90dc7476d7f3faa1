"""CONNECT on the sidecar's outbound HTTP proxy listener (sidecar/egress.py): with
`outbound.egress: allow` and the port in `outbound.connect_ports` (default [443]) a byte
tunnel to the host; egress deny, a port not allowed and a mesh upstream's name refused
with a body naming why; a silent tunnel closed by timeouts.upgraded_idle_seconds. Real
curl through the tunnel to a real TLS server (trustme) on loopback."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import pytest
import trio
import trustme

from tests.integration.conftest import Mesh, make_cfg, sid, start_node

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


async def _https_server(nursery: trio.Nursery, tmp: Path) -> tuple[int, Path]:
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    pem = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))

    async def handle(stream: trio.SSLStream) -> None:
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            body = b"hello through the tunnel"
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (len(body), body)
            )
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(
        lambda task_status: trio.serve_ssl_over_tcp(
            handle, 0, ctx, host="127.0.0.1", task_status=task_status
        )
    )
    return listeners[0].transport_listener.socket.getsockname()[1], pem


async def _node(nursery: trio.Nursery, tmp: Path, mesh: Mesh, **top: object):
    outbound = top.pop("outbound", {})
    assert isinstance(outbound, dict)
    ups = {"api": {"endpoints": [f"127.0.0.1:{mesh.server.inbound_port}"], "spiffe_id": sid("api")}}
    full = {"outbound": {"listen": "127.0.0.1:1", "upstreams": ups, **outbound}, **top}
    return await start_node(nursery, tmp, mesh.ca, "web", mesh.app_port, [], ups, **full)


async def _curl(out_port: int, url: str, pem: Path) -> trio.CompletedProcess:
    return await trio.run_process(
        ["curl", "-sS", "-p", "-x", f"http://127.0.0.1:{out_port}", "--cacert", str(pem),
         "--max-time", "20", "-w", "\n%{http_connect}", url],
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip


async def _connect(port: int, target: str) -> tuple[trio.SocketStream, bytes]:
    s = await trio.open_tcp_stream("127.0.0.1", port)
    await s.send_all(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    buf = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in buf or (b"Content-Length" in buf and not buf.endswith(b"\n")):
            data = await s.receive_some(65536)
            if not data:
                break
            buf += data
    return s, buf


async def test_curl_through_the_tunnel(tmp_path: Path, nursery: trio.Nursery, mesh: Mesh) -> None:
    port, pem = await _https_server(nursery, tmp_path)
    node = await _node(
        nursery, tmp_path, mesh, outbound={"egress": "allow", "connect_ports": [port]}
    )
    counts, closed, ends = node.outbound.upgrades, trio.Event(), []

    class Seen:  # the metrics' observer, and an event when the tunnel's relay ends
        def upgrade_opened(self, protocol: str) -> None:
            counts.upgrade_opened(protocol)

        def upgrade_closed(self, protocol: str, up: int, down: int, end: str) -> None:
            counts.upgrade_closed(protocol, up, down, end)
            ends.append(end)
            closed.set()

    node.outbound.upgrades = Seen()  # type: ignore[assignment]
    r = await _curl(node.outbound_port, f"https://localhost:{port}/x", pem)
    assert r.returncode == 0, r.stderr
    body, connect = r.stdout.decode().rsplit("\n", 1)
    assert body == "hello through the tunnel" and connect == "200"
    with trio.fail_after(10):
        await closed.wait()
    # ended by a peer's close; the TLS peers' close races may turn up as a reset (_error)
    assert ends[0].startswith(("upstream_", "client_")), ends
    metric = node.outbound.metrics.upgraded.labels("outbound", "connect", ends[0])
    assert metric._value.get() == 1


async def test_deny_default_refuses_naming_the_setting(
    tmp_path: Path, nursery: trio.Nursery, mesh: Mesh
) -> None:
    s, buf = await _connect(mesh.client.outbound_port, "localhost:443")
    await s.aclose()
    assert buf.startswith(b"HTTP/1.1 403") and b"outbound.egress is deny" in buf


async def test_port_not_allowed_and_mesh_name_refused(
    tmp_path: Path, nursery: trio.Nursery, mesh: Mesh
) -> None:
    node = await _node(nursery, tmp_path, mesh, outbound={"egress": "allow"})
    s, buf = await _connect(node.outbound_port, "localhost:8443")
    await s.aclose()
    assert buf.startswith(b"HTTP/1.1 403") and b"outbound.connect_ports (443)" in buf
    s, buf = await _connect(node.outbound_port, "api:443")
    await s.aclose()
    assert buf.startswith(b"HTTP/1.1 403") and b"mesh upstream 'api'" in buf
    assert b"plain http://" in buf


async def test_idle_timeout_closes_a_silent_tunnel(
    tmp_path: Path, nursery: trio.Nursery, mesh: Mesh
) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await stream.receive_some(1)  # until the sidecar closes it

    listeners = await nursery.start(trio.serve_tcp, silent, 0)
    port = listeners[0].socket.getsockname()[1]
    node = await _node(
        nursery,
        tmp_path,
        mesh,
        outbound={"egress": "allow", "connect_ports": [port]},
        timeouts={"upgraded_idle_seconds": 0.3},
    )
    s, buf = await _connect(node.outbound_port, f"127.0.0.1:{port}")
    assert buf == b"HTTP/1.1 200 Connection established\r\n\r\n"
    with trio.fail_after(15):
        assert await s.receive_some(100) == b""  # the sidecar closed the idle tunnel
    await s.aclose()
    ended = node.outbound.metrics.upgraded.labels("outbound", "connect", "idle_timeout")
    assert ended._value.get() == 1


def test_connect_ports_checked(tmp_path: Path) -> None:
    from meshcar.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        make_cfg(
            tmp_path, "web", 1, [], {}, outbound={"listen": "127.0.0.1:1", "connect_ports": [0]}
        )
    assert "outbound.connect_ports" in str(exc.value)


async def test_via_egress_proxy_forwards_the_connect(
    tmp_path: Path, nursery: trio.Nursery, mesh: Mesh
) -> None:
    seen: list[bytes] = []

    async def proxy(stream: trio.SocketStream) -> None:  # stands in for Squid: 200, then echo
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some(65536)
        seen.append(buf.split(b"\r\n", 1)[0])
        await stream.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        while data := await stream.receive_some(65536):
            await stream.send_all(data)

    listeners = await nursery.start(trio.serve_tcp, proxy, 0)
    port = listeners[0].socket.getsockname()[1]
    node = await _node(
        nursery,
        tmp_path,
        mesh,
        outbound={"egress": "allow", "egress_proxy": f"127.0.0.1:{port}"},
    )
    s, buf = await _connect(node.outbound_port, "outside.example:443")
    assert buf == b"HTTP/1.1 200 Connection established\r\n\r\n"
    await s.send_all(b"ping")
    with trio.fail_after(10):
        assert await s.receive_some(100) == b"ping"
    await s.aclose()
    assert seen == [b"CONNECT outside.example:443 HTTP/1.1"]
