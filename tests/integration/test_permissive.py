"""Permissive mode (`inbound.permissive`, issue 14): the mesh port also takes plaintext HTTP
callers, as `unauthenticated`; real TLS and real curl on loopback.

Off (the default), a plaintext caller gets nothing. On, mTLS callers are decided exactly as
before; a plaintext caller is 403 (deny reason `unauthenticated`) unless a policy names
`unauthenticated` in its `from`; identity rules (`*`, SPIFFE IDs, the allow list) never
match it, whatever identity headers it sends; the app gets `X-Meshcar-Authenticated: false`
and no XFCC; the access log and the metrics say `unauthenticated`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from meshcar.checkcli import Options, run_checks
from meshcar.common import accesslog
from meshcar.errors import ConfigError
from meshcar.sidecar.config import load_config_text
from meshcar.sidecar.main import Sidecar
from tests.integration.conftest import NODES, Mesh, Node, sid, start_node
from tests.integration.test_sidecar_paths_headers import app_saw, req, status_of, via_inbound
from tests.support.access_lines import access_lines
from tests.support.echo_app import serve_echo
from tests.support.pki import ThrowawayCA
from tests.support.rawclient import raw_exchange

SPOOFED = [
    "X-Forwarded-Client-Cert: By=x;Hash=00;URI=" + sid("web"),
    "X-Meshcar-Peer-Identity: " + sid("web"),
    "X-Meshcar-Authenticated: true",
]
POLICIES = [
    {"name": "legacy-read", "from": ["unauthenticated"], "methods": ["GET"], "paths": ["/pub/*"]},
    {"name": "any-mesh", "from": ["*"], "paths": ["/any/*"]},  # an identity rule
]


@pytest.fixture(autouse=True)
def _flush_access_log():
    yield
    accesslog.flush()


async def curl(port: int, path: str, *headers: str, method: str = "GET") -> tuple[int, str]:
    """Plain curl, no TLS: (status, body); status 0 when curl got no HTTP answer."""
    args = ["curl", "-sS", "--max-time", "10", "-X", method, "-o", "-", "-w", "\n%{http_code}"]
    for h in headers:
        args += ["-H", h]
    res = await trio.run_process(
        [*args, f"http://127.0.0.1:{port}{path}"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    body, _, code = res.stdout.decode().rpartition("\n")
    return int(code or 0), body


@pytest.fixture
async def perm(tmp_path: Path, nursery: trio.Nursery):
    """api in permissive mode (allows web; the policies above), strict: permissive with the
    allow list and the identity rule only (nothing names unauthenticated); web and x as
    callers."""
    ca = ThrowawayCA.create()
    app = await serve_echo(nursery)
    inbound = {"listen": "127.0.0.1:1", "allow": [sid("web")], "permissive": True}
    server = await start_node(
        nursery, tmp_path, ca, "api", app, [], {}, inbound={**inbound, "policies": POLICIES}
    )
    strict = await start_node(
        nursery, tmp_path, ca, "api", app, [], {}, inbound={**inbound, "policies": POLICIES[1:]}
    )
    callers = {n: await start_node(nursery, tmp_path, ca, n, app, [], {}) for n in ("web", "x")}
    yield SimpleNamespace(ca=ca, server=server, strict=strict, callers=callers)
    for node in NODES:
        await node.inbound.aclose()
        await node.outbound.aclose()
    NODES.clear()


def _mesh(perm, who: str) -> SimpleNamespace:
    return SimpleNamespace(server=perm.server, client=perm.callers[who])


def _count(node: Node, decision: str, policy: str, reason: str) -> float:
    return node.metrics.authz_decisions.labels(decision, policy, reason)._value.get()


async def test_off_by_default_a_plaintext_caller_gets_no_answer(mesh: Mesh) -> None:
    assert mesh.server.cfg.permissive is False
    status, body = await curl(mesh.server.inbound_port, "/ok")
    assert status == 0 and body == ""  # closed: no HTTP answer at all
    assert mesh.server.metrics.handshakes.labels("inbound", "failure")._value.get() >= 1


async def test_mtls_callers_work_as_before(perm) -> None:
    out = await via_inbound(_mesh(perm, "web"), req(b"/anything"))
    assert status_of(out) == 200, out[:300]
    seen = app_saw(out)["headers"]
    assert seen["x-forwarded-client-cert"][0].endswith("URI=" + sid("web"))
    assert "x-meshcar-authenticated" not in seen
    refused = await via_inbound(_mesh(perm, "x"), req(b"/anything"))
    assert status_of(refused) == 403
    assert f"{sid('x')} is not allowed to call".encode() in refused
    any_mesh = await via_inbound(_mesh(perm, "x"), req(b"/any/1"))  # "*": any mesh identity
    assert status_of(any_mesh) == 200


async def test_plaintext_is_403_by_default_with_the_deny_reason(perm, capsys) -> None:
    capsys.readouterr()
    status, body = await curl(perm.strict.inbound_port, "/private")
    assert status == 403
    assert "unauthenticated (plaintext) callers may not call" in body
    assert "no rule admits unauthenticated" in body
    assert _count(perm.strict, "deny", "default", "unauthenticated") == 1
    denials = perm.strict.metrics.authz_denials.labels("unauthenticated")._value.get()
    assert denials == 1
    (line,) = access_lines(capsys, '"direction":"inbound"', '"type":"request"')
    assert (line["peer"], line["status"], line["deny_reason"]) == (
        "unauthenticated",
        403,
        "unauthenticated",
    )


async def test_plaintext_admitted_by_a_rule_naming_unauthenticated(perm, capsys) -> None:
    capsys.readouterr()
    status, body = await curl(perm.server.inbound_port, "/pub/page", *SPOOFED)
    assert status == 200, body
    seen = app_saw(b"\r\n\r\n" + body.encode())
    assert seen["target"] == "/pub/page"
    headers = seen["headers"]
    assert headers["x-meshcar-authenticated"] == ["false"]  # ours, the client's is gone
    assert "x-forwarded-client-cert" not in headers
    assert "x-meshcar-peer-identity" not in headers
    assert _count(perm.server, "allow", "legacy-read", "") == 1
    # the rule's other dimensions still apply
    assert (await curl(perm.server.inbound_port, "/pub/page", method="POST"))[0] == 403
    assert _count(perm.server, "deny", "legacy-read", "method") == 1
    lines = access_lines(capsys, '"direction":"inbound"', '"type":"request"')
    assert {x["peer"] for x in lines} == {"unauthenticated"}
    assert [x["status"] for x in lines] == [200, 403]
    body_m = perm.server.metrics.render().decode()
    assert (
        'meshcar_peer_requests_total{code="2xx",direction="inbound",peer="unauthenticated"} 1.0'
        in body_m
    )


@pytest.mark.parametrize("path", ["/any/1", "/anything", "/pub/../any/1"])
async def test_identity_rules_never_match_a_plaintext_caller(perm, path: str) -> None:
    """`*` (any mesh identity) and the allow list (web) are identity rules: a plaintext
    caller claiming web's identity in every header it can is still unauthenticated."""
    for node in (perm.strict, perm.server):
        status, body = await curl(node.inbound_port, path, *SPOOFED)
        assert status == 403, body
        assert sid("web") not in body
    assert "no rule admits unauthenticated" in (await curl(perm.strict.inbound_port, path))[1]
    # with a rule naming unauthenticated, the refusal is by that rule's path, never "*"
    assert _count(perm.server, "deny", "legacy-read", "path") == 1


