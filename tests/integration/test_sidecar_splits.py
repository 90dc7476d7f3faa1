"""Weighted splits in the sidecar outbound (`outbound.splits`) on real sidecars (mTLS on
loopback): the app calls `api`, requests go to api-v1 or api-v2 (each its own sidecar and
SPIFFE ID) within binomial bounds; weight 0 takes nothing; config errors all at once."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
import trio

from meshcar.common import accesslog
from meshcar.errors import ConfigError
from meshcar.sidecar.splits import Splitter, TrafficSplit
from tests.integration.conftest import NODES, make_cfg, sid, start_node
from tests.support.echo_app import serve_echo
from tests.support.pki import ThrowawayCA


@pytest.fixture(autouse=True)
def _flush_access_log():
    """This test's access lines go to its own output, not the next test's."""
    yield
    accesslog.flush()


async def test_split_holds_its_weights_across_real_sidecars(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    ca = ThrowawayCA.create()
    app = await serve_echo(nursery)
    servers = {
        n: await start_node(nursery, tmp_path, ca, n, app, [sid("web")], {})
        for n in ("api-v1", "api-v2", "api-v3")
    }
    ups = {
        n: {"endpoints": [f"127.0.0.1:{s.inbound_port}"], "spiffe_id": sid(n)}
        for n, s in servers.items()
    }
    split = [
        {"upstream": "api-v1", "weight": 80},
        {"upstream": "api-v2", "weight": 20},
        {"upstream": "api-v3", "weight": 0},
    ]
    web = await start_node(
        nursery,
        tmp_path,
        ca,
        "web",
        app,
        [],
        ups,
        outbound={"listen": "127.0.0.1:1", "upstreams": ups, "splits": {"api": split}},
    )
    n, p = 600, 0.2
    counts: dict[str, int] = {}
    async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{web.outbound_port}", timeout=10) as c:
        for _ in range(n):
            r = await c.get("http://api/x")
            assert r.status_code == 200, r.text
            xfcc = [v for k, v in r.json()["headers"] if k.lower() == "x-forwarded-client-cert"]
            by = xfcc[0].split(";")[0].removeprefix("By=")
            counts[by] = counts.get(by, 0) + 1
        # an upstream of the split stays reachable by its own name
        r = await c.get("http://api-v3/x")
        assert r.status_code == 200
    bound = 3.29 * math.sqrt(n * p * (1 - p))  # 99.9%, two-sided
    assert sid("api-v3") not in counts and sum(counts.values()) == n, counts
    assert abs(counts.get(sid("api-v2"), 0) - n * p) <= bound, counts
    for node in NODES:
        await node.inbound.aclose()
        await node.outbound.aclose()
    NODES.clear()


def test_seeded_splitter_is_deterministic() -> None:
    s = (TrafficSplit("api", ("a", "b", "c"), (3, 3, 4)),)
    one, two = Splitter(s, seed=5), Splitter(s, seed=5)
    seq = [one.resolve("api") for _ in range(100)]
    assert seq == [two.resolve("api") for _ in range(100)]
    assert "b" not in seq and {"a", "c"} <= set(seq)  # weight 0 (3 -> 3) takes nothing
    assert one.resolve("other") == "other"


def test_bad_splits_are_all_reported(tmp_path: Path) -> None:
    ups = {
        "api-v1": {"endpoints": ["127.0.0.1:1"], "spiffe_id": sid("api-v1")},
        "db": {
            "endpoints": ["127.0.0.1:2"],
            "spiffe_id": sid("db"),
            "protocol": "tcp",
            "local_port": 15432,
            "target_port": 5432,
        },
    }
    splits = {
        "api-v1": [{"upstream": "api-v1"}],  # a split named like an upstream
        "api": [
            {"upstream": "nope", "weight": 1},
            {"upstream": "db"},  # tcp
            {"upstream": "api-v1", "weight": -2, "colour": 1},
        ],
        "zero": [{"upstream": "api-v1", "weight": 0}],
        "empty": [],
    }
    with pytest.raises(ConfigError) as ei:
        make_cfg(
            tmp_path,
            "web",
            1,
            [],
            ups,
            outbound={"listen": "127.0.0.1:1", "upstreams": ups, "splits": splits},
        )
    keys = [p.split(": ")[1] for p in ei.value.problems]
    assert keys == [
        "outbound.splits.api-v1",
        "outbound.splits.api[0].upstream",
        "outbound.splits.api[1].upstream",
        "outbound.splits.api[2].colour",
        "outbound.splits.api[2].weight",
        "outbound.splits.zero",
        "outbound.splits.empty",
    ], ei.value.problems
    assert all(p.startswith("test.yaml: ") for p in ei.value.problems)
