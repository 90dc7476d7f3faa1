"""`meshcar check`: each check failing, with its exit status and message, and all passing.

Real parts on loopback: the built-in CA's HTTPS API in-process, a peer that completes a real
mTLS handshake with a throwaway PKI's SVID, a stand-in HTTP CA whose Date header is a day
old, a port held by a bound socket. The checks are blocking code, run in a thread while trio
serves the CA and the peers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import json
import re
import socket
import ssl
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme
import yaml
from meshcar_ca.api import CAServer, Limits
from meshcar_ca.auth import Authenticator
from meshcar_ca.files import create_ca
from meshcar_ca.issuer import BuiltinIssuer
from meshcar_ca.sign import SignService
from meshcar_ca.store import Store
from meshcar_ca.tls import server_context as ca_server_context

from meshcar import checkcli
from meshcar.tls.contexts import mesh_server_context
from meshcar.tls.store import CredentialStore
from tests.support.pki import ThrowawayCA
from tests.support.ports import free_ports

TD = "meshcar.test"
ME = f"spiffe://{TD}/svc/web"
PEER = f"spiffe://{TD}/svc/api"


async def _ca(tmp: Path, nursery: trio.Nursery) -> tuple[str, Path]:
    paths = create_ca(tmp / "ca", TD, 86400, dt.datetime.now(dt.UTC))
    issuer = BuiltinIssuer.load(paths.dir)
    store = Store(paths.db)
    server = CAServer(
        SignService(issuer, Authenticator(store, issuer, None), store),
        ca_server_context(paths),
        Limits(handshake_timeout=5, idle_timeout=5, request_timeout=5),
        log=lambda _: None,
    )
    listeners = await nursery.start(server.serve, "127.0.0.1", 0)
    return f"https://127.0.0.1:{listeners[0].socket.getsockname()[1]}", paths.root_pem


async def _peer(tmp: Path, pki: ThrowawayCA, sid: str, nursery: trio.Nursery) -> int:
    """A mesh listener presenting `sid` (requires our client certificate, as inbound does)."""
    d = tmp / ("peer-" + sid.rsplit("/", 1)[1])
    store = CredentialStore(d)
    store.install(pki.credential(sid))
    ctx = mesh_server_context(store.chain_file, store.key_file, pki.bundle_pem)

    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, ctx, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await tls.do_handshake()
            await tls.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


class World:
    def __init__(self, tmp: Path, ca_url: str, ca_bundle: Path, pki: ThrowawayCA, peer: int):
        self.tmp, self.pki = tmp, pki
        self.token = tmp / "token"
        self.token.write_text("t")
        inbound, outbound, admin = free_ports(3)
        self.ports = {"inbound": inbound, "outbound": outbound, "admin": admin}
        self.state = tmp / "state"
        self.data: dict = {
            "identity": {
                "spiffe_id": ME,
                "ca_url": ca_url,
                "ca_bundle": str(ca_bundle),
                "token_file": str(self.token),
                "state_dir": str(self.state),
            },
            "app": {"port": 8080},
            "inbound": {"listen": f"127.0.0.1:{inbound}", "allow": [PEER]},
            "outbound": {
                "listen": f"127.0.0.1:{outbound}",
                "upstreams": {"api": {"endpoints": [f"127.0.0.1:{peer}"], "spiffe_id": PEER}},
            },
            "admin": {"listen": f"127.0.0.1:{admin}"},
        }
        self.hold(pki.credential(ME))

    def hold(self, cred) -> None:
        CredentialStore(self.state).install(cred)

    def write(self) -> Path:
        path = self.tmp / "sidecar.yaml"
        path.write_text(yaml.safe_dump(self.data))
        return path

    async def check(self, *args: str) -> tuple[int, str]:
        path = self.write()

        def run() -> tuple[int, str]:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = checkcli.main([str(path), "--timeout", "5", *args])
            return code, out.getvalue()

        return await trio.to_thread.run_sync(run)


@pytest.fixture
async def world(tmp_path: Path, nursery: trio.Nursery) -> World:
    pki = ThrowawayCA.create()
    ca_url, bundle = await _ca(tmp_path, nursery)
    peer = await _peer(tmp_path, pki, PEER, nursery)
    return World(tmp_path, ca_url, bundle, pki, peer)


def _lines(out: str, status: str, check: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.split()[:2] == [status, check]]


async def test_everything_passes(world: World) -> None:
    code, out = await world.check()
    assert code == 0, out
    for check in ("config", "file", "ca", "clock", "bundle", "chain", "expiry", "port", "peer"):
        assert _lines(out, "ok", check), (check, out)
    assert "FAIL" not in out and "warn" not in out
    assert out.rstrip().endswith("all checks passed")
    assert "api 127.0.0.1:" in out and f"presents {PEER}" in out


async def test_json_output(world: World) -> None:
    code, out = await world.check("--output", "json")
    doc = json.loads(out)
    assert code == 0 and doc["exit"] == 0 and doc["kind"] == "sidecar"
    assert {c["status"] for c in doc["checks"]} == {"ok"}
    assert {"check", "status", "message"} == set(doc["checks"][0])


async def test_invalid_config_exits_2(world: World) -> None:
    world.data["inbound"]["listen"] = "nowhere"
    world.data["identity"]["ttl"] = 5
    code, out = await world.check()
    assert code == 2
    fails = _lines(out, "FAIL", "config")
    assert len(fails) == 2, out  # every problem, each naming the key
    assert any("inbound.listen" in f for f in fails) and any("identity" in f for f in fails)
    assert "the config is invalid" in out


async def test_missing_file(world: World) -> None:
    world.token.unlink()
    code, out = await world.check()
    assert code == 1
    assert _lines(out, "FAIL", "file") == [
        f"FAIL file   identity.token_file: {world.token} does not exist"
    ]


async def test_unreadable_file(world: World) -> None:
    # the tests may run as root, who reads any mode: a directory is unreadable for everyone
    bundle = world.tmp / "bundle-dir"
    bundle.mkdir()
    world.data["identity"]["ca_bundle"] = str(bundle)
    code, out = await world.check()
    assert code == 1
    assert f"FAIL file   identity.ca_bundle: {bundle} is a directory" in out
    assert _lines(out, "FAIL", "ca"), out  # and the CA cannot be verified with it


async def test_ca_unreachable(world: World) -> None:
    (port,) = free_ports(1)  # nothing listens there
    world.data["identity"]["ca_url"] = f"https://127.0.0.1:{port}"
    code, out = await world.check()
    assert code == 1
    (line,) = _lines(out, "FAIL", "ca")
    assert f"https://127.0.0.1:{port} unreachable" in line and "refused" in line


async def test_ca_not_trusted_by_the_bundle(world: World) -> None:
    other = world.tmp / "other.pem"
    other.write_text(ThrowawayCA.create("other").bundle_pem)
    world.data["identity"]["ca_bundle"] = str(other)
    code, out = await world.check()
    assert code == 1
    (line,) = _lines(out, "FAIL", "ca")
    assert "not trusted by ca_bundle" in line


async def test_clock_skew_against_the_ca_date(world: World, nursery: trio.Nursery) -> None:
    day_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).strftime("%a, %d %b %Y %H:%M:%S GMT")

    tca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tca.issue_cert("127.0.0.1").configure_cert(ctx)

    async def stale_ca(raw: trio.SocketStream) -> None:
        stream = trio.SSLStream(raw, ctx, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.receive_some(65536)
            body = b'{"status":"ok"}'
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nDate: "
                + day_ago.encode()
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, stale_ca, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    bundle = world.tmp / "stale-ca.pem"
    tca.cert_pem.write_to_path(str(bundle))
    world.data["identity"]["ca_url"] = f"https://127.0.0.1:{port}"
    world.data["identity"]["ca_bundle"] = str(bundle)
    code, out = await world.check()
    assert code == 1
    assert _lines(out, "ok", "ca")
    (line,) = _lines(out, "FAIL", "clock")
    assert re.fullmatch(r"FAIL clock  clock (8639\d|86400) s ahead of the CA's", line), line


async def test_bundle_not_matching_the_chain(world: World) -> None:
    cred = world.pki.credential(ME)
    world.hold(dataclasses.replace(cred, bundle_pem=ThrowawayCA.create("other").bundle_pem))
    code, out = await world.check()
    assert code == 1
    (line,) = _lines(out, "FAIL", "bundle")
    assert "does not chain to" in line and "not in the trust bundle" in line


async def test_expired_certificate(world: World) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    world.hold(world.pki.credential(ME, not_before=past, ttl=dt.timedelta(hours=1)))
    code, out = await world.check()
    assert code == 1
    (line,) = _lines(out, "FAIL", "expiry")
    assert f"the certificate of {ME} expired 2h" in line
    assert _lines(out, "warn", "peer")  # no usable credential: the peers are not tried


async def test_certificate_near_expiry_warns(world: World) -> None:
    # 10 of 60 minutes left: past the renewal point at 2/3 of the lifetime
    nb = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=50)
    world.hold(world.pki.credential(ME, not_before=nb, ttl=dt.timedelta(hours=1)))
    code, out = await world.check()
    assert code == 0, out  # a warning does not fail
    (line,) = _lines(out, "warn", "expiry")
    assert "expires in 9m" in line and "past its renewal point" in line
    assert "(1 warning(s))" in out


async def test_port_in_use(world: World) -> None:
    held = socket.socket()
    held.bind(("127.0.0.1", world.ports["inbound"]))
    held.listen()
    try:
        code, out = await world.check()
    finally:
        held.close()
    assert code == 1
    (line,) = _lines(out, "FAIL", "port")
    assert line == (
        f"FAIL port   inbound.listen 127.0.0.1:{world.ports['inbound']} is in use by another "
        "process"
    )


async def test_peer_with_the_wrong_identity(
    world: World, tmp_path: Path, nursery: trio.Nursery
) -> None:
    impostor = await _peer(tmp_path, world.pki, f"spiffe://{TD}/svc/impostor", nursery)
    world.data["outbound"]["upstreams"]["api"]["endpoints"].append(f"127.0.0.1:{impostor}")
    code, out = await world.check()
    assert code == 1
    assert len(_lines(out, "ok", "peer")) == 1
    (line,) = _lines(out, "FAIL", "peer")
    assert line == (
        f"FAIL peer   api 127.0.0.1:{impostor} presents spiffe://{TD}/svc/impostor, expected {PEER}"
    )


async def test_peer_unreachable(world: World) -> None:
    (port,) = free_ports(1)
    world.data["outbound"]["upstreams"]["api"]["endpoints"] = [f"127.0.0.1:{port}"]
    code, out = await world.check()
    assert code == 1
    (line,) = _lines(out, "FAIL", "peer")
    assert f"api 127.0.0.1:{port}: no mTLS handshake" in line


def test_the_command_line(tmp_path: Path) -> None:
    """`meshcar check` is a command; `meshcar config validate` (alias check) for CI."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("identity: {}\n")
    for argv in (
        ["check", str(bad)],
        ["config", "validate", str(bad)],
        ["config", "check", str(bad)],
    ):
        run = subprocess.run(
            [sys.executable, "-m", "meshcar.cli", *argv], capture_output=True, text=True
        )
        assert run.returncode == 2, (argv, run.stdout, run.stderr)
        assert "identity.spiffe_id" in run.stdout + run.stderr


