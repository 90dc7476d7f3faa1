"""The CA API client (identity/caclient.py over identity/httpsclient.py) against real servers.

The built-in CA runs in-process on loopback (its real HTTPS API): bootstrap with a join
token, renewal over mTLS with the issued certificate, the bundle. Small trio TLS servers
(certificates from trustme, requests read with h11 as an independent parser) stand in for
a CA that refuses, answers too much, closes early or never answers.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import h11
import pytest
import trio
import trustme
from meshcar_ca.api import CAServer, Limits
from meshcar_ca.auth import Authenticator, mint_token
from meshcar_ca.files import create_ca
from meshcar_ca.issuer import BuiltinIssuer
from meshcar_ca.sign import SignService
from meshcar_ca.store import Store
from meshcar_ca.tls import server_context as ca_server_context

from meshcar.identity.caclient import CAClient, CAError
from meshcar.tls.store import CredentialStore

SID = "spiffe://meshcar.test/ns/default/sa/web"


async def _builtin_ca(tmp_path: Path, nursery: trio.Nursery) -> tuple[CAClient, str]:
    paths = create_ca(tmp_path / "ca", "meshcar.test", 86400, datetime.now(UTC))
    issuer = BuiltinIssuer.load(paths.dir)
    store = Store(paths.db)
    server = CAServer(
        SignService(issuer, Authenticator(store, issuer, None), store),
        ca_server_context(paths),
        Limits(handshake_timeout=5, idle_timeout=5, request_timeout=5),
        log=lambda _: None,
    )
    listeners = await nursery.start(server.serve, "127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    token = mint_token(store, "meshcar.test", SID, 600, 1, int(time.time()))
    return CAClient(f"https://127.0.0.1:{port}", paths.root_pem), token


async def test_bootstrap_renew_and_bundle_against_the_builtin_ca(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    client, token = await _builtin_ca(tmp_path, nursery)
    cred = await client.sign(SID, token=token, ttl_seconds=3600)
    assert cred.spiffe_id == SID and "BEGIN CERTIFICATE" in cred.chain_pem
    assert "BEGIN CERTIFICATE" in cred.bundle_pem
    store = CredentialStore(tmp_path / "state")
    store.install(cred)
    # renewal: no token, the issued certificate is the client certificate (mTLS)
    renewed = await client.sign(
        SID, chain_file=store.chain_file, key_file=store.key_file, trust_pem=cred.bundle_pem
    )
    assert renewed.serial_hex != cred.serial_hex
    bundle, version = await client.bundle(trust_pem=cred.bundle_pem)
    assert bundle == cred.bundle_pem and version == cred.bundle_version
    # the token had one use: the CA refuses it again, and that is not retryable
    with pytest.raises(CAError) as err:
        await client.sign(SID, token=token)
    assert not err.value.retryable and "CA refused: 40" in str(err.value)


# --- stand-in servers --------------------------------------------------------------------------

Handler = Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[None]]


@pytest.fixture
def pki(tmp_path: Path) -> tuple[trustme.CA, Path, ssl.SSLContext]:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "root.pem"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    return ca, tmp_path / "root.pem", server


async def _serve(nursery: trio.Nursery, ctx: ssl.SSLContext, handler: Handler) -> int:
    async def one(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, ctx, server_side=True, https_compatible=True)
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(partial(trio.serve_tcp, one, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


StandIn = Callable[..., Awaitable[CAClient]]


@pytest.fixture
async def stand_in(pki: tuple[trustme.CA, Path, ssl.SSLContext], nursery: trio.Nursery) -> StandIn:
    """Serves a handler as a stand-in CA (TLS with the pki's server certificate); a CAClient
    for it that trusts the pki's root, or `root` if given, with CAClient's other options."""
    _, pki_root, server = pki

    async def start(handler: Handler, root: Path | None = None, **client: float) -> CAClient:
        port = await _serve(nursery, server, handler)
        return CAClient(f"https://127.0.0.1:{port}", root or pki_root, **client)

    return start


async def _read_request(stream: trio.SSLStream) -> tuple[h11.Request, bytes]:
    conn = h11.Connection(h11.SERVER)
    req, body = None, b""
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(ev, h11.ConnectionClosed):  # else next_event() spins, never yielding
            raise trio.BrokenResourceError("the client closed before a full request")
        elif isinstance(ev, h11.Request):
            req = ev
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            assert req is not None
            return req, body


def _answer(status: int, body: bytes, *, chunked: bool = False, **headers: str) -> bytes:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    hs = [(k.replace("_", "-"), v) for k, v in headers.items()]
    hs.append(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(body))))
    out = conn.send(h11.Response(status_code=status, headers=hs)) or b""
    if chunked:
        for i in range(0, len(body), 7):
            out += conn.send(h11.Data(data=body[i : i + 7])) or b""
    else:
        out += conn.send(h11.Data(data=body)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")


async def test_sign_sends_json_with_the_token_and_reads_a_chunked_answer(
    pki: tuple[trustme.CA, Path, ssl.SSLContext], nursery: trio.Nursery
) -> None:
    _, root, server = pki
    seen: list[tuple[h11.Request, bytes]] = []

    async def handler(stream: trio.SSLStream) -> None:
        req, body = await _read_request(stream)
        seen.append((req, body))
        answer = {"chain": "C", "bundle": "B", "spiffe_id": SID, "bundle_version": 3}
        await stream.send_all(_answer(200, json.dumps(answer).encode(), chunked=True))

    port = await _serve(nursery, server, handler)
    cred = await CAClient(f"https://127.0.0.1:{port}/", root).sign(SID, token="tok")
    assert (cred.chain_pem, cred.bundle_pem, cred.bundle_version) == ("C", "B", 3)
    req, body = seen[0]
    assert req.method == b"POST" and req.target == b"/v1/sign"
    headers = dict(req.headers)
    assert headers[b"host"] == f"127.0.0.1:{port}".encode()
    assert headers[b"content-type"] == b"application/json"
    sent = json.loads(body)
    assert sent["token"] == "tok" and "BEGIN CERTIFICATE REQUEST" in sent["csr"]


@pytest.mark.parametrize(("status", "retryable"), [(403, False), (429, True), (503, True)])
async def test_a_refusal_carries_the_status_and_message(
    stand_in: StandIn,
    status: int,
    retryable: bool,
) -> None:

    async def handler(stream: trio.SSLStream) -> None:
        await _read_request(stream)
        await stream.send_all(_answer(status, b'{"message": "no such token"}'))

    client = await stand_in(handler)
    with pytest.raises(CAError) as err:
        await client.sign(SID, token="tok")
    assert str(err.value) == f"CA refused: {status} no such token"
    assert err.value.retryable is retryable


async def test_bundle_reads_text_and_version_header(
    stand_in: StandIn,
) -> None:

    async def handler(stream: trio.SSLStream) -> None:
        req, _ = await _read_request(stream)
        assert req.method == b"GET" and req.target == b"/v1/bundle"
        await stream.send_all(_answer(200, b"PEM", X_Meshcar_Bundle_Version="7"))

    client = await stand_in(handler)
    assert await client.bundle() == ("PEM", 7)


async def _unreachable(client: CAClient) -> str:
    with pytest.raises(CAError) as err:
        await client.sign(SID, token="tok")
    assert err.value.retryable
    assert str(err.value).startswith("CA unreachable")
    return str(err.value)


async def test_a_close_before_the_full_answer_is_unreachable_and_retryable(
    stand_in: StandIn,
) -> None:

    async def handler(stream: trio.SSLStream) -> None:
        await _read_request(stream)
        await stream.send_all(_answer(200, b'{"chain": "C"}')[:-5])

    msg = await _unreachable(await stand_in(handler))
    assert "closed the connection before a full response" in msg


async def test_a_body_over_the_bound_is_refused(
    stand_in: StandIn,
) -> None:

    async def handler(stream: trio.SSLStream) -> None:
        await _read_request(stream)
        await stream.send_all(_answer(200, b"x" * ((1 << 20) + 1)))

    msg = await _unreachable(await stand_in(handler))
    assert "larger than" in msg


async def test_a_silent_ca_times_out(
    stand_in: StandIn,
) -> None:
    answered = trio.Event()

    async def handler(stream: trio.SSLStream) -> None:
        await _read_request(stream)
        await answered.wait()  # never set: the client's deadline ends the exchange

    msg = await _unreachable(await stand_in(handler, timeout=0.5))
    assert "within 0.5 s" in msg


async def test_a_ca_certificate_from_another_root_is_unreachable(
    tmp_path: Path, stand_in: StandIn
) -> None:
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other.pem"))

    async def handler(stream: trio.SSLStream) -> None:
        await _read_request(stream)

    msg = await _unreachable(await stand_in(handler, tmp_path / "other.pem"))
    assert "CERTIFICATE_VERIFY_FAILED" in msg or "certificate verify failed" in msg


async def test_nothing_listening_is_unreachable(
    pki: tuple[trustme.CA, Path, ssl.SSLContext],
) -> None:
    s = trio.socket.socket()
    await s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # bound, never listening: connections are refused
    try:
        await _unreachable(CAClient(f"https://127.0.0.1:{port}", pki[1]))
    finally:
        s.close()
