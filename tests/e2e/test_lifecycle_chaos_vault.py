"""Issue 9's lifecycle chaos test for sidecars issuing from OpenBao (real processes).

The OpenBao side is tests/e2e/test_vault_ha.py's `cluster`: three non-dev `bao server` nodes
with raft storage on loopback, initialised and unsealed, so a node that was stopped comes
back with its data (PKI mounts, roles, AppRoles) after `restart_all` (start + unseal). The
issuing CA therefore never changes: this test has NO bundle change (the built-in-CA version,
tests/e2e/test_lifecycle_chaos.py, covers the bundle change with a root rotation).

A web -> api sidecar pair (start_pair: `identity.vault` with each sidecar's AppRole)
with `TTL` = 20 s certificates (30 s lifetime with the role's 10 s backdating), renewed at
half the lifetime, web's outbound pool closing idle connections after `IDLE` = 2 s.
Traffic is test_lifecycle_chaos's recorder on the web -> api path only (a keep-alive client
and a new connection per request through web's outbound proxy, bursts of 6 new connections,
idle gaps of IDLE + 1 s), throughout.

Scenario, advanced on observable events: forced renewals (`meshcar cert renew`, i.e. the
admin POST /renew, web then api); a whole-cluster outage shorter than the remaining lifetime
(starts just after forced renewals, ends once each sidecar has seen a failed renewal); a
whole-cluster outage longer than the lifetime (both certificates expire, the cluster
returns, both sidecars re-bootstrap with their AppRole).

Asserted: no process exits; no request fails outside the window in which no valid
certificate could exist (earliest notAfter - 1 s until the later first re-issue after the
cluster's return + 1 s, polled every 0.1 s); a full rhythm cycle after recovery is clean.
"""

from __future__ import annotations

import datetime as dt
import ssl
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_lifecycle_chaos import Traffic, _ts, forced_renewals
from tests.e2e.test_rotation_soak import Mesh, _report, wait_until
from tests.e2e.test_vault_ha import Cluster, cluster, start_pair  # noqa: F401 (fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.soak]
TTL = 20
IDLE = 2.0
NAMES = ("web", "api")


class PairTraffic(Traffic):
    """The chaos recorder without the edge: only the web -> api ("mesh") path."""

    def _edge_keepalive(self) -> None:
        self._busy["edge_keepalive"] = False

    def _edge_fresh(self) -> None:
        self._busy["edge_fresh"] = False

    def edge_fresh_once(self, stream: str, n: int) -> None:
        return None


def _ready(mesh: Mesh, n: str) -> int:
    return httpx.get(f"{mesh.admin(n)}/ready", timeout=5).status_code


def short_outage(mesh: Mesh, c: Cluster) -> dict:
    for n in NAMES:  # fresh certificates: the whole lifetime is ahead
        assert httpx.post(f"{mesh.admin(n)}/renew", timeout=30).json()["renewed"]
    held = {n: mesh.certs(n)["serial"] for n in NAMES}
    not_after = min(_ts(mesh.certs(n)["not_after"]) for n in NAMES)
    failures = {n: mesh.renewals(n, "failure") for n in NAMES}
    down = time.time()
    for node in c.nodes:
        c.kill(node)
    wait_until(
        "each sidecar's renewal to meet the outage",
        lambda: all(mesh.renewals(n, "failure") > failures[n] for n in NAMES),
        TTL,
        0.1,
    )
    c.restart_all()
    up = time.time()
    wait_until(
        "both sidecars to renew after the short outage",
        lambda: all(mesh.certs(n)["serial"] != held[n] for n in NAMES),
        TTL,
        0.1,
    )
    assert time.time() < not_after, "renewed before the held certificates expired"
    assert all(_ready(mesh, n) == 200 for n in NAMES)
    return {
        "outage_s": round(up - down, 1),
        "left_of_lifetime_at_return_s": round(not_after - up, 1),
        "failed_renewals_during": {n: mesh.renewals(n, "failure") - failures[n] for n in NAMES},
    }


