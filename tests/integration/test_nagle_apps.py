"""Apps that keep Nagle on and write a head and a body in two send() calls, behind a real
sidecar pair and a real edge: no request may wait for a delayed ACK (~40 ms on Linux).

The app's second write waits in its kernel until meshcar ACKs the first; meshcar must ACK
at once on app-facing sockets (TCP_QUICKACK re-armed per read, net/httpconn.py). Each test
makes 40 sequential requests on one keep-alive client connection; with the stall every
one after the first takes >= 40 ms, so the check is that some of them take under 20 ms
(`assert_no_ack_stall`): a stall detector, not a performance bound.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.integration.conftest import NODES, Mesh, sid, start_node
from tests.integration.edge_fixtures import curl, public_pki, resolve, start_edge, terminate_route
from tests.support.nagle_app import assert_no_ack_stall

REQUESTS = 40


@pytest.fixture
def nagle_app() -> Iterator[int]:
    """tests/support/nagle_app.py as its own process; its port once it listens."""
    with subprocess.Popen(
        [sys.executable, "-m", "tests.support.nagle_app"],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    ) as proc:
        try:
            assert proc.stdout is not None
            yield int(proc.stdout.readline())
        finally:
            proc.kill()


async def curl_times(*args: str, urls: list[str]) -> list[float]:
    """curl fetching `urls` in order on one connection: ms per request; checks the reuse."""
    rc, out, err = await curl(
        *args, "-w", r"\nTIMING %{http_code} %{num_connects} %{time_total}\n", *urls
    )
    assert rc == 0, err
    rows = [line.split()[1:] for line in out.splitlines() if line.startswith("TIMING ")]
    assert [r[0] for r in rows] == ["200"] * len(urls), out
    assert sum(int(r[1]) for r in rows) == 1, out  # one connection for all of them
    return [float(r[2]) * 1000 for r in rows]


async def test_sidecar_pair_does_not_wait_for_a_delayed_ack_from_a_nagle_app(
    nagle_app: int, tmp_path: Path, nursery: trio.Nursery
) -> None:
    from tests.support.pki import ThrowawayCA

    ca = ThrowawayCA.create()
    server = await start_node(nursery, tmp_path, ca, "api", nagle_app, [sid("web")], {})
    client = await start_node(
        nursery,
        tmp_path,
        ca,
        "web",
        nagle_app,
        [],
        {"api": {"endpoints": [f"127.0.0.1:{server.inbound_port}"], "spiffe_id": sid("api")}},
    )
    try:
        ms = await curl_times(
            "-x",
            f"http://127.0.0.1:{client.outbound_port}",
            urls=[f"http://api/n{i}" for i in range(REQUESTS)],
        )
    finally:
        for node in (client, server):
            NODES.remove(node)
            await node.inbound.aclose()
            await node.outbound.aclose()
    assert_no_ack_stall(ms)


async def test_edge_does_not_wait_for_a_delayed_ack_from_a_nagle_backend(
    nagle_app: int, tmp_path: Path, nursery: trio.Nursery
) -> None:
    pki = public_pki(tmp_path)
    edge = await start_edge(nursery, tmp_path, [terminate_route("www.test", nagle_app)])
    try:
        ms = await curl_times(
            *resolve(pki.ca_file, "www.test", edge.https),
            urls=[f"https://www.test:{edge.https}/n{i}" for i in range(REQUESTS)],
        )
    finally:
        await edge.aclose()
    assert_no_ack_stall(ms)


async def test_outbound_does_not_wait_for_a_delayed_ack_from_a_nagle_client(mesh: Mesh) -> None:
    """The app as a client: Nagle on, a POST's head and body in two sends."""
    stream = await trio.open_tcp_stream("127.0.0.1", mesh.client.outbound_port)
    stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, False)
    body = b'{"n": 1}'
    head = (
        b"POST http://api/post HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    ms = []
    async with stream:
        buf = b""
        for _ in range(REQUESTS):
            start = time.perf_counter()
            await stream.send_all(head)
            await stream.send_all(body)  # held by Nagle until the head is ACKed
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some(65536)
            resp_head, _, buf = buf.partition(b"\r\n\r\n")
            assert resp_head.startswith(b"HTTP/1.1 200"), resp_head
            length = next(
                int(line.split(b":")[1])
                for line in resp_head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(buf) < length:
                buf += await stream.receive_some(65536)
            assert b'"body_length": %d' % len(body) in buf[:length]
            buf = buf[length:]
            ms.append((time.perf_counter() - start) * 1000)
    assert_no_ack_stall(ms)
