"""One fault boundary per connection: a bug met by one connection ends only that one."""

from __future__ import annotations

import logging

import httpx
import pytest
import trio

import meshcar.sidecar.outbound as outbound_mod
from meshcar.net.guard import guarded
from meshcar.sidecar.config import HostPort
from meshcar.sidecar.main import _listen
from tests.integration.conftest import Mesh


async def test_guard_logs_counts_and_closes(caplog: pytest.LogCaptureFixture) -> None:
    counted: list[str] = []
    closed = trio.Event()

    class Stream(trio.abc.Stream):
        async def send_all(self, data): ...  # noqa: ANN001
        async def wait_send_all_might_not_block(self): ...
        async def receive_some(self, max_bytes=None):
            return b""  # noqa: ANN001

        async def aclose(self) -> None:
            closed.set()

    async def buggy(stream: trio.abc.Stream) -> None:
        raise KeyError("a bug")

    with caplog.at_level(logging.ERROR, logger="meshcar.connection"):
        await guarded(buggy, "outbound", counted.append)(Stream())
    assert counted == ["outbound"]
    assert closed.is_set()
    assert "KeyError" in caplog.text and "Traceback" in caplog.text


async def test_guard_lets_cancellation_through() -> None:
    async def slow(stream: trio.abc.Stream) -> None:
        await trio.sleep_forever()

    s1, _ = trio.testing.memory_stream_pair()
    with trio.move_on_after(0.01) as scope:
        await guarded(slow, "x")(s1)
    assert scope.cancelled_caught


async def test_sidecar_outbound_survives_a_handler_bug(
    mesh: Mesh, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = outbound_mod.route_target

    def sometimes_buggy(req, *args):  # noqa: ANN001, ANN002, ANN202
        if b"boom" in req.target:
            raise RuntimeError("injected bug")
        return real(req, *args)

    monkeypatch.setattr(outbound_mod, "route_target", sometimes_buggy)
    node = mesh.client
    listeners = await _listen(
        nursery,
        node.outbound.handle_connection,
        HostPort("127.0.0.1", 0),
        nursery,
        "outbound",
        node.metrics,
    )
    port = listeners[0].socket.getsockname()[1]
    proxy = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(proxy=proxy, timeout=10) as good:
        assert (await good.get("http://api/before")).status_code == 200
        async with httpx.AsyncClient(proxy=proxy, timeout=10) as bad:
            with pytest.raises(httpx.HTTPError):
                await bad.get("http://api/boom")
        # the other client's keep-alive connection and new ones are untouched
        assert (await good.get("http://api/after")).status_code == 200
    async with httpx.AsyncClient(proxy=proxy, timeout=10) as fresh:
        assert (await fresh.get("http://api/new")).status_code == 200
    assert node.metrics.connection_errors.labels("outbound")._value.get() == 1