# -- the edge ----------------------------------------------------------------------------------


async def test_edge_config(tmp_path: Path, nursery: trio.Nursery) -> None:
    """An edge: route certificates (a missing one, one near expiry), its identity's files and
    held credential, a bridge backend that presents the wrong identity, its ports."""
    pki = ThrowawayCA.create()
    ca_url, bundle = await _ca(tmp_path, nursery)
    impostor = await _peer(tmp_path, pki, f"spiffe://{TD}/svc/impostor", nursery)
    nb = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=50)
    chain, key = pki.leaf([], dns=["www.test"], not_before=nb, ttl=dt.timedelta(hours=1))
    (tmp_path / "www.pem").write_text(chain + key)
    state = tmp_path / "edge-state"
    CredentialStore(state).install(pki.credential(f"spiffe://{TD}/edge"))
    token = tmp_path / "token"
    token.write_text("t")
    https, admin = free_ports(2)
    data = {
        "listen": {"https": f"127.0.0.1:{https}"},
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "identity": {
            "spiffe_id": f"spiffe://{TD}/edge",
            "ca_url": ca_url,
            "ca_bundle": str(bundle),
            "token_file": str(token),
            "state_dir": str(state),
        },
        "routes": [
            {
                "host": "www.test",
                "mode": "terminate",
                "tls": {"cert": "www.pem", "key": "www.pem"},
                "backend": {"endpoints": ["127.0.0.1:9"]},
            },
            {
                "host": "api.test",
                "mode": "bridge",
                "tls": {"cert": "gone.pem", "key": "gone-key.pem"},
                "backend": {"endpoints": [f"127.0.0.1:{impostor}"], "spiffe_id": PEER},
            },
        ],
    }
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(data))

    def run() -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = checkcli.main([str(path), "--timeout", "5"])
        return code, out.getvalue()

    code, out = await trio.to_thread.run_sync(run)
    assert code == 1, out
    assert _lines(out, "ok", "config") == [f"ok   config {path}: valid edge config"]
    gone = tmp_path / "gone.pem"
    assert f"FAIL file   routes[1] (api.test).tls.cert: {gone} does not exist" in out
    assert f"routes[1] (api.test).tls.key: {tmp_path / 'gone-key.pem'} does not exist" in out
    (warn,) = _lines(out, "warn", "expiry")
    assert "www.test's certificate expires in 9m" in warn
    assert _lines(out, "ok", "ca") and _lines(out, "ok", "bundle")
    assert len(_lines(out, "ok", "port")) == 2  # https and admin
    (peer,) = _lines(out, "FAIL", "peer")
    assert f"api.test 127.0.0.1:{impostor} presents spiffe://{TD}/svc/impostor" in peer


