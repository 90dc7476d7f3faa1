"""The one mTLS dialer (meshcar/common/mtls.py) against a real TLS 1.3 mTLS server on
loopback: a peer with the wrong SPIFFE ID is refused before any request, a second dial with
the same client context resumes the first one's session, and a credential swap (a new
context) makes the next dial a full handshake instead of offering the old session."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio

from meshcar.admin.metrics import Metrics
from meshcar.common.mtls import MeshPeer, MTLSDialer
from meshcar.errors import UpstreamError
from meshcar.net.tls_memory_bio import TLSStream
from meshcar.tls.store import CredentialStore
from tests.support.pki import ThrowawayCA
from tests.support.ports import free_port

SERVER_ID = "spiffe://test/api"


async def _serve(store: CredentialStore, accepted: list[str], tcp: trio.SocketStream) -> None:
    """Handshake with the mesh server context, send one byte (the session tickets go with it),
    wait for the client to close."""
    tls = TLSStream(tcp, store.server_context(), server_side=True)
    try:
        await tls.do_handshake()
        accepted.append("resumed" if tls.session_reused else "full")
        await tls.send_all(b"x")
        while await tls.receive_some(1024):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(tls)


async def _setup(
    tmp_path: Path, nursery: trio.Nursery
) -> tuple[ThrowawayCA, CredentialStore, int, list[str]]:
    ca = ThrowawayCA.create()
    server = CredentialStore(tmp_path / "server")
    server.install(ca.credential(SERVER_ID))
    client = CredentialStore(tmp_path / "client")
    client.install(ca.credential("spiffe://test/web"))
    accepted: list[str] = []
    listeners = await nursery.start(
        partial(trio.serve_tcp, lambda s: _serve(server, accepted, s), 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    return ca, client, port, accepted


def _count(metrics: Metrics, result: str) -> float:
    return metrics.handshakes.labels("test", result)._value.get()


async def _dial_and_release(dialer: MTLSDialer, peer: MeshPeer) -> TLSStream:
    p = await dialer.dial("k", peer)
    stream = p.conn.stream
    assert isinstance(stream, TLSStream)
    assert await stream.receive_some(16) == b"x"  # the session ticket has arrived by now
    dialer.remember_session(p)
    await stream.aclose()
    return stream


async def test_wrong_peer_id_is_refused_with_502(tmp_path: Path, nursery: trio.Nursery) -> None:
    _, client, port, accepted = await _setup(tmp_path, nursery)
    metrics = Metrics()
    dialer = MTLSDialer(client, metrics, "test")
    peer = MeshPeer("127.0.0.1", port, "spiffe://test/payments", "payments", f"127.0.0.1:{port}")
    with pytest.raises(UpstreamError) as err:
        await dialer.dial("k", peer)
    assert err.value.status == 502
    assert f"is {SERVER_ID}, expected spiffe://test/payments" in str(err.value)
    assert accepted == ["full"]  # the handshake happened; the connection was then refused
    assert metrics.pool_connections.labels("payments")._value.get() == 0  # never handed out


async def test_session_resumed_with_one_context_not_across_a_swap(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    ca, client, port, accepted = await _setup(tmp_path, nursery)
    metrics = Metrics()
    dialer = MTLSDialer(client, metrics, "test")
    peer = MeshPeer("127.0.0.1", port, SERVER_ID, "api", f"127.0.0.1:{port}")

    first = await _dial_and_release(dialer, peer)
    second = await _dial_and_release(dialer, peer)
    assert (first.session_reused, second.session_reused) == (False, True)
    assert first.context is second.context

    client.install(ca.credential("spiffe://test/web"))  # renewal: a new client context
    third = await _dial_and_release(dialer, peer)
    assert third.context is not first.context
    assert not third.session_reused  # the old context's session was not offered
    fourth = await _dial_and_release(dialer, peer)
    assert fourth.session_reused  # the new context's own session is

    assert (_count(metrics, "full"), _count(metrics, "resumed"), _count(metrics, "failure")) == (
        2,
        2,
        0,
    )
    assert metrics.pool_connections.labels("api")._value.get() == 4
    await wait_accepted(accepted, 4)
    assert accepted == ["full", "resumed", "full", "resumed"]


async def test_nothing_listening_is_503_and_counted(tmp_path: Path) -> None:
    client = CredentialStore(tmp_path / "client")
    client.install(ThrowawayCA.create().credential("spiffe://test/web"))
    metrics = Metrics()
    dialer = MTLSDialer(client, metrics, "test", connect_timeout=2.0)
    port = free_port()  # handed out once, nothing binds it
    peer = MeshPeer("127.0.0.1", port, SERVER_ID, "api", f"127.0.0.1:{port}")
    with pytest.raises(UpstreamError) as err:
        await dialer.dial("k", peer)
    assert err.value.status == 503  # net/connect.py: connection refused
    assert _count(metrics, "failure") == 1


async def wait_accepted(accepted: list[str], n: int) -> None:
    with trio.fail_after(10):
        while len(accepted) < n:
            await trio.sleep(0.01)