def long_outage(mesh: Mesh, c: Cluster) -> dict:
    for node in c.nodes:
        c.kill(node)
    down = time.time()
    held = {n: mesh.certs(n) for n in NAMES}  # nothing can replace them now
    not_after = {n: _ts(held[n]["not_after"]) for n in NAMES}
    lifetime = max(_ts(held[n]["not_after"]) - _ts(held[n]["not_before"]) for n in NAMES)
    wait_until(
        "both sidecars to report an expired identity (a renewal attempt after notAfter)",
        lambda: all(mesh.metric(n, "meshcar_identity_expired") == 1 for n in NAMES),
        lifetime + 60,
        0.1,
    )
    assert all(mesh.certs(n)["state"] == "expired" for n in NAMES)
    assert all(_ready(mesh, n) == 503 for n in NAMES)
    time.sleep(max(0.0, down + lifetime + 1.0 - time.time()))  # the outage's length: scenario
    c.restart_all()
    up = time.time()
    reissued: dict[str, float] = {}
    deadline = time.monotonic() + 120
    while len(reissued) < len(NAMES):
        for n in NAMES:
            if n not in reissued and mesh.certs(n)["serial"] != held[n]["serial"]:
                reissued[n] = time.time()
        assert time.monotonic() < deadline, f"not re-issued within 120 s: {reissued}"
        time.sleep(0.1)  # polling /certs; the window's end is measured to this resolution
    for n in NAMES:
        wait_until(f"{n} to be ready again", lambda n=n: _ready(mesh, n) == 200, 10)
        log = mesh.procs.log(f"{n}-sidecar")
        assert '"how": "re-bootstrapped after expiry"' in log, log[-3000:]
    return {
        "down": down,
        "up": up,
        "not_after": not_after,
        "reissued": reissued,
        "lifetime_s": lifetime,
    }


def test_lifecycle_chaos_sidecars_issuing_from_openbao(cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    cluster.ensure_all_up()
    mesh = start_pair(
        tmp_path, cluster, [n.addr for n in cluster.nodes], ttl=TTL, fraction=0.5, pool_idle=IDLE
    )
    t_start = time.time()
    timeline: dict[str, float] = {}

    def mark(what: str) -> None:
        timeline[what] = round(time.time() - t_start, 1)

    try:
        with PairTraffic(mesh, ssl.create_default_context()) as traffic:
            wait_until("a first rhythm cycle", lambda: traffic.cycles >= 1, 60)
            mark("warm")
            forced_renewals(mesh, traffic)
            mark("forced_renewals")
            short = short_outage(mesh, cluster)
            mark("short_outage")
            before_long = [r for r in traffic.records if not r.ok]
            assert before_long == [], f"failures before the long outage: {before_long[:5]}"
            lo = long_outage(mesh, cluster)
            mark("long_outage")
            c = traffic.cycles
            wait_until("two rhythm cycles after recovery", lambda: traffic.cycles >= c + 2, 60)
            mark("end")
        alive = {name: p.poll() for name, p in mesh.procs.procs}
        assert all(rc is None for rc in alive.values()), alive
        assert all(n.alive() for n in cluster.nodes)

        win = (min(lo["not_after"].values()) - 1.0, max(lo["reissued"].values()) + 1.0)
        records = traffic.records
        assert {r.path for r in records} == {"mesh"}
        outside = [r for r in records if not r.ok and not (r.t0 <= win[1] and r.t1 >= win[0])]
        inside_failed = [r for r in records if not r.ok and r not in outside]
        after = [r for r in records if r.t0 > win[1]]
        assert not outside, (
            f"{len(outside)} failures outside the no-valid-certificate window: "
            f"{[(round(r.t0 - t_start, 1), r.stream, r.detail) for r in outside[:8]]}"
        )
        assert after and all(r.ok for r in after)
        assert {r.stream for r in after} >= {"keepalive", "fresh", "burst"}
        for name in ("web-sidecar", "api-sidecar"):
            assert "Traceback" not in mesh.procs.log(name), mesh.procs.log(name)[-3000:]
        hs = {
            k: int(
                mesh.metric(
                    "web", f'meshcar_tls_handshakes_total{{direction="outbound",result="{k}"}}'
                )
            )
            for k in ("full", "resumed", "failure")
        }
        assert hs["full"] + hs["resumed"] >= traffic.cycles, hs  # idle gaps retired connections
        now = dt.datetime.now(dt.UTC).timestamp()
        result = {
            "ttl_s": TTL,
            "pool_idle_s": IDLE,
            "timeline_s": timeline,
            "short_outage": short,
            "long_outage": {
                "outage_s": round(lo["up"] - lo["down"], 1),
                "lifetime_s": lo["lifetime_s"],
                "cluster_back_after_expiry_s": {
                    n: round(lo["up"] - lo["not_after"][n], 1) for n in NAMES
                },
                "reissued_after_cluster_back_s": {
                    n: round(lo["reissued"][n] - lo["up"], 1) for n in NAMES
                },
                "window_s": round(win[1] - win[0], 1),
                "failed_in_window": len(inside_failed),
                "ok_in_window": sum(1 for r in records if r.ok and win[0] <= r.t0 <= win[1]),
            },
            "requests": len(records),
            "failed": len(inside_failed) + len(outside),
            "failed_outside_window": len(outside),
            "cycles": traffic.cycles,
            "web_outbound_handshakes": hs,
            "renewals": {n: mesh.renewals(n) for n in NAMES},
            "seconds": round(now - t_start, 1),
        }
        _report(mesh, "lifecycle_vault", result)
    finally:
        mesh.procs.stop_all()
