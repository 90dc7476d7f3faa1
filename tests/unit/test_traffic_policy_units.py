"""Retry budget, outlier ejection back-off and cap, and the P2C/EWMA balancer, on trio's
MockClock (no real time passes); and the traffic policy keys' config errors, all at once."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from meshcar.errors import ConfigError
from meshcar.net.balancer import Balancer
from meshcar.net.outlier import OutlierPolicy, record
from meshcar.net.retry import RetryBudget
from meshcar.sidecar.config import parse_config


def run(fn):
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_budget_allows_ratio_of_requests_plus_the_floor_over_its_window():
    async def main():
        b = RetryBudget(0.2, 1.0, 10.0)  # floor: 10 retries in the window
        for _ in range(100):
            b.deposit()
        taken = 0
        while b.can_retry():
            b.withdraw()
            taken += 1
        assert taken == 30  # 0.2 * 100 + 1/s * 10 s
        await trio.sleep(5)  # half the window later: still spent
        assert not b.can_retry()
        await trio.sleep(5.5)  # the window slid past those requests and retries
        assert b.can_retry()

    run(main)


def test_without_a_floor_no_traffic_means_no_retries():
    async def main():
        b = RetryBudget(0.5, 0.0, 10.0)
        assert not b.can_retry()
        b.deposit()
        b.deposit()
        assert b.can_retry()
        b.withdraw()
        assert not b.can_retry()

    run(main)


class Ep:
    def __init__(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.ejected_until = float("-inf")
        self.readmitted_at = float("-inf")


def test_ejection_grows_is_capped_and_readmits():
    async def main():
        pol = OutlierPolicy(3, 10.0, 35.0, 50.0)
        eps = [Ep(), Ep(), Ep(), Ep()]
        a = eps[0]
        assert record(pol, a, eps, False) is None
        assert record(pol, a, eps, False) is None
        assert record(pol, a, eps, True) is None  # a success resets the count
        for _ in range(2):
            record(pol, a, eps, False)
        assert record(pol, a, eps, False) == 10.0
        assert a.ejected_until == trio.current_time() + 10
        await trio.sleep(10)  # readmitted; fails again: twice as long
        for _ in range(2):
            record(pol, a, eps, False)
        assert record(pol, a, eps, False) == 20.0
        await trio.sleep(20)
        for _ in range(2):
            record(pol, a, eps, False)
        assert record(pol, a, eps, False) == 35.0  # capped at max_ejection_seconds
        # the cap on the ejected share: 50% of 4 endpoints is 2
        b, c = eps[1], eps[2]
        for _ in range(3):
            record(pol, b, eps, False)
        assert b.ejected_until > trio.current_time()
        for _ in range(3):
            assert record(pol, c, eps, False) is None
        assert c.ejected_until < trio.current_time()
        await trio.sleep(35)  # a is back; after staying in max_ejection_seconds it starts over
        await trio.sleep(35)
        for _ in range(2):
            record(pol, a, eps, False)
        assert record(pol, a, eps, False) == 10.0

    run(main)


def _balancer(n: int) -> Balancer:
    return Balancer("api", [(f"10.0.0.{i}", 80) for i in range(n)], lambda k, h, p: (h, p))


def test_p2c_prefers_the_faster_endpoint_and_passes_over_ejected_ones():
    async def main():
        b = _balancer(2)
        fast, slow = b.endpoints
        now = trio.current_time()
        fast.observe(0.01, now)
        slow.observe(0.5, now)
        picks = [await b.pick() for _ in range(50)]
        assert all(p is fast for p in picks)
        fast.ejected_until = now + 5
        assert all([await b.pick() is slow for _ in range(20)])
        # a retry avoids the endpoint that just failed
        fast.ejected_until = float("-inf")
        assert all([await b.pick(avoid=fast) is slow for _ in range(20)])
        await trio.sleep(0)

    run(main)


def test_an_endpoint_down_by_its_health_check_is_passed_over_as_an_ejected_one():
    """The edge's active checks set `healthy`: in only while it and outlier detection agree."""

    async def main():
        b = _balancer(3)
        x, y, z = b.endpoints
        x.healthy = False
        y.ejected_until = trio.current_time() + 5
        assert all([await b.pick() is z for _ in range(30)])
        assert all([await b.pick(avoid=z) is z for _ in range(10)])  # nothing else is in
        x.healthy = True
        assert {await b.pick() for _ in range(60)} == {x, z}

    run(main)


