"""Opaque TCP through an in-process sidecar pair (real mTLS on loopback): a server that speaks
first, half-close both ways, the allow list enforced before the app is dialed, a port that
is not an `inbound.tcp` port refused, PROXY v2 with the caller's SPIFFE ID in TLV 0xE0, and
the idle timeout. The PostgreSQL / MariaDB acceptance runs are in tests/e2e/test_tcp_e2e.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from meshcar.admin.metrics import Metrics
from meshcar.common import accesslog
from meshcar.proto.proxy_protocol import Incomplete, ProxyHeader, parse_proxy_header
from meshcar.sidecar.config import parse_config
from meshcar.sidecar.inbound import Inbound
from meshcar.sidecar.outbound import Outbound
from meshcar.sidecar.tcp import TLV_SPIFFE_ID
from meshcar.tls.store import CredentialStore
from tests.integration.conftest import sid
from tests.support.pki import ThrowawayCA


@dataclass
class Node:
    metrics: Metrics
    inbound: Inbound
    outbound: Outbound
    inbound_port: int


async def _serve(nursery: trio.Nursery, handler) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def node(
    nursery: trio.Nursery,
    tmp: Path,
    ca: ThrowawayCA,
    name: str,
    *,
    allow: list[str] = (),  # type: ignore[assignment]
    tcp: list[dict] = (),  # type: ignore[assignment]
    upstreams: dict | None = None,
    policies: list[dict] | None = None,
) -> Node:
    cfg = parse_config(
        {
            "identity": {
                "spiffe_id": sid(name),
                "ca_url": "https://127.0.0.1:1",
                "ca_bundle": "x",
                "state_dir": str(tmp / name),
            },
            "app": {"port": 1},
            "inbound": {
                "listen": "127.0.0.1:1",
                "allow": list(allow),
                "tcp": list(tcp),
                **({"policies": policies} if policies else {}),
            },
            "outbound": {"upstreams": upstreams or {}},
            "admin": {"listen": "127.0.0.1:1"},
        },
        "test.yaml",
        tmp,
    )
    store = CredentialStore(cfg.identity.state_dir)
    store.install(ca.credential(sid(name)))
    metrics = Metrics()
    n = Node(metrics, Inbound(cfg, store, metrics), Outbound(cfg, store, metrics), 0)
    n.inbound_port = await _serve(nursery, n.inbound.handle_connection)
    return n


async def tunnel_port(nursery: trio.Nursery, n: Node, upstream: str) -> int:
    """The local listener of a tcp upstream (main.py binds local_port the same way)."""
    return await _serve(nursery, partial(n.outbound.handle_connection, fixed=upstream))


def tcp_upstream(server: Node, target_port: int, **more: object) -> dict:
    return {
        "endpoints": [f"127.0.0.1:{server.inbound_port}"],
        "spiffe_id": sid("db"),
        "protocol": "tcp",
        "local_port": 1,
        "target_port": target_port,
        **more,
    }


@dataclass
class Tunnel:
    db: Node  # allows web; the app's port is one of its inbound.tcp ports
    caller: Node  # has the tcp upstream "db"
    port: int  # the caller's local listener for "db"


async def tunnel(
    nursery: trio.Nursery,
    tmp: Path,
    ca: ThrowawayCA,
    app_port: int,
    *,
    caller: str = "web",
    target_port: int | None = None,
    tcp: dict | None = None,
    upstream: dict | None = None,
    policies: list[dict] | None = None,
) -> Tunnel:
    """ "db" in front of the TCP app on app_port (its inbound.tcp entry with `tcp`'s options),
    and `caller` with a tcp upstream "db" to target_port (app_port unless given), with
    `upstream`'s options; the caller's tunnel listener bound."""
    db = await node(
        nursery,
        tmp,
        ca,
        "db",
        allow=[sid("web")],
        tcp=[{"port": app_port, **(tcp or {})}],
        policies=policies,
    )
    up = tcp_upstream(db, target_port or app_port, **(upstream or {}))
    c = await node(nursery, tmp, ca, caller, upstreams={"db": up})
    return Tunnel(db, c, await tunnel_port(nursery, c, "db"))


async def greeter(stream: trio.SocketStream) -> None:
    """Speaks first; echoes upper-cased; on the client's FIN says bye and closes."""
    await stream.send_all(b"220 greeter ready\r\n")
    while data := await stream.receive_some(65536):
        await stream.send_all(data.upper())
    await stream.send_all(b"221 bye\r\n")
    await stream.aclose()


async def read_until(stream: trio.SocketStream, marker: bytes) -> bytes:
    buf = b""
    while marker not in buf:
        data = await stream.receive_some(65536)
        if not data:
            raise AssertionError(f"EOF before {marker!r}; got {buf!r}")
        buf += data
    return buf


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    buf = b""
    while data := await stream.receive_some(65536):
        buf += data
    return buf


def metric(n: Node, name: str, **labels: str) -> float:
    return n.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def ca() -> ThrowawayCA:
    return ThrowawayCA.create()


async def test_server_speaks_first_and_half_close(tmp_path, nursery, ca, capsys) -> None:
    app_port = await _serve(nursery, greeter)
    t = await tunnel(nursery, tmp_path, ca, app_port)
    db, web = t.db, t.caller

    client = await trio.open_tcp_stream("127.0.0.1", t.port)
    assert await read_until(client, b"\r\n") == b"220 greeter ready\r\n"  # before we sent
    big = b"x" * 3_000_000
    async with trio.open_nursery() as n:
        n.start_soon(client.send_all, big)
        got = await read_until(client, b"X" * 1000)
        while len(got) < len(big):
            got += await client.receive_some(1 << 20)
    assert got == big.upper()
    await client.send_eof()  # our FIN crosses as close_notify, then a FIN to the app
    assert await read_to_eof(client) == b"221 bye\r\n"  # and the app's answer after it
    await client.aclose()

    with trio.fail_after(5):  # the tunnel's end is logged and counted on both sides
        while metric(db, "meshcar_tcp_connections_total", direction="inbound",
                     target=str(app_port), result="closed") < 1 or metric(
            web, "meshcar_tcp_connections_total", direction="outbound", target="db",
            result="closed") < 1:  # fmt: skip
            await trio.sleep(0.01)
    assert metric(
        web, "meshcar_tcp_bytes_total", direction="outbound", target="db", way="up"
    ) == len(big)
    assert metric(
        db, "meshcar_tcp_bytes_total", direction="inbound", target=str(app_port), way="down"
    ) == len(b"220 greeter ready\r\n") + len(big) + len(b"221 bye\r\n")
    accesslog.flush()
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if '"tcp"' in x]
    ends = {(x["direction"], x["event"]) for x in lines}
    assert ("inbound", "closed") in ends and ("outbound", "closed") in ends, lines
    inbound = next(x for x in lines if x["direction"] == "inbound")
    assert inbound["peer"] == sid("web") and inbound["bytes_in"] == len(big)


