"""HTTP/2 through an in-process sidecar pair: back-pressure end to end (a client that stops
reading stops the app at about the windows in between, it is never buffered in full), and
per-request load balancing (one client connection, streams spread over both endpoints)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
import trio
import trio.testing

from meshcar.net.h2conn import H2Conn, H2Stream
from tests.integration.conftest import NODES, sid, start_node
from tests.support.pki import ThrowawayCA

pytest.importorskip("h2")
CHUNK = 64 * 1024
TOTAL = 200 * 1024 * 1024


class FloodApp:
    """An h2c app answering each request with TOTAL bytes, as fast as the windows allow;
    `sent` counts what it got out."""

    def __init__(self) -> None:
        self.sent = 0
        self.streams = 0

    async def handle(self, tcp: trio.SocketStream) -> None:
        conn = H2Conn(tcp, client=False)
        await conn.start()
        await conn.run(partial(self._stream, conn))

    async def _stream(self, conn: H2Conn, s: H2Stream) -> None:
        self.streams += 1
        await conn.send_headers(s.id, [(b":status", b"200")])
        if (s.headers and dict(s.headers).get(b":path")) == b"/small":
            await conn.send_data(s.id, b"ok", end=True)
            return
        block = b"x" * CHUNK
        while self.sent < TOTAL:
            await conn.send_data(s.id, block)
            self.sent += CHUNK
        await conn.end_stream(s.id)


async def _serve(nursery: trio.Nursery, handler) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


@pytest.fixture
async def flood_mesh(tmp_path: Path, nursery: trio.Nursery):
    app = FloodApp()
    app_port = await _serve(nursery, app.handle)
    ca = ThrowawayCA.create()
    h2c = {"port": app_port, "protocol": "h2c"}
    api1 = await start_node(nursery, tmp_path / "1", ca, "api", app_port, [sid("web")], {}, app=h2c)
    api2 = await start_node(nursery, tmp_path / "2", ca, "api", app_port, [sid("web")], {}, app=h2c)
    eps = [f"127.0.0.1:{api1.inbound_port}", f"127.0.0.1:{api2.inbound_port}"]
    ups = {"api": {"endpoints": eps, "spiffe_id": sid("api")}}
    web = await start_node(nursery, tmp_path, ca, "web", app_port, [], ups)
    yield app, web, api1, api2
    for node in NODES:
        await node.inbound.aclose()
        await node.outbound.aclose()
    NODES.clear()


def client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    c.initiate_connection()
    return c


def get(c: h2.connection.H2Connection, path: bytes) -> int:
    sid_ = c.get_next_available_stream_id()
    hs = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"api"), (b":path", path)]
    c.send_headers(sid_, hs, end_stream=True)
    return sid_


async def test_a_client_that_stops_reading_stops_the_app(flood_mesh) -> None:
    app, web, *_ = flood_mesh
    tcp = await trio.open_tcp_stream("127.0.0.1", web.outbound_port)
    c = client()
    get(c, b"/flood")
    await tcp.send_all(c.data_to_send())
    # read the response head and whatever fits in our 64 KiB window, never acknowledging it
    got_head = False
    with trio.fail_after(20):
        while not got_head:
            for ev in c.receive_data(await tcp.receive_some(65536)):
                got_head = got_head or isinstance(ev, h2.events.ResponseReceived)
    # everything that can move has moved once every task waits (on a window or a socket)
    await trio.testing.wait_all_tasks_blocked(cushion=0.5)
    stalled = app.sent
    assert 0 < stalled < 40 * 1024 * 1024, stalled  # windows + socket buffers, not 200 MB
    await trio.testing.wait_all_tasks_blocked(cushion=0.5)
    assert app.sent == stalled  # and it stays there
    await tcp.aclose()


async def test_streams_of_one_connection_spread_over_endpoints(flood_mesh) -> None:
    app, web, api1, api2 = flood_mesh
    tcp = await trio.open_tcp_stream("127.0.0.1", web.outbound_port)
    c = client()
    ids = {get(c, b"/small") for _ in range(10)}
    await tcp.send_all(c.data_to_send())
    with trio.fail_after(20):
        while ids:
            for ev in c.receive_data(await tcp.receive_some(65536)):
                if isinstance(ev, h2.events.StreamEnded):
                    ids.discard(ev.stream_id)
            out = c.data_to_send()
            if out:
                await tcp.send_all(out)
    await tcp.aclose()
    served = [n.metrics.requests.labels("inbound", "200")._value.get() for n in (api1, api2)]
    assert served == [5, 5]  # round robin per request, one downstream connection


async def test_bodies_of_refused_streams_do_not_eat_the_connection_window(flood_mesh) -> None:
    """Six 1 MiB uploads refused at once (unknown service: 502) are more than the 4 MiB
    connection window: their data must be given back, or the connection stalls."""
    app, web, *_ = flood_mesh
    tcp = await trio.open_tcp_stream("127.0.0.1", web.outbound_port)
    c = client()
    statuses: dict[int, bytes] = {}

    async def pump_events() -> None:
        data = await tcp.receive_some(65536)
        assert data, "connection closed"
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                statuses[ev.stream_id] = dict(ev.headers)[b":status"]
        out = c.data_to_send()
        if out:
            await tcp.send_all(out)

    with trio.fail_after(30):
        for _ in range(6):
            sid_ = c.get_next_available_stream_id()
            hs = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"example.com")]
            c.send_headers(sid_, hs + [(b":path", b"/up")])
            left = 1 << 20
            while left:  # the whole body, answered or not (as a client that never reads)
                try:
                    window = c.local_flow_control_window(sid_)
                except h2.exceptions.StreamClosedError:
                    break  # the server reset the rest (NO_ERROR: answered early)
                n = min(left, window, c.max_outbound_frame_size)
                if n <= 0:
                    await tcp.send_all(c.data_to_send())
                    await pump_events()
                    continue
                c.send_data(sid_, b"u" * n)
                left -= n
            await tcp.send_all(c.data_to_send())
        last = get(c, b"/small")
        await tcp.send_all(c.data_to_send())
        while last not in statuses:
            await pump_events()
    assert statuses[last] == b"200"
    assert set(statuses.values()) == {b"502", b"200"}
    await tcp.aclose()
