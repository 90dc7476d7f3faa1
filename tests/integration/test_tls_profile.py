"""Key-exchange groups and cipher choice on every TLS context meshcar builds (issue 10 item 9).

Each listener kind runs for real on loopback (the edge's public listener, the sidecar's mesh
inbound, the CA API, the admission webhook, the demo's partner endpoint) and is probed with
`openssl s_client`: X448 or P-521 as the only offered group is refused, X25519, P-256 and
P-384 each complete. The client contexts (mesh dialer, bridge dialer, CA client) are checked
against servers that accept one group at a time. The edge uses the client's cipher order.
"""

from __future__ import annotations

import ssl
import threading
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme
from meshcar_ca.api import CAServer, Limits
from meshcar_ca.auth import Authenticator
from meshcar_ca.files import create_ca
from meshcar_ca.issuer import BuiltinIssuer
from meshcar_ca.sign import SignService
from meshcar_ca.store import Store
from meshcar_ca.tls import server_context as ca_server_context

import meshcar_tlsprofile as profile
from meshcar.demo.app import build_tls
from meshcar.edge.listener import public_server_context
from meshcar.identity.caclient import CAClient
from meshcar.inject.patch import InjectOptions
from meshcar.inject.webhook import serve_webhook, server_ssl_context
from meshcar.tls.contexts import mesh_client_context, mesh_server_context
from tests.integration.conftest import sid, start_node
from tests.integration.edge_fixtures import start_edge, terminate_route
from tests.support.echo_app import serve_echo
from tests.support.pki import ThrowawayCA

REFUSED = [("-groups", "X448"), ("-curves", "secp521r1"), ("-groups", "X448:P-521")]
ALLOWED = ["X25519", "P-256", "P-384"]


async def s_client(port: int, *args: str, servername: str = "www.test") -> tuple[int, str]:
    r = await trio.run_process(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", servername, *args],
        stdin=b"",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return r.returncode, r.stdout.decode() + r.stderr.decode()


def negotiated(out: str) -> bool:
    return "Cipher is (NONE)" not in out and ("New, TLSv1.3" in out or "New, TLSv1.2" in out)


TEMP_KEY = {"X25519": "X25519", "P-256": "prime256v1", "P-384": "secp384r1"}


def temp_key(out: str) -> str | None:
    for name in ("X25519", "X448", "prime256v1", "secp384r1", "secp521r1"):
        if f"Server Temp Key: {name}" in out or f"Server Temp Key: ECDH, {name}" in out:
            return name
    return None


async def check_groups(
    port: int, *extra: str, versions: tuple[str, ...] = ("-tls1_2", "-tls1_3")
) -> None:
    """A refused group alone fails; offered first before P-256, P-256 is what is agreed (the
    server follows the client's order, so an allowed X448 would have been taken). Each
    allowed group, offered first, is the one agreed. (P-256 is always in the TLS 1.2 offers:
    an ECDSA P-256 certificate needs it there.)"""
    for version in versions:
        for flag, group in REFUSED:
            _, out = await s_client(port, version, flag, group, *extra)
            assert not negotiated(out), (version, group, out)
            _, out = await s_client(port, version, flag, group + ":prime256v1", *extra)
            assert negotiated(out) and temp_key(out) == "prime256v1", (version, group, out)
        for group in ALLOWED:
            offer = group if group == "P-256" else group + ":P-256"
            _, out = await s_client(port, version, "-groups", offer, *extra)
            assert negotiated(out) and temp_key(out) == TEMP_KEY[group], (version, group, out)


@pytest.fixture
def site(tmp_path: Path) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    ca.issue_cert("www.test", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "site.pem")
    )
    return ca, tmp_path / "site.pem"


async def serve_context(nursery: trio.Nursery, ctx: ssl.SSLContext) -> int:
    """A TLS server on loopback that completes handshakes with `ctx` and closes."""

    async def handler(stream: trio.SSLStream) -> None:
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError):
            return
        await trio.aclose_forcefully(stream)

    listeners = await nursery.start(
        partial(trio.serve_ssl_over_tcp, handler, 0, ctx, host="127.0.0.1")
    )
    return listeners[0].transport_listener.socket.getsockname()[1]


async def test_edge_public_listener_offers_only_the_profile_groups(
    tmp_path: Path, site: tuple[trustme.CA, Path], nursery: trio.Nursery
) -> None:
    echo = await serve_echo(nursery)
    edge = await start_edge(nursery, tmp_path, [terminate_route("www.test", echo)])
    await check_groups(edge.https)
    await edge.aclose()


async def test_edge_uses_the_clients_cipher_order(
    tmp_path: Path, site: tuple[trustme.CA, Path], nursery: trio.Nursery
) -> None:
    echo = await serve_echo(nursery)
    edge = await start_edge(nursery, tmp_path, [terminate_route("www.test", echo)])
    for first, second in (
        ("ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-ECDSA-AES128-GCM-SHA256"),
        ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"),
    ):
        _, out = await s_client(edge.https, "-tls1_2", "-cipher", f"{first}:{second}")
        assert f"Cipher is {first}" in out, out
    for first, second in (
        ("TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_256_GCM_SHA384"),
        ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"),
    ):
        _, out = await s_client(edge.https, "-tls1_3", "-ciphersuites", f"{first}:{second}")
        assert f"Cipher is {first}" in out, out
    ctx = public_server_context(edge.cfg.routes[0])
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    await edge.aclose()