async def test_caller_not_on_allow_list_is_refused_before_the_app(
    tmp_path, nursery, ca, capsys
) -> None:
    dialed = []

    async def app(stream: trio.SocketStream) -> None:
        dialed.append(1)
        await greeter(stream)

    app_port = await _serve(nursery, app)
    t = await tunnel(nursery, tmp_path, ca, app_port, caller="evil")
    db = t.db
    client = await trio.open_tcp_stream("127.0.0.1", t.port)
    with trio.fail_after(5):
        assert await read_to_eof(client) == b""  # closed: no greeting
    await client.aclose()
    assert dialed == []
    assert metric(db, "meshcar_authz_denials_total", peer=sid("evil")) == 1
    assert (
        metric(db, "meshcar_tcp_connections_total", direction="inbound", target="-",
               result="denied") == 1
    )  # fmt: skip
    accesslog.flush()
    out = capsys.readouterr().out
    denied = [json.loads(x) for x in out.splitlines() if '"denied"' in x]
    assert denied and "is not allowed to call" in denied[0]["error"], out


async def test_port_not_listed_is_refused(tmp_path, nursery, ca) -> None:
    app_port = await _serve(nursery, greeter)
    other_port = await _serve(nursery, greeter)
    t = await tunnel(nursery, tmp_path, ca, app_port, target_port=other_port)
    db = t.db
    client = await trio.open_tcp_stream("127.0.0.1", t.port)
    with trio.fail_after(5):
        assert await read_to_eof(client) == b""
    await client.aclose()
    assert (
        metric(db, "meshcar_tcp_connections_total", direction="inbound", target="-",
               result="unknown_port") == 1
    )  # fmt: skip


