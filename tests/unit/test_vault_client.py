"""The sidecar's Vault/OpenBao client across the nodes of an HA cluster, and its config keys.

Each node is a real HTTP server on loopback answering as an OpenBao node does (active,
standby redirecting with 307, sealed 503, refusing 400/403); a dead node is a closed port,
a blackholed one a listening socket whose accept queue is full (the kernel drops the SYN,
so only the connect timeout ends the attempt). The real cluster is in
tests/e2e/test_vault_ha.py.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshcar.errors import ConfigError
from meshcar.identity.caclient import CAError
from meshcar.identity.vaultclient import VaultClient
from meshcar.sidecar.config import load_config_text
from tests.support.ports import free_port


def _root_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "test root")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


ROOT = _root_pem()
Answer = tuple[int, dict[str, str], bytes]
Behaviour = Callable[[str, str], Answer]  # (method, path) -> status, headers, body

SEEN: list[tuple[str, str, str, str]] = []  # node, method, path, token header
SEEN_LOCK = threading.Lock()


def active(method: str, path: str) -> Answer:
    if path == "/v1/auth/approle/login":
        return 200, {}, json.dumps({"auth": {"client_token": "tok-1"}}).encode()
    if path == "/v1/pki_int/ca_chain":
        return 200, {"Content-Type": "application/pem-file"}, ROOT.encode()
    return 404, {}, b'{"errors":[]}'


def sealed(method: str, path: str) -> Answer:
    return 503, {}, b'{"errors":["Vault is sealed"]}'


def redirect_to(url: str) -> Behaviour:
    return lambda method, path: (307, {"Location": url + path}, b"")


class Node:
    def __init__(self, name: str, behaviour: Behaviour) -> None:
        self.name, self.behaviour = name, behaviour
        node = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                with SEEN_LOCK:
                    SEEN.append(
                        (node.name, self.command, self.path, self.headers.get("X-Vault-Token", ""))
                    )
                status, headers, body = node.behaviour(self.command, self.path)
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def nodes() -> Iterator[Callable[[str, Behaviour], Node]]:
    made: list[Node] = []
    SEEN.clear()

    def make(name: str, behaviour: Behaviour) -> Node:
        made.append(Node(name, behaviour))
        return made[-1]

    yield make
    for n in made:
        n.close()


def closed_port() -> str:
    return f"http://127.0.0.1:{free_port()}"  # our own block (tests/support/ports.py): unbound


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A listening socket whose accept queue is full: new SYNs are dropped."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    filler.close()
    listener.close()


def client(tmp_path: Path, addrs: list[str], **kw: object) -> VaultClient:
    rid, sec = tmp_path / "rid", tmp_path / "sec"
    rid.write_text("role-id\n")
    sec.write_text("secret-id\n")
    return VaultClient(addrs, "meshcar-svc-web", role_id_file=rid, secret_id_file=sec, **kw)  # type: ignore[arg-type]


def seen_by(name: str) -> list[tuple[str, str, str, str]]:
    return [s for s in SEEN if s[0] == name]


async def test_dead_node_then_standby_redirect_then_active(tmp_path: Path, nodes, caplog) -> None:  # type: ignore[no-untyped-def]
    act = nodes("active", active)
    standby = nodes("standby", redirect_to(act.url))
    dead = closed_port()
    c = client(tmp_path, [dead, standby.url, act.url])
    caplog.set_level(logging.INFO, "meshcar.identity")
    pem, _ = await c.bundle()
    assert pem == ROOT
    # the standby's 307 was reported, not followed with the login body; the active node
    # (configured) was asked directly, and logged in there
    assert [s[2] for s in seen_by("standby")] == ["/v1/auth/approle/login"]
    assert [s[2] for s in seen_by("active")] == ["/v1/auth/approle/login", "/v1/pki_int/ca_chain"]
    assert seen_by("active")[1][3] == "tok-1"
    events = [
        json.loads(r.getMessage())
        for r in caplog.records
        if "identity.vault_node" in r.getMessage()
    ]
    assert len(events) == 1 and events[0]["addr"] == act.url and events[0]["previous"] == dead
    assert (
        "ConnectionError" in events[0]["failed"][0] and "redirected (307)" in events[0]["failed"][1]
    )
    # the next call goes straight to the node that answered, with the same token
    SEEN.clear()
    caplog.clear()
    assert (await c.bundle())[0] == ROOT
    assert [(s[0], s[2], s[3]) for s in SEEN] == [("active", "/v1/pki_int/ca_chain", "tok-1")]
    assert not [r for r in caplog.records if "identity.vault_node" in r.getMessage()]


async def test_a_redirect_to_an_unconfigured_address_is_not_followed(tmp_path: Path, nodes) -> None:  # type: ignore[no-untyped-def]
    elsewhere = nodes("elsewhere", active)  # e.g. what a compromised or misconfigured node names
    standby = nodes("standby", redirect_to(elsewhere.url))
    second = nodes("second", active)
    c = client(tmp_path, [standby.url, second.url])
    assert (await c.bundle())[0] == ROOT
    assert seen_by("elsewhere") == []  # no token, no secret_id sent there
    assert [s[2] for s in seen_by("second")] == ["/v1/auth/approle/login", "/v1/pki_int/ca_chain"]


async def test_sealed_node_then_active(tmp_path: Path, nodes) -> None:  # type: ignore[no-untyped-def]
    s = nodes("sealed", sealed)
    a = nodes("active", active)
    assert (await client(tmp_path, [s.url, a.url]).bundle())[0] == ROOT
    assert len(seen_by("sealed")) == 1


async def test_a_blackholed_node_costs_the_connect_timeout_not_the_read_timeout(
    tmp_path: Path, nodes, blackhole: str, caplog
) -> None:  # type: ignore[no-untyped-def]
    a = nodes("active", active)
    caplog.set_level(logging.INFO, "meshcar.identity")
    c = client(tmp_path, [blackhole, a.url], connect_timeout=0.5, timeout=60)
    assert (await c.bundle())[0] == ROOT
    event = next(
        json.loads(r.getMessage())
        for r in caplog.records
        if "identity.vault_node" in r.getMessage()
    )
    assert (
        "ConnectTimeout" in event["failed"][0]
    )  # the connect phase ended it (read timeout is 60 s)


async def test_every_node_down_is_retryable_and_names_each(tmp_path: Path, nodes) -> None:  # type: ignore[no-untyped-def]
    s = nodes("sealed", sealed)
    dead = closed_port()
    with pytest.raises(CAError) as err:
        await client(tmp_path, [dead, s.url]).bundle()
    assert err.value.retryable
    assert dead in str(err.value) and s.url in str(err.value) and "VaultDown" in str(err.value)
    assert "secret-id" not in str(err.value) and "role-id" not in str(err.value)


async def test_a_refusal_is_not_retried_on_other_nodes(tmp_path: Path, nodes) -> None:  # type: ignore[no-untyped-def]
    def refusing(method: str, path: str) -> Answer:
        if path == "/v1/auth/approle/login":
            return 400, {}, b'{"errors":["invalid role or secret ID"]}'
        return active(method, path)

    r = nodes("refusing", refusing)
    other = nodes("other", active)
    with pytest.raises(CAError, match="invalid role or secret ID") as err:
        await client(tmp_path, [r.url, other.url]).bundle()
    assert not err.value.retryable
    assert seen_by("other") == []


async def test_an_expired_token_logs_in_again_once_on_the_same_node(tmp_path: Path, nodes) -> None:  # type: ignore[no-untyped-def]
    calls = {"chain": 0}

    def expiring(method: str, path: str) -> Answer:
        if path == "/v1/pki_int/ca_chain":
            calls["chain"] += 1
            if calls["chain"] == 1:
                return 403, {}, b'{"errors":["permission denied"]}'
        return active(method, path)

    n = nodes("node", expiring)
    other = nodes("other", active)
    assert (await client(tmp_path, [n.url, other.url]).bundle())[0] == ROOT
    assert [s[2] for s in seen_by("node")] == [
        "/v1/auth/approle/login",
        "/v1/pki_int/ca_chain",
        "/v1/auth/approle/login",
        "/v1/pki_int/ca_chain",
    ]
    assert seen_by("other") == []


async def test_an_unreadable_secret_file_is_a_clear_error(tmp_path: Path, nodes) -> None:  # type: ignore[no-untyped-def]
    a = nodes("active", active)
    c = client(tmp_path, [a.url])
    (tmp_path / "sec").unlink()
    with pytest.raises(CAError, match="cannot read identity.vault.approle_secret_id_file"):
        await c.bundle()
    assert SEEN == []


# -- config: identity.vault.addr as one URL or a list; timeouts --------------------------------

BASE = """
identity:
  spiffe_id: spiffe://td/svc/web
  state_dir: /tmp/x
  vault:
    role: meshcar-svc-web
    token_file: /tmp/t
{vault}
app: {{port: 8080}}
inbound: {{listen: "127.0.0.1:7001"}}
outbound: {{listen: "127.0.0.1:7002"}}
admin: {{listen: "127.0.0.1:7003"}}
"""


def parse_vault(extra: str):  # type: ignore[no-untyped-def]
    cfg = load_config_text(BASE.format(vault=extra), "t.yaml")
    assert cfg.identity.vault is not None
    return cfg.identity.vault


def test_config_one_address_or_several() -> None:
    one = parse_vault("    addr: https://vault:8200/")
    assert one.addrs == ("https://vault:8200",)
    assert (one.connect_timeout_seconds, one.timeout_seconds) == (2.0, 10.0)
    many = parse_vault(
        "    addr: [https://v1:8200, https://v2:8200, https://v3:8200]\n"
        "    connect_timeout_seconds: 0.5\n    timeout_seconds: 20"
    )
    assert many.addrs == ("https://v1:8200", "https://v2:8200", "https://v3:8200")
    assert (many.connect_timeout_seconds, many.timeout_seconds) == (0.5, 20.0)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("    addr: []", "identity.vault.addr: must be an http(s):// URL or a non-empty list"),
        (
            "    addr: [https://v1, v2:8200]",
            "identity.vault.addr: must be an http(s):// URL or a list of them (got 'v2:8200')",
        ),
        ("    addr: [https://v1, https://v1/]", "identity.vault.addr: names https://v1/ twice"),
        ("    addr: {a: 1}", "identity.vault.addr: must be an http(s):// URL or a non-empty list"),
        ("    timeout_seconds: 1", "identity.vault.addr: is required"),
        (
            "    addr: https://v1\n    connect_timeout_seconds: 0",
            "identity.vault.connect_timeout_seconds: must be a number",
        ),
        (
            "    addr: https://v1\n    timeout_seconds: true",
            "identity.vault.timeout_seconds: must be a number",
        ),
    ],
)
def test_config_errors_name_the_key(extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config_text(BASE.format(vault=extra), "t.yaml")
    assert message in str(err.value)
