"""Admin GET /requests/recent (the access log's ring buffer) and GET /routes (the edge's), both
loopback only, and the dashboard's fetch of a real admin listener."""

from __future__ import annotations

import socket

import httpx
import pytest
import trio

from meshcar.admin import recent
from meshcar.admin.metrics import Metrics
from meshcar.admin.server import AdminHooks, AdminServer
from meshcar.common import accesslog
from meshcar.dashboard.main import collect
from tests.support.ports import own_ipv4_or_skip

ROUTES = [{"host": "www.test", "mode": "terminate", "endpoints": ["127.0.0.1:8080"]}]


async def _serve(nursery: trio.Nursery, routes: bool) -> int:
    hooks = AdminHooks(lambda: (True, "ok"), lambda: {"spiffe_id": "spiffe://t/svc/a"})
    if routes:
        hooks.routes = lambda: ROUTES
    admin = AdminServer(Metrics(), hooks)
    listeners = await nursery.start(trio.serve_tcp, admin.handle_connection, 0)
    return listeners[0].socket.getsockname()[1]


@pytest.fixture(autouse=True)
def _clean(capsys: pytest.CaptureFixture[str]):
    recent.clear()
    yield
    accesslog.flush()  # our lines go to this test's capture, not the next test's
    recent.clear()


async def test_recent_requests_and_routes_on_loopback(nursery: trio.Nursery) -> None:
    port = await _serve(nursery, routes=True)
    for i in range(3):
        accesslog.log_request(direction="inbound", path=f"/p{i}", status=200, duration_ms=1.5)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
        body = (await c.get("/requests/recent")).json()
        assert [e["path"] for e in body["entries"]] == ["/p0", "/p1", "/p2"]
        assert all(e["type"] == "request" and e["ts"].endswith("Z") for e in body["entries"])
        after = body["entries"][1]["seq"]
        later = (await c.get(f"/requests/recent?after={after}")).json()["entries"]
        assert [e["path"] for e in later] == ["/p2"]
        assert (await c.get("/routes")).json() == {"routes": ROUTES}


async def test_routes_is_only_the_edges(nursery: trio.Nursery) -> None:
    port = await _serve(nursery, routes=False)  # a sidecar: no routes hook
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
        assert (await c.get("/routes")).status_code == 404


async def test_recent_and_routes_refused_off_loopback(nursery: trio.Nursery) -> None:
    port = await _serve(nursery, routes=True)
    own = own_ipv4_or_skip()
    async with httpx.AsyncClient(base_url=f"http://{own}:{port}") as c:
        assert (await c.get("/requests/recent")).status_code == 403
        assert (await c.get("/routes")).status_code == 403


async def test_dashboard_collects_a_real_admin_listener(nursery: trio.Nursery) -> None:
    port = await _serve(nursery, routes=True)
    accesslog.log_request(direction="inbound", path="/x", status=503, duration_ms=2.0)
    with socket.socket() as s:  # a port nothing listens on: the target is shown as unreachable
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    edge, gone = await collect(
        [("edge", f"http://127.0.0.1:{port}"), ("gone", f"http://127.0.0.1:{dead}")]
    )
    assert edge.error is None and edge.ready is True
    assert edge.certs["spiffe_id"] == "spiffe://t/svc/a" and edge.routes == ROUTES
    assert [e["path"] for e in edge.recent] == ["/x"]
    assert "meshcar_requests" in edge.metrics or "# HELP" in edge.metrics
    assert gone.error and "Connect" in gone.error and gone.ready is None