async def test_mesh_inbound_offers_only_the_profile_groups(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    ca = ThrowawayCA.create()
    app = await serve_echo(nursery)
    node = await start_node(nursery, tmp_path, ca, "api", app, [sid("web")], {})
    chain, key = ca.leaf([sid("web")])
    (tmp_path / "web.pem").write_text(chain + key)
    client = ("-cert", str(tmp_path / "web.pem"), "-key", str(tmp_path / "web.pem"))
    await check_groups(node.inbound_port, *client, versions=("-tls1_3",))
    # without a client certificate the handshake parameters are the same: still refused
    _, out = await s_client(node.inbound_port, "-groups", "X448")
    assert not negotiated(out), out
    await node.inbound.aclose()


async def test_ca_api_offers_only_the_profile_groups(tmp_path: Path, nursery: trio.Nursery) -> None:
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
    await check_groups(listeners[0].socket.getsockname()[1])


async def test_webhook_offers_only_the_profile_groups(
    site: tuple[trustme.CA, Path], nursery: trio.Nursery
) -> None:
    _, pem = site
    ctx = server_ssl_context(str(pem), str(pem))
    listeners = await nursery.start(serve_webhook, InjectOptions(), ctx, "127.0.0.1", 0)
    await check_groups(listeners[0].socket.getsockname()[1])


async def test_demo_partner_endpoint_offers_only_the_profile_groups(
    tmp_path: Path, site: tuple[trustme.CA, Path], nursery: trio.Nursery
) -> None:
    ca, pem = site
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("partner").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "partner.pem")
    )
    port = await serve_context(nursery, build_tls(str(pem), str(pem), str(tmp_path / "ca.pem")))
    partner = str(tmp_path / "partner.pem")
    await check_groups(port, "-cert", partner, "-key", partner)


# --- client contexts -------------------------------------------------------------------------------


def handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> str | None:
    """A real OpenSSL handshake over a loopback socket pair; the server's error or None."""
    import socket

    a, b = socket.socketpair()
    errors: list[str] = []

    def serve() -> None:
        try:
            with server.wrap_socket(b, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(str(exc))

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client.wrap_socket(
            a, server_hostname=None if not client.check_hostname else "www.test"
        ) as c:
            c.close()
    except (ssl.SSLError, OSError) as exc:
        errors.append(str(exc))
    finally:
        a.close()
        t.join(10)
    return errors[0] if errors else None


def server_with_groups(pem: Path, groups: str, bundle: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pem))
    if bundle:
        ctx.load_verify_locations(cadata=bundle)
        ctx.verify_mode = ssl.CERT_REQUIRED
    assert profile.set_groups_list(ctx, groups)
    return ctx


@pytest.mark.parametrize("who", ["mesh", "caclient"])
def test_client_contexts_offer_only_the_profile_groups(tmp_path: Path, who: str) -> None:
    ca = ThrowawayCA.create()
    chain, key = ca.leaf([sid("web")], dns=["www.test"])
    (tmp_path / "chain.pem").write_text(chain)
    (tmp_path / "key.pem").write_text(key)
    (tmp_path / "both.pem").write_text(chain + key)
    (tmp_path / "bundle.pem").write_text(ca.bundle_pem)
    if who == "mesh":
        client = mesh_client_context(tmp_path / "chain.pem", tmp_path / "key.pem", ca.bundle_pem)
    else:
        client = CAClient("https://www.test", tmp_path / "bundle.pem")._ssl(None, None)
    bundle = ca.bundle_pem if who == "mesh" else None
    for bad in ("X448", "P-521", "ffdhe2048"):
        assert (
            handshake(client, server_with_groups(tmp_path / "both.pem", bad, bundle)) is not None
        ), bad
    for good in ALLOWED:
        assert handshake(client, server_with_groups(tmp_path / "both.pem", good, bundle)) is None, (
            good
        )


def test_meshcar_and_the_ca_apply_the_one_shared_profile(tmp_path: Path) -> None:
    import meshcar_ca.tls

    import meshcar.tls.contexts

    # one module, not two copies that could drift apart (issue 11)
    assert meshcar_ca.tls.apply_profile is profile.apply_profile
    assert meshcar.tls.contexts.apply_profile is profile.apply_profile
    ca = ThrowawayCA.create()
    chain, key = ca.leaf([sid("api")])
    (tmp_path / "chain.pem").write_text(chain)
    (tmp_path / "key.pem").write_text(key)
    ctx = mesh_server_context(tmp_path / "chain.pem", tmp_path / "key.pem", ca.bundle_pem)
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    # the pointer check: a context's SSL_CTX options read through ctypes equal ctx.options
    lib = profile._libssl()
    assert lib is not None and profile._ssl_ctx_pointer(lib, ctx) is not None
    # OpenSSL refuses an unknown group list: reported, never half-applied
    assert not profile.set_groups_list(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), "no-such-group")
