"""Hot reload of the sidecar's outbound side (sidecar/outbound.py `Outbound.reconfigure`,
sidecar/main.py `Sidecar.prepare_reload`) on real sidecars over mTLS on loopback: under
continuous keep-alive load through web's outbound, one reload adds an upstream, adds an
endpoint to another and moves a split, with no failed request; the new upstream answers,
the new endpoint and the split's new backend take traffic; an unchanged upstream's pooled
mesh connection is reused (no new connection opened, no new handshake at its peer); an
invalid outbound change is rejected with file and key while the old outbound serves; a
removed upstream's idle pooled connections are closed and it is refused (502); a changed
traffic policy keeps the endpoints' balancer state and pooled connections."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio

from meshcar.sidecar.config import load_config
from meshcar.sidecar.main import Sidecar
from tests.integration.conftest import NODES, Node, sid, start_node
from tests.integration.test_sidecar_reload import _get, _write
from tests.support.echo_app import serve_echo
from tests.support.pki import ThrowawayCA


def _web(tmp: Path, app: int, upstreams: dict, splits: dict) -> dict:
    return {
        "identity": {
            "spiffe_id": sid("web"),
            "ca_url": "https://127.0.0.1:1",
            "ca_bundle": "x",
            "state_dir": str(tmp / "web"),
        },
        "app": {"port": app},
        "inbound": {"listen": "127.0.0.1:1", "allow": []},
        "outbound": {"listen": "127.0.0.1:1", "upstreams": upstreams, "splits": splits},
        "admin": {"listen": "127.0.0.1:1"},
    }


def _served(node: Node) -> float:
    """Requests the node's inbound answered 200."""
    reg = node.metrics.registry
    return (
        reg.get_sample_value("meshcar_requests_total", {"direction": "inbound", "status": "200"})
        or 0.0
    )


def _handshakes(node: Node) -> float:
    """TLS handshakes the node's inbound completed (full or resumed)."""
    reg = node.metrics.registry
    name = "meshcar_tls_handshakes_total"
    return sum(
        reg.get_sample_value(name, {"direction": "inbound", "result": r}) or 0.0
        for r in ("full", "resumed")
    )


async def _until(what: str, cond: Callable[[], bool]) -> None:
    """Wait for `cond`, yielding to the load between looks (no fixed delay)."""
    with trio.fail_after(30):
        while not cond():
            await trio.sleep(0)  # a checkpoint, not a delay: let the load run
    assert cond(), what


async def _status(port: int, host: str, stream: trio.abc.Stream | None = None) -> int:
    status, s = await _get(port, host, stream)
    if stream is None:
        await s.aclose()
    return status