async def test_tls_garbage_and_non_http_plaintext(perm) -> None:
    port = perm.server.inbound_port
    out = await raw_exchange(port, b"\x16\x03\x01\x00\x05hello" + b"\x00" * 100)
    assert b"HTTP" not in out  # a broken handshake, as without permissive mode
    assert perm.server.metrics.handshakes.labels("inbound", "failure")._value.get() == 1
    out = await raw_exchange(port, b"\x00\x01garbage\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]
    ok = await via_inbound(_mesh(perm, "web"), req(b"/still"))
    assert status_of(ok) == 200


async def test_opaque_tcp_tunnels_stay_mtls_only(perm) -> None:
    """A plaintext caller cannot pick an ALPN: it gets HTTP handling, never a tunnel."""
    out = await raw_exchange(perm.server.inbound_port, b"meshcar-tcp/1\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 "), out[:200]


BASE = """
identity: {spiffe_id: "spiffe://meshcar.test/svc/api", ca_url: "https://127.0.0.1:1",
           ca_bundle: x, state_dir: /tmp/x}
app: {port: 8080}
admin: {listen: "127.0.0.1:1"}
"""


def test_config_errors_name_file_and_key() -> None:
    text = BASE + (
        'inbound: {listen: "127.0.0.1:1", permissive: "yes",'
        " policies: [{name: a, from: [unauthenticatd]}]}\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config_text(text, "/etc/meshcar/api.yaml")
    msg = str(exc.value)
    assert "/etc/meshcar/api.yaml" in msg
    assert "inbound.permissive" in msg and "true or false" in msg
    assert "inbound.policies[0].from[0]" in msg  # a typo is no identity and no keyword
    good = load_config_text(
        BASE + 'inbound: {listen: "127.0.0.1:1", permissive: true,'
        " policies: [{name: a, from: [unauthenticated]}]}\n",
        "api.yaml",
    )
    assert good.permissive is True and good.policies[0].callers == ("unauthenticated",)
    assert load_config_text(BASE + 'inbound: {listen: "127.0.0.1:1"}\n', "a").permissive is False


def test_a_reload_does_not_switch_it(tmp_path: Path) -> None:
    """inbound.permissive is a restart key: a reload names it and keeps the running value."""
    cfg = load_config_text(
        BASE.replace("/tmp/x", str(tmp_path)) + 'inbound: {listen: "127.0.0.1:1"}\n', "a.yaml"
    )
    sc = Sidecar(cfg)
    new = load_config_text(
        BASE.replace("/tmp/x", str(tmp_path))
        + 'inbound: {listen: "127.0.0.1:1", permissive: true}\n',
        "a.yaml",
    )
    prepared = sc.prepare_reload(new)
    assert prepared.restart_required == ["permissive"]
    prepared.commit()
    assert sc.cfg.permissive is False and sc.inbound.cfg.permissive is False


async def test_explain_answers_for_unauthenticated(perm) -> None:
    q = {"caller": "unauthenticated", "method": "GET", "path": "/pub/a"}
    code, out = perm.server.inbound.explain(q)
    assert code == 200 and (out["decision"], out["policy"]) == ("allow", "legacy-read")
    code, out = perm.strict.inbound.explain({**q, "path": "/any/1"})
    assert (out["decision"], out["reason"]) == ("deny", "unauthenticated")


async def test_silent_connection_is_closed_after_the_handshake_timeout(perm) -> None:
    """A caller that sends nothing is closed like one that never finishes its handshake."""
    perm.server.inbound.handshake_timeout = 0.2
    tcp = await trio.open_tcp_stream("127.0.0.1", perm.server.inbound_port)
    with trio.fail_after(10):
        assert await tcp.receive_some(100) == b""  # closed by the sidecar
    await tcp.aclose()


def test_meshcar_check_warns(tmp_path: Path) -> None:
    path = tmp_path / "api.yaml"
    path.write_text(
        BASE.replace("/tmp/x", str(tmp_path))
        + 'inbound: {listen: "127.0.0.1:1", permissive: true}\n'
    )
    _, _, rep = run_checks(path, "sidecar", Options(timeout=0.5))
    assert ("config", "warn") in {(c, s) for c, s, _ in rep.checks}
    assert any("inbound.permissive" in m for _, _, m in rep.checks)