async def test_proxy_v2_carries_the_caller_spiffe_id(tmp_path, nursery, ca) -> None:
    seen: list[ProxyHeader] = []

    async def app(stream: trio.SocketStream) -> None:
        buf = b""
        while True:
            r = parse_proxy_header(buf)
            if not isinstance(r, Incomplete):
                break
            buf += await stream.receive_some(4096)
        assert isinstance(r, ProxyHeader), r
        seen.append(r)
        rest = buf[r.consumed :]
        while b"hello" not in rest:
            rest += await stream.receive_some(4096)
        await stream.send_all(b"id=" + (r.tlv(TLV_SPIFFE_ID) or b"") + b" first=" + rest)
        await stream.aclose()

    app_port = await _serve(nursery, app)
    t = await tunnel(nursery, tmp_path, ca, app_port, tcp={"proxy_protocol": "v2"})
    db = t.db
    client = await trio.open_tcp_stream("127.0.0.1", t.port)
    await client.send_all(b"hello")
    with trio.fail_after(5):
        got = await read_until(client, b"hello")
    await client.aclose()
    assert got == f"id={sid('web')} first=hello".encode()
    h = seen[0]
    assert h.version == 2 and h.src_addr == "127.0.0.1" and h.dst_port == db.inbound_port

    # a caller whose first bytes share the preamble's TLS record: passed on after the PROXY
    # header, and counted as caller bytes (the header is not)
    from meshcar.net.connect import open_tls
    from meshcar.sidecar.tcp import preamble

    store = CredentialStore(tmp_path / "web2")
    store.install(ca.credential(sid("web")))
    tls = await open_tls("127.0.0.1", db.inbound_port, store.tcp_client_context())
    await tls.send_all(preamble(app_port) + b"hello")
    with trio.fail_after(5):
        answer = b""
        while chunk := await tls.receive_some(1024):
            answer += chunk
    await tls.aclose()
    assert answer == f"id={sid('web')} first=hello".encode()
    labels = {"direction": "inbound", "target": str(app_port)}
    with trio.fail_after(5):
        while metric(db, "meshcar_tcp_connections_total", **labels, result="closed") < 2:
            await trio.sleep(0.01)
    assert metric(db, "meshcar_tcp_bytes_total", **labels, way="up") == 2 * len(b"hello")


async def test_idle_tunnel_is_closed(tmp_path, nursery, ca, capsys) -> None:
    app_port = await _serve(nursery, greeter)
    t = await tunnel(
        nursery, tmp_path, ca, app_port, tcp={"idle_seconds": 30}, upstream={"idle_seconds": 0.3}
    )
    web = t.caller
    client = await trio.open_tcp_stream("127.0.0.1", t.port)
    assert await read_until(client, b"\r\n") == b"220 greeter ready\r\n"
    with trio.fail_after(10):  # then silence: the outbound side ends the tunnel
        assert await read_to_eof(client) == b""
        await client.aclose()
        while not metric(web, "meshcar_tcp_connections_total", direction="outbound",
                         target="db", result="idle"):  # fmt: skip
            await trio.sleep(0.01)


async def test_tls_half_close_keeps_records_already_received(tmp_path, ca) -> None:
    """close_notify is sent while the peer's data sits undecrypted in the incoming buffer:
    the data is still read after it, and the peer can send after our EOF (TLS 1.3)."""
    from meshcar.net.tls_memory_bio import TLSStream
    from meshcar.sidecar.tcp import _tls_send_eof

    stores = {}
    for name in ("a", "b"):
        stores[name] = CredentialStore(tmp_path / name)
        stores[name].install(ca.credential(sid(name)))
    s1, s2 = trio.socket.socketpair()
    server = TLSStream(trio.SocketStream(s1), stores["a"].server_context(), server_side=True)
    client = TLSStream(trio.SocketStream(s2), stores["b"].client_context(), server_side=False)
    async with trio.open_nursery() as n:
        n.start_soon(server.do_handshake)
        n.start_soon(client.do_handshake)
    await client.send_all(b"sent before the server's EOF")
    while not server._incoming.pending:  # raw records in, not decrypted yet
        await server._fill()
    await _tls_send_eof(server)
    got = b""
    while len(got) < len(b"sent before the server's EOF"):
        got += await server.receive_some(1024)
    assert got == b"sent before the server's EOF"
    assert await client.receive_some(1024) == b""  # the close_notify
    await client.send_all(b"and after it")
    assert await server.receive_some(1024) == b"and after it"
    await client.aclose()
    await server.aclose()


