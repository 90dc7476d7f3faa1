"""Hot reload of the sidecar (common/reload.py, sidecar/main.py `Sidecar.prepare_reload`) on a
real sidecar pair over mTLS on loopback: the inbound's allow list changed by a reload under
continuous load through the caller's outbound (pooled mesh connections) with no failed
request; an invalid file rejected with its reason in the log, the metric and GET
/config/status, the old allow list still deciding; a changed restart-only key named."""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import pytest
import trio
import yaml

from meshcar.admin.server import AdminHooks, AdminServer
from meshcar.sidecar.config import load_config
from meshcar.sidecar.main import Sidecar
from tests.integration.conftest import NODES, sid, start_node
from tests.support.echo_app import serve_echo
from tests.support.pki import ThrowawayCA


def _cfg(tmp: Path, app_port: int, allow: list[str], **top: object) -> dict:
    return {
        "identity": {
            "spiffe_id": sid("api"),
            "ca_url": "https://127.0.0.1:1",
            "ca_bundle": "x",
            "state_dir": str(tmp / "api"),
        },
        "app": {"port": app_port},
        "inbound": {"listen": "127.0.0.1:1", "allow": allow},
        "admin": {"listen": "127.0.0.1:1"},
        **top,
    }


def _write(path: Path, data: dict | str) -> None:
    new = path.with_suffix(".new")
    new.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    new.replace(path)


async def _call(port: int) -> int:
    """One GET on a connection of its own: the status."""
    status, s = await _get(port)
    await s.aclose()
    return status


async def _get(port: int, host: str = "api", stream: trio.abc.Stream | None = None):  # noqa: ANN202
    """One keep-alive GET on `stream` (opened to `port` if None): (status, stream)."""
    s = stream or await trio.open_tcp_stream("127.0.0.1", port)
    await s.send_all(f"GET /load HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    buf = b""
    while True:
        head, sep, body = buf.partition(b"\r\n\r\n")
        if sep:
            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if m and len(body) >= int(m.group(1)):
                return int(head[9:12]), s
        chunk = await s.receive_some(65536)
        if not chunk:
            raise ConnectionError(f"closed after {buf[:200]!r}")
        buf += chunk


async def _admin(sc: Sidecar, nursery: trio.Nursery) -> int:
    hooks = AdminHooks(lambda: (True, "ok"), dict)
    hooks.config_status = sc.reloader.status
    admin = AdminServer(sc.metrics, hooks)
    ln = await nursery.start(partial(trio.serve_tcp, admin.handle_connection, 0, host="127.0.0.1"))
    return ln[0].socket.getsockname()[1]


async def _http(port: int, path: str) -> tuple[int, bytes]:
    s = await trio.open_tcp_stream("127.0.0.1", port)
    await s.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    out = b""
    while chunk := await s.receive_some(65536):
        out += chunk
    await s.aclose()
    return int(out[9:12]), out.partition(b"\r\n\r\n")[2]


@pytest.mark.trio
async def test_allow_list_reload_under_load(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    ca = ThrowawayCA.create()
    app = await serve_echo(nursery)
    path = tmp_path / "api.yaml"
    _write(path, _cfg(tmp_path, app, [sid("web")]))
    sc = Sidecar(load_config(path), source=path)
    sc.store.install(ca.credential(sid("api")))
    ln = await nursery.start(
        partial(trio.serve_tcp, sc.inbound.handle_connection, 0, host="127.0.0.1")
    )
    port = ln[0].socket.getsockname()[1]
    admin = await _admin(sc, nursery)
    up = {"api": {"endpoints": [f"127.0.0.1:{port}"], "spiffe_id": sid("api")}}
    web = await start_node(nursery, tmp_path, ca, "web", app, [], up)
    ops = await start_node(nursery, tmp_path, ca, "ops", app, [], up)

    statuses: list[int] = []
    stop = trio.Event()

    async def load() -> None:  # keep-alive through web's outbound (pooled mesh connections)
        stream = None
        while not stop.is_set():
            status, stream = await _get(web.outbound_port, stream=stream)
            statuses.append(status)
        if stream is not None:
            await stream.aclose()

    async with trio.open_nursery() as loads:
        for _ in range(4):
            loads.start_soon(load)
        while len(statuses) < 50:
            await trio.sleep(0)  # a checkpoint, not a delay: let the load run
        assert await _call(ops.outbound_port) == 403

        # valid: ops added to the allow list
        _write(path, _cfg(tmp_path, app, [sid("web"), sid("ops")]))
        assert await sc.reloader.reload("test")
        assert await _call(ops.outbound_port) == 200

        # invalid: rejected with the reason; the running allow list still decides
        _write(path, _cfg(tmp_path, app, [sid("web"), "not-a-spiffe-id"]))
        assert not await sc.reloader.reload("test")
        code, body = await _http(admin, "/config/status")
        st = json.loads(body)
        assert code == 200 and st["last_reload"]["result"] == "failure"
        assert "inbound.allow" in st["last_reload"]["error"], st
        assert await _call(ops.outbound_port) == 200
        assert any(
            "sidecar.config.reload_failed" in r.getMessage() and "inbound.allow" in r.getMessage()
            for r in caplog.records
        )

        # a restart-only key: named, not applied; ops removed again (applied)
        _write(path, _cfg(tmp_path, app, [sid("web")], drain_seconds=3))
        assert await sc.reloader.reload("test")
        assert sc.reloader.status()["restart_required"] == ["drain_seconds"]
        assert sc.cfg.drain_seconds == 10 and sc.cfg.allow == (sid("web"),)
        assert await _call(ops.outbound_port) == 403
        at = len(statuses)
        while len(statuses) < at + 50:
            await trio.sleep(0)
        stop.set()
    assert set(statuses) == {200}, [s for s in statuses if s != 200][:5]
    code, body = await _http(admin, "/metrics")
    text = body.decode()
    assert 'meshcar_config_reloads_total{result="success"} 2.0' in text
    assert 'meshcar_config_reloads_total{result="failure"} 1.0' in text
    assert "meshcar_config_last_reload_success_timestamp_seconds" in text
    await sc.inbound.aclose()
    for node in NODES:
        await node.inbound.aclose()
        await node.outbound.aclose()
