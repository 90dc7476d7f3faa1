"""Per-route timeouts at the edge (`routes[].timeouts`): a backend that never answers gets a
504 with a clear body once the route's per-try or request timeout fires, not before (a lower
bound and a generous upper one); a bad value is reported with file and key."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest
import trio

from meshcar.edge.config import parse_edge_config
from meshcar.errors import ConfigError
from tests.integration.edge_fixtures import public_pki, start_edge, terminate_route
from tests.support.faulty_app import FaultyApp
from tests.support.readall import read_to_close


async def _get(port: int, ctx: ssl.SSLContext) -> tuple[int, bytes, float]:
    start = trio.current_time()
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    async with trio.SSLStream(tcp, ctx, server_hostname="www.test") as s:
        await s.send_all(b"GET /x HTTP/1.1\r\nHost: www.test\r\nConnection: close\r\n\r\n")
        out = await read_to_close(s)
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body, trio.current_time() - start


@pytest.mark.parametrize(
    "timeouts,expect,lower",
    [
        ({"per_try_seconds": 0.5}, "did not answer within 0.5s", 0.5),
        ({"per_try_seconds": 30, "request_seconds": 0.7}, "request timeout (0.7s)", 0.7),
    ],
)
async def test_a_routes_timeout_fires_at_its_value(
    tmp_path: Path, nursery, timeouts, expect, lower
):
    pki = public_pki(tmp_path)
    app = await FaultyApp("hang", "hang").start(nursery)
    edge = await start_edge(
        nursery, tmp_path, [terminate_route("www.test", app.port, timeouts=timeouts)]
    )
    try:
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        status, body, took = await _get(edge.https, ctx)
        assert status == 504
        assert expect in json.loads(body)["message"]
        assert lower <= took < 6
    finally:
        await edge.aclose()


def test_route_timeout_errors_name_file_and_key(tmp_path: Path):
    raw = {
        "listen": {"https": "127.0.0.1:1"},
        "admin": {"listen": "127.0.0.1:1"},
        "routes": [
            terminate_route("www.test", 1, timeouts={"per_try_seconds": 0, "bogus": 1}),
            terminate_route("api.test", 1, timeouts={"request_seconds": "x"}),
        ],
    }
    with pytest.raises(ConfigError) as exc:
        parse_edge_config(raw, "edge.yaml", tmp_path)
    got = exc.value.problems
    for k in (
        "routes[0].timeouts.bogus: unknown key",
        "routes[0].timeouts.per_try_seconds: must be",
        "routes[1].timeouts.request_seconds: must be",
    ):
        assert any(g.startswith("edge.yaml: " + k) for g in got), (k, got)