async def test_peer_without_tcp_alpn_is_refused(tmp_path, nursery, ca, capsys) -> None:
    """A peer that answers TLS with the right identity but does not select meshcar-tcp/1
    (an HTTP-only listener) gets no tunnel: the app's connection is closed."""
    from meshcar.net.tls_memory_bio import TLSStream
    from meshcar.tls.contexts import _common

    store = CredentialStore(tmp_path / "db")
    store.install(ca.credential(sid("db")))
    import ssl

    ctx = _common(
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
        store.chain_file,
        store.key_file,
        ca.bundle_pem,
        ("http/1.1",),
    )
    got: list[bytes] = []
    done = trio.Event()

    async def http_only(tcp: trio.SocketStream) -> None:
        tls = TLSStream(tcp, ctx, server_side=True)
        try:
            await tls.do_handshake()
            got.append(await tls.receive_some(1024))
        except trio.BrokenResourceError:
            got.append(b"")  # closed without close_notify: nothing was sent either
        finally:
            done.set()
            await tls.aclose()

    port = await _serve(nursery, http_only)
    web = await node(
        nursery,
        tmp_path,
        ca,
        "web",
        upstreams={
            "db": {
                "endpoints": [f"127.0.0.1:{port}"],
                "spiffe_id": sid("db"),
                "protocol": "tcp",
                "local_port": 1,
                "target_port": 5432,
            }
        },
    )
    client = await trio.open_tcp_stream("127.0.0.1", await tunnel_port(nursery, web, "db"))
    with trio.fail_after(5):
        assert await read_to_eof(client) == b""
        await done.wait()
    await client.aclose()
    assert got == [b""]  # no preamble was sent to it
    assert (
        metric(web, "meshcar_tcp_connections_total", direction="outbound", target="db",
               result="dial_failed") == 1
    )  # fmt: skip
    accesslog.flush()
    assert "did not select ALPN meshcar-tcp/1" in capsys.readouterr().out


async def test_l7_policies_never_admit_a_tcp_caller(tmp_path, nursery, ca) -> None:
    """An inbound.policies rule naming a caller lets it make HTTP requests, not open a
    tunnel: only inbound.allow admits opaque TCP."""
    app_port = await _serve(nursery, greeter)
    policies = [{"name": "reader", "from": [sid("evil")]}]
    t = await tunnel(nursery, tmp_path, ca, app_port, caller="evil", policies=policies)
    db = t.db
    client = await trio.open_tcp_stream("127.0.0.1", t.port)
    with trio.fail_after(5):
        assert await read_to_eof(client) == b""
    await client.aclose()
    assert metric(db, "meshcar_authz_denials_total", peer=sid("evil")) == 1


async def test_next_tunnel_resumes_the_tls_session(tmp_path, nursery, ca) -> None:
    app_port = await _serve(nursery, greeter)
    t = await tunnel(nursery, tmp_path, ca, app_port)
    web = t.caller
    for n in (1, 2):
        client = await trio.open_tcp_stream("127.0.0.1", t.port)
        assert await read_until(client, b"\r\n") == b"220 greeter ready\r\n"
        await client.send_eof()
        assert await read_to_eof(client) == b"221 bye\r\n"
        await client.aclose()
        with trio.fail_after(5):  # the tunnel has ended (and its session is kept)
            while (
                metric(web, "meshcar_tcp_connections_total", direction="outbound", target="db",
                       result="closed") < n
            ):  # fmt: skip
                await trio.sleep(0.01)
    hs = "meshcar_tls_handshakes_total"
    assert metric(web, hs, direction="outbound", result="full") == 1
    assert metric(web, hs, direction="outbound", result="resumed") == 1