@pytest.mark.trio
async def test_outbound_reload_under_load(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    ca = ThrowawayCA.create()
    app = await serve_echo(nursery)
    allow = [sid("web")]
    api1 = await start_node(nursery, tmp_path, ca, "api", app, allow, {})
    api2 = await start_node(nursery, tmp_path / "b", ca, "api", app, allow, {})
    ledger = await start_node(nursery, tmp_path, ca, "ledger", app, allow, {})
    pay = await start_node(nursery, tmp_path, ca, "pay", app, allow, {})

    def up(name: str, *nodes: Node) -> dict:
        eps = [f"127.0.0.1:{n.inbound_port}" for n in nodes]
        return {"endpoints": eps, "spiffe_id": sid(name)}

    path = tmp_path / "web.yaml"
    before = {"api": up("api", api1), "ledger": up("ledger", ledger)}
    _write(path, _web(tmp_path, app, before, {"shop": [{"upstream": "api"}]}))
    sc = Sidecar(load_config(path), source=path)
    sc.store.install(ca.credential(sid("web")))
    ln = await nursery.start(
        partial(trio.serve_tcp, sc.outbound.handle_connection, 0, host="127.0.0.1")
    )
    port = ln[0].socket.getsockname()[1]
    opened = partial(sc.metrics.registry.get_sample_value, "meshcar_upstream_connections_total")

    # the unchanged upstream: one pooled connection, one handshake at ledger
    ledger_conn = await trio.open_tcp_stream("127.0.0.1", port)
    assert await _status(port, "ledger", ledger_conn) == 200
    assert await _status(port, "ledger", ledger_conn) == 200
    ledger_opened, ledger_handshakes = opened({"upstream": "ledger"}), _handshakes(ledger)
    assert ledger_opened == 1.0 and ledger_handshakes == 1.0

    statuses: list[int] = []
    stop = trio.Event()

    async def load(host: str) -> None:  # keep-alive through web's outbound
        stream = None
        while not stop.is_set():
            status, stream = await _get(port, host, stream)
            statuses.append(status)
        if stream is not None:
            await stream.aclose()

    async with trio.open_nursery() as loads:
        for host in ("api", "api", "shop", "shop"):
            loads.start_soon(load, host)
        await _until("load", lambda: len(statuses) >= 50)
        assert _served(api2) == 0 and _served(pay) == 0
        assert await _status(port, "pay") == 502  # not an upstream yet

        # valid: pay added, api gets a second endpoint, shop moves to pay
        after = {**before, "api": up("api", api1, api2), "pay": up("pay", pay)}
        _write(path, _web(tmp_path, app, after, {"shop": [{"upstream": "pay"}]}))
        assert await sc.reloader.reload("test")
        assert sc.reloader.status()["restart_required"] == []
        assert await _status(port, "pay") == 200
        await _until("api's new endpoint takes traffic", lambda: _served(api2) >= 20)
        paid = _served(pay)
        await _until("shop's traffic moves to pay", lambda: _served(pay) >= paid + 20)

        # the unchanged upstream's pooled connection was reused
        assert await _status(port, "ledger", ledger_conn) == 200
        assert opened({"upstream": "ledger"}) == ledger_opened
        assert _handshakes(ledger) == ledger_handshakes

        # invalid outbound change: rejected with file and key; the old outbound serves
        bad = {**after, "pay": {"endpoints": ["127.0.0.1:notaport"], "spiffe_id": sid("pay")}}
        _write(path, _web(tmp_path, app, bad, {"shop": [{"upstream": "nothere"}]}))
        assert not await sc.reloader.reload("test")
        error = sc.reloader.status()["last_reload"]["error"]
        assert str(path) in error and "outbound.upstreams.pay.endpoints" in error, error
        assert "outbound.splits.shop" in error, error
        assert await _status(port, "pay") == 200
        at = len(statuses)
        await _until("load to go on", lambda: len(statuses) >= at + 50)
        stop.set()
    assert statuses and set(statuses) == {200}, [s for s in statuses if s != 200][:5]
    assert any("sidecar.config.reload_failed" in r.getMessage() for r in caplog.records)

    # removed: pay's idle pooled connections are closed, and it is refused
    pay_keys = [k for k in sc.outbound.pool.keys() if k.startswith("pay")]
    assert sum(sc.outbound.pool.idle_count(k) for k in pay_keys) >= 1
    # ... and ledger's traffic policy changed: a new policy, the same endpoint state and pool
    ledger_ep = sc.outbound.policies["ledger"].balancer.endpoints[0]
    policy = {**before["ledger"], "retries": {"max_attempts": 2}}
    _write(path, _web(tmp_path, app, {**before, "ledger": policy}, {"shop": [{"upstream": "api"}]}))
    assert await sc.reloader.reload("test")
    assert sc.outbound.policies["ledger"].retries.max_attempts == 2
    assert sc.outbound.policies["ledger"].balancer.endpoints == [ledger_ep]
    assert sum(sc.outbound.pool.idle_count(k) for k in pay_keys) == 0
    assert await _status(port, "pay") == 502
    assert await _status(port, "ledger", ledger_conn) == 200
    assert opened({"upstream": "ledger"}) == ledger_opened
    await ledger_conn.aclose()
    assert json.loads(json.dumps(sc.reloader.status()))["last_reload"]["result"] == "success"
    await sc.outbound.aclose()
    for node in NODES:
        await node.inbound.aclose()
        await node.outbound.aclose()
