"""L7 authorization on a real sidecar pair (mTLS on loopback): rules by caller identity, host,
method and normalised path; default deny; audit mode (allowed, counted, logged); the deny
reason in the access log and the metric; GET /authz/explain on the admin listener, loopback
only."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio

from meshcar.admin.server import AdminHooks, AdminServer
from meshcar.common import accesslog
from tests.integration.conftest import NODES, Node, sid, start_node
from tests.integration.test_admin_lockdown import HOST_IP, _curl_from, other_pod  # noqa: F401
from tests.integration.test_sidecar_paths_headers import app_saw, req, status_of, via_inbound
from tests.support.access_lines import access_lines
from tests.support.echo_app import serve_echo
from tests.support.pki import ThrowawayCA


@pytest.fixture(autouse=True)
def _flush_access_log():
    """This test's access lines go to its own output, not the next test's."""
    yield
    accesslog.flush()


POLICIES = [
    {
        "name": "web-read",
        "from": [sid("web")],
        "hosts": ["api", "*.api.test"],
        "methods": ["GET"],
        "paths": ["/v1/*", "/healthz"],
    },
    {"name": "ops", "from": [sid("ops") + "/*"], "methods": ["GET"]},  # every ID below it
    {"name": "batch-trial", "from": [sid("batch")], "paths": ["/jobs/*"], "mode": "audit"},
]


class Mesh2:
    def __init__(self, server: Node, callers: dict[str, Node]) -> None:
        self.server = server
        self.callers = callers

    async def call(self, who: str, method: str, path: str, host: str = "api") -> tuple[int, bytes]:
        """Straight to api's mesh port with `who`'s certificate, Host as given (the outbound
        would write its upstream's name)."""
        raw = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        out = await via_inbound(self.as_mesh(who), raw.encode())
        return status_of(out), out

    def as_mesh(self, who: str) -> Any:
        return SimpleNamespace(server=self.server, client=self.callers[who])

    def count(self, decision: str, policy: str, reason: str) -> float:
        return self.server.metrics.authz_decisions.labels(decision, policy, reason)._value.get()


@pytest.fixture
async def authz_mesh(tmp_path: Path, nursery: trio.Nursery):
    ca = ThrowawayCA.create()
    app = await serve_echo(nursery)
    server = await start_node(
        nursery,
        tmp_path,
        ca,
        "api",
        app,
        [],
        {},
        inbound={"listen": "127.0.0.1:1", "allow": [sid("admin")], "policies": POLICIES},
    )
    up = {"api": {"endpoints": [f"127.0.0.1:{server.inbound_port}"], "spiffe_id": sid("api")}}
    callers = {
        name: await start_node(nursery, tmp_path, ca, name, app, [], up)
        for name in ("web", "ops/a", "batch", "admin", "intruder", "ops")
    }
    yield Mesh2(server, callers)
    for node in NODES:
        await node.inbound.aclose()
        await node.outbound.aclose()
    NODES.clear()


@pytest.mark.parametrize(
    ("who", "method", "path", "host", "status"),
    [
        ("web", "GET", "/v1/items", "api", 200),
        ("web", "GET", "/healthz", "x.api.test", 200),  # wildcard host
        ("web", "GET", "/v1/items", "evil.test", 403),  # host
        ("web", "POST", "/v1/items", "api", 403),  # method
        ("web", "GET", "/admin", "api", 403),  # path
        ("ops/a", "GET", "/anything", "api", 200),  # caller pattern .../svc/ops/*
        ("ops/a", "PUT", "/anything", "api", 403),
        ("ops", "GET", "/anything", "api", 403),  # .../ops/* is below ops, not ops itself
        ("admin", "DELETE", "/admin", "api", 200),  # inbound.allow: identity only
        ("intruder", "GET", "/v1/items", "api", 403),  # no rule names it: default deny
    ],
)
async def test_each_dimension(authz_mesh: Mesh2, who, method, path, host, status) -> None:
    got, out = await authz_mesh.call(who, method, path, host)
    assert got == status, out
    if status == 403:
        assert f"{sid(who)} is not allowed to call {sid('api')}".encode() in out


@pytest.mark.parametrize(
    "target",
    [
        b"/v1/../admin",
        b"/v1/%2e%2e/admin",
        b"/v1/%2E%2E/admin",
        b"/v1/./../admin",
        b"//v1/../admin",
    ],
)
async def test_dot_segments_and_encodings_cannot_reach_a_denied_path(
    authz_mesh: Mesh2, target: bytes
) -> None:
    """Straight to the inbound with web's certificate: the rule sees /admin, the path the app
    would receive, so /v1/* does not let it through."""
    mesh = authz_mesh.as_mesh("web")
    out = await via_inbound(mesh, req(target))
    assert status_of(out) == 403, out[:300]
    assert b"path '/admin' is not allowed" in out
    ok = await via_inbound(mesh, req(b"/admin/../v1/x"))
    assert status_of(ok) == 200


async def test_deny_reason_in_metric_and_access_log(authz_mesh: Mesh2, capsys) -> None:
    capsys.readouterr()
    assert (await authz_mesh.call("web", "POST", "/v1/x"))[0] == 403
    assert (await authz_mesh.call("intruder", "GET", "/v1/x"))[0] == 403
    assert (await authz_mesh.call("web", "GET", "/v1/x"))[0] == 200
    assert authz_mesh.count("deny", "web-read", "method") == 1
    assert authz_mesh.count("deny", "default", "caller") == 1
    assert authz_mesh.count("allow", "web-read", "") == 1
    lines = access_lines(capsys, '"direction":"inbound"', '"type":"request"')
    by_peer = {(x["peer"], x["status"]): x for x in lines}
    web_denied = by_peer[(sid("web"), 403)]
    assert (web_denied["deny_reason"], web_denied["authz_policy"]) == ("method", "web-read")
    assert by_peer[(sid("intruder"), 403)]["deny_reason"] == "caller"
    assert "deny_reason" not in by_peer[(sid("web"), 200)]
    body = authz_mesh.server.metrics.render().decode()
    assert (
        'meshcar_authz_decisions_total{decision="deny",policy="web-read",reason="method"} 1.0'
        in body
    )


async def test_audit_mode_allows_counts_and_logs(authz_mesh: Mesh2, capsys) -> None:
    capsys.readouterr()
    status, out = await authz_mesh.call("batch", "POST", "/reports")  # outside /jobs/*
    assert status == 200, out
    assert app_saw(out)["target"] == "/reports"  # the app got it
    assert (await authz_mesh.call("batch", "POST", "/jobs/1"))[0] == 200
    assert authz_mesh.count("would_deny", "batch-trial", "path") == 1
    assert authz_mesh.count("allow", "batch-trial", "") == 1
    lines = access_lines(capsys, '"direction":"inbound"', sid("batch"))
    (audited,) = [x for x in lines if x.get("authz") == "would_deny"]
    assert audited["path"] == "/reports" and audited["status"] == 200
    assert (audited["deny_reason"], audited["authz_policy"]) == ("path", "batch-trial")


async def _admin_for(nursery: trio.Nursery, node: Node, host: str = "127.0.0.1") -> int:
    hooks = AdminHooks(lambda: (True, "ok"), dict, explain=node.inbound.explain)
    admin = AdminServer(node.metrics, hooks, node.cfg.admin_public_paths)
    listeners = await nursery.start(trio.serve_tcp, admin.handle_connection, 0)
    return listeners[0].socket.getsockname()[1]


async def test_explain_lists_rules_and_decides(authz_mesh: Mesh2, nursery: trio.Nursery) -> None:
    port = await _admin_for(nursery, authz_mesh.server)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        table = (await c.get("/authz/explain")).json()
        assert table["default"] == "deny" and table["service"] == sid("api")
        names = [p["name"] for p in table["policies"]]
        assert names == ["inbound.allow", "web-read", "ops", "batch-trial"]
        assert table["policies"][1]["paths"] == ["/v1/*", "/healthz"]
        why = (
            await c.get(
                "/authz/explain",
                params={
                    "caller": sid("web"),
                    "method": "get",
                    "path": "/v1/%2e%2e/admin",
                    "host": "api",
                },
            )
        ).json()
        assert why["request"]["normalised_path"] == "/admin"
        assert (why["decision"], why["policy"], why["reason"]) == ("deny", "web-read", "path")
        assert "closest rule: web-read" in why["detail"]
        ok = (
            await c.get(
                "/authz/explain",
                params={"caller": sid("web"), "method": "GET", "path": "/v1/a", "host": "api:80"},
            )
        ).json()
        assert (ok["decision"], ok["policy"]) == ("allow", "web-read")
        dry = (
            await c.get(
                "/authz/explain",
                params={"caller": sid("batch"), "method": "PUT", "path": "/x"},
            )
        ).json()
        assert (dry["decision"], dry["policy"]) == ("would_deny", "batch-trial")
        mine = (await c.get("/authz/explain", params={"caller": sid("ops/a")})).json()
        assert mine["rules_naming_caller"] == ["ops"]
        bad = await c.get("/authz/explain", params={"caller": sid("web"), "host": "api"})
        assert bad.status_code == 400 and "method, path" in bad.json()["error"]


async def test_explain_is_loopback_only(
    other_pod: str,  # noqa: F811
    authz_mesh: Mesh2,
    nursery: trio.Nursery,
) -> None:
    port = await _admin_for(nursery, authz_mesh.server)
    assert await _curl_from(other_pod, "GET", f"http://{HOST_IP}:{port}/authz/explain") == 403
    assert await _curl_from(other_pod, "GET", f"http://{HOST_IP}:{port}/live") == 200


async def test_explain_is_refused_to_a_non_loopback_address(
    authz_mesh: Mesh2, nursery: trio.Nursery
) -> None:
    """Where no namespace can be made: this host's own non-loopback address is refused too."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a source address
        own = probe.getsockname()[0]
    except OSError:
        pytest.skip("this machine has no non-loopback IPv4 address")
    finally:
        probe.close()
    if own.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address")
    port = await _admin_for(nursery, authz_mesh.server)
    async with httpx.AsyncClient(base_url=f"http://{own}:{port}", timeout=10) as c:
        r = await c.get("/authz/explain", params={"caller": sid("web")})
        assert r.status_code == 403 and "loopback only" in r.text
