"""`outbound.egress` (sidecar/egress.py): hosts outside the mesh through the HTTP proxy
listener. deny (the config default): 502 naming the setting; allow: forwarded in plain HTTP
to the host the app named, or to `outbound.egress_proxy` in absolute form; the mesh's own
upstreams still go over mTLS. Real sockets on loopback, the echo app as the outside host."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from meshcar.errors import ConfigError
from tests.integration.conftest import Mesh, make_cfg, sid, start_node
from tests.support.echo_app import serve_echo


async def _node(nursery: trio.Nursery, tmp: Path, mesh: Mesh, name: str, **outbound: object):
    ups = {"api": {"endpoints": [f"127.0.0.1:{mesh.server.inbound_port}"], "spiffe_id": sid("api")}}
    top = {"outbound": {"listen": "127.0.0.1:1", "upstreams": ups, **outbound}}
    return await start_node(nursery, tmp, mesh.ca, name, mesh.app_port, [], ups, **top)


def _client(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(proxy=f"http://127.0.0.1:{port}", timeout=10)


async def test_deny_is_the_default_and_says_so(mesh: Mesh) -> None:
    assert mesh.client.cfg.egress == "deny"
    async with _client(mesh.client.outbound_port) as c:
        r = await c.get("http://outside.example/")
    assert r.status_code == 502
    assert "unknown service 'outside.example'" in r.text and "outbound.egress is deny" in r.text


async def test_allow_forwards_plain_http_to_the_named_host(
    tmp_path: Path, nursery: trio.Nursery, mesh: Mesh
) -> None:
    outside = await serve_echo(nursery)
    node = await _node(nursery, tmp_path, mesh, "web", egress="allow")
    async with _client(node.outbound_port) as c:
        r = await c.get(
            f"http://127.0.0.1:{outside}/plain?x=1",
            headers={"X-Forwarded-Client-Cert": "URI=spiffe://meshcar.test/svc/admin"},
        )
        assert r.status_code == 200, r.text
        info = r.json()
        assert info["target"] == "/plain?x=1"  # origin form to the host itself
        names = {k.lower(): v for k, v in info["headers"]}
        assert names["host"] == f"127.0.0.1:{outside}"
        assert "x-forwarded-client-cert" not in names  # no identity header leaves the pod
        for _ in range(3):  # kept alive and reused like the mesh pool
            assert (await c.get(f"http://127.0.0.1:{outside}/again")).status_code == 200
        # the mesh's own upstream still goes through mTLS (the server's sidecar adds XFCC)
        r = await c.get("http://api/v1")
        xfcc = [v for k, v in r.json()["headers"] if k.lower() == "x-forwarded-client-cert"]
        assert xfcc and xfcc[0].endswith(f"URI={sid('web')}")
    assert node.outbound.egress is not None
    assert node.outbound.egress.pool.idle_count(f"127.0.0.1:{outside}") == 1


async def test_allow_to_a_closed_port_is_503(
    tmp_path: Path, nursery: trio.Nursery, mesh: Mesh
) -> None:
    from tests.support.ports import free_port  # nothing listens on it

    node = await _node(nursery, tmp_path, mesh, "web", egress="allow")
    async with _client(node.outbound_port) as c:
        r = await c.get(f"http://127.0.0.1:{free_port()}/")
    assert r.status_code == 503 and "connect to 127.0.0.1" in r.text


async def test_allow_via_the_apps_former_proxy(
    tmp_path: Path, nursery: trio.Nursery, mesh: Mesh
) -> None:
    former = await serve_echo(nursery)  # stands in for the proxy the app used before
    node = await _node(
        nursery, tmp_path, mesh, "web", egress="allow", egress_proxy=f"127.0.0.1:{former}"
    )
    async with _client(node.outbound_port) as c:
        r = await c.get("http://outside.example:8080/v1?q=2")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["target"] == "http://outside.example:8080/v1?q=2"  # absolute form, to a proxy
    assert ["host", "outside.example:8080"] in [[k.lower(), v] for k, v in info["headers"]]


@pytest.mark.parametrize(
    ("outbound", "needle"),
    [
        ({"egress": "open"}, "outbound.egress"),
        ({"egress_proxy": "squid:3128"}, "needs outbound.egress: allow"),
        ({"egress": "allow", "egress_proxy": "squid"}, "outbound.egress_proxy"),
    ],
)
def test_config_checks(tmp_path: Path, outbound: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        make_cfg(tmp_path, "web", 1, [], {}, outbound={"listen": "127.0.0.1:1", **outbound})
    assert needle in str(exc.value)