async def test_vault_reachable_and_unreachable(world: World, nursery: trio.Nursery) -> None:
    """identity.vault: GET /v1/sys/health on each node over TLS verified by vault.ca_cert."""
    tca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tca.issue_cert("127.0.0.1").configure_cert(ctx)
    paths: list[bytes] = []

    async def vault(raw: trio.SocketStream) -> None:
        stream = trio.SSLStream(raw, ctx, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError):
            head = await stream.receive_some(65536)
            paths.append(head.split(b" ")[1])
            body = b'{"initialized":true,"sealed":false,"standby":false}'
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (len(body), body)
            )
            await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, vault, 0, host="127.0.0.1"))
    up = f"https://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    (closed,) = free_ports(1)
    down = f"https://127.0.0.1:{closed}"
    ca_cert = world.tmp / "vault-ca.pem"
    tca.cert_pem.write_to_path(str(ca_cert))
    ident = world.data["identity"]
    for k in ("ca_url", "ca_bundle", "token_file"):
        ident.pop(k)
    ident["vault"] = {
        "addr": [up, down],
        "role": "web",
        "token_file": str(world.token),
        "ca_cert": str(ca_cert),
    }
    code, out = await world.check()
    assert code == 1, out
    assert _lines(out, "ok", "vault") == [f"ok   vault  {up} answers /v1/sys/health with 200"]
    (line,) = _lines(out, "FAIL", "vault")
    assert line.startswith(f"FAIL vault  {down} unreachable")
    assert paths == [b"/v1/sys/health?standbyok=true"]
    assert _lines(out, "ok", "file")  # the token and CA files are checked too


async def test_ports_held_by_the_running_process_are_ok(
    world: World, nursery: trio.Nursery
) -> None:
    """Run against a live sidecar: its ports are in use, and its admin /live answers."""

    async def admin(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            await stream.aclose()

    await nursery.start(partial(trio.serve_tcp, admin, world.ports["admin"], host="127.0.0.1"))
    held = socket.socket()
    held.bind(("127.0.0.1", world.ports["inbound"]))
    held.listen()
    try:
        code, out = await world.check()
    finally:
        held.close()
    assert code == 0, out
    port = world.ports["inbound"]
    assert f"ok   port   inbound.listen 127.0.0.1:{port} is held by the running process" in out