def test_names_are_dialed_as_given_without_resolving():
    async def main():
        b = Balancer("web", [("backend.invalid", 80)], lambda k, h, p: None, resolve=False)
        ep = await b.pick()
        assert (ep.key, ep.host, ep.port) == ("web@backend.invalid:80", "backend.invalid", 80)

    run(main)


def test_pending_requests_raise_an_endpoints_cost():
    async def main():
        b = _balancer(2)
        x, y = b.endpoints
        x.observe(0.01, 0)
        y.observe(0.015, 0)
        x.pending = 3
        assert all([await b.pick() is y for _ in range(20)])

    run(main)


def test_names_are_resolved_again_after_the_refresh_interval():
    async def main():
        b = Balancer("api", [("localhost", 80)], lambda k, h, p: (h, p), dns_refresh=5.0)
        assert b.endpoints == []
        ep = await b.pick()
        assert ep.host in ("127.0.0.1", "::1")
        first = b.next_refresh
        await trio.sleep(6)
        await b.pick()
        assert b.next_refresh > first
        assert ep in b.endpoints  # the same address keeps its state

    run(main)


BASE = {
    "identity": {
        "spiffe_id": "spiffe://t.test/svc/a",
        "ca_url": "https://127.0.0.1:1",
        "ca_bundle": "x",
        "state_dir": "/tmp/x",
    },
    "app": {"port": 1},
    "inbound": {"listen": "127.0.0.1:1"},
    "admin": {"listen": "127.0.0.1:1"},
}


def test_traffic_policy_errors_are_reported_with_file_and_key_all_at_once():
    bad = {
        "endpoints": ["a:1"],
        "spiffe_id": "spiffe://t.test/svc/b",
        "timeouts": {"connect_seconds": 0, "per_try_seconds": "x", "bogus": 1},
        "retries": {"retry_on": ["sometimes", 404], "budget_ratio": 2, "max_attempts": 0},
        "outlier": {
            "max_ejected_percent": 101,
            "base_ejection_seconds": 10,
            "max_ejection_seconds": 5,
        },
        "circuit": {"max_requests": "many", "max_pending": 0},
        "dns_refresh_seconds": -1,
    }
    with pytest.raises(ConfigError) as exc:
        parse_config({**BASE, "outbound": {"upstreams": {"b": bad}}}, "side.yaml")
    p = "side.yaml: outbound.upstreams.b."
    got = exc.value.problems
    for k in (
        "timeouts.bogus: unknown key",
        "timeouts.connect_seconds: must be",
        "timeouts.per_try_seconds: must be",
        "retries.retry_on[0]: 'sometimes' is not",
        "retries.retry_on[1]: 404 is not",
        "retries.budget_ratio: must be",
        "retries.max_attempts: must be",
        "outlier.max_ejected_percent: must be",
        "outlier.max_ejection_seconds: must not be less",
        "circuit.max_requests: must be",
        "circuit.max_pending: must be",
        "dns_refresh_seconds: must be",
    ):
        assert any(g.startswith(p + k) for g in got), (k, got)
    assert len(got) == 12, got


def test_traffic_policy_keys_are_for_http_upstreams():
    tcp = {
        "endpoints": ["a:1"],
        "spiffe_id": "spiffe://t.test/svc/b",
        "protocol": "tcp",
        "local_port": 9000,
        "target_port": 5432,
        "retries": {"max_attempts": 2},
    }
    with pytest.raises(ConfigError) as exc:
        parse_config({**BASE, "outbound": {"upstreams": {"db": tcp}}}, "side.yaml")
    assert (
        "side.yaml: outbound.upstreams.db: retries: for http upstreams only" in exc.value.problems
    )


def test_a_budget_made_before_trio_runs_works_inside_it():
    b = RetryBudget(0.5, 0.0, 10.0)  # the sidecar builds its policies before trio.run

    async def main():
        b.deposit()
        b.deposit()
        assert b.can_retry()

    run(main)
