"""The edge's backends across a config reload (edge/http.py `Backends.reconfigure`): a target
whose balancing did not change keeps its balancer; one whose connections would differ (here
the bridge backend's SPIFFE ID) gets new pool keys, so a pooled connection made for the old
settings is never handed out again; a removed target can still be dialed by a request
decided before the swap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshcar.admin.metrics import Metrics
from meshcar.edge.config import parse_edge_config
from meshcar.edge.http import Backends
from meshcar.tls.store import CredentialStore


def _cfg(tmp: Path, api_id: str, extra: list[dict[str, Any]] = ()):  # noqa: ANN202
    data = {
        "listen": {"https": "127.0.0.1:8443"},
        "admin": {"listen": "127.0.0.1:7204"},
        "identity": {
            "spiffe_id": "spiffe://t.test/edge",
            "ca_url": "https://127.0.0.1:1",
            "ca_bundle": "x",
            "state_dir": str(tmp / "state"),
        },
        "routes": [
            {
                "host": "api.t.test",
                "mode": "bridge",
                "tls": {"cert": "site.pem", "key": "site.pem"},
                "backend": {"endpoints": ["127.0.0.1:7002"], "spiffe_id": api_id},
            },
            {
                "host": "www.t.test",
                "mode": "terminate",
                "tls": {"cert": "site.pem", "key": "site.pem"},
                "backend": {"endpoints": ["127.0.0.1:7003"]},
            },
            *extra,
        ],
    }
    return parse_edge_config(data, "edge.yaml", tmp)


def test_reload_keeps_unchanged_balancers_and_rekeys_changed_targets(tmp_path: Path) -> None:
    old = _cfg(tmp_path, "spiffe://t.test/svc/api")
    b = Backends(old, CredentialStore(tmp_path / "state"), Metrics())
    www, api = b.balancers["www.t.test"], b.balancers["api.t.test"]
    api_key = b.key("api.t.test", api.states[0])
    www_key = b.key("www.t.test", www.states[0])
    b.reconfigure(_cfg(tmp_path, "spiffe://t.test/svc/api-v2"))()
    assert b.balancers["www.t.test"] is www and b.balancers["api.t.test"] is api
    assert b.key("www.t.test", www.states[0]) == www_key  # its pooled connections still serve
    new_key = b.key("api.t.test", api.states[0])
    assert new_key != api_key and new_key.endswith("|127.0.0.1:7002")
    assert b.targets["api.t.test"][1].spiffe_id == "spiffe://t.test/svc/api-v2"


def test_a_removed_target_is_still_known_to_the_dialer(tmp_path: Path) -> None:
    extra = [
        {
            "host": "old.t.test",
            "mode": "terminate",
            "tls": {"cert": "site.pem", "key": "site.pem"},
            "backend": {"endpoints": ["127.0.0.1:7004"]},
        }
    ]
    b = Backends(_cfg(tmp_path, "spiffe://t.test/svc/api", extra), None, Metrics())
    b.reconfigure(_cfg(tmp_path, "spiffe://t.test/svc/api"))()
    assert "old.t.test" not in b.targets and "old.t.test" in b._retired


def _policy_route(host: str, port: int, **policy: Any) -> dict[str, Any]:
    return {
        "host": host,
        "mode": "terminate",
        "tls": {"cert": "site.pem", "key": "site.pem"},
        "backend": {"endpoints": [f"127.0.0.1:{port}"]},
        **policy,
    }


def test_reload_keeps_an_unchanged_traffic_policy_and_rebuilds_a_changed_one(
    tmp_path: Path,
) -> None:
    """A target's policy (net/resilient.py) carries its budget, endpoint health and
    ejections across a reload that leaves it alone; a changed policy is made anew and the
    pool's per-target limits follow (circuit.max_connections, timeouts.idle_seconds)."""
    api = "spiffe://t.test/svc/api"
    keep = _policy_route("keep.t.test", 7004, retries={"max_attempts": 2})
    old = _cfg(
        tmp_path, api, [keep, _policy_route("chg.t.test", 7005, circuit={"max_requests": 5})]
    )
    b = Backends(old, CredentialStore(tmp_path / "state"), Metrics())
    kept, changed = b.policies["keep.t.test"], b.policies["chg.t.test"]
    assert "www.t.test" not in b.policies  # no policy keys: the plain path
    kept.balancer.endpoints[0].failures = 3  # state that must survive
    new = _policy_route(
        "chg.t.test", 7005, circuit={"max_connections": 3}, timeouts={"idle_seconds": 2}
    )
    b.reconfigure(_cfg(tmp_path, api, [keep, new]))()
    assert b.policies["keep.t.test"] is kept and kept.balancer.endpoints[0].failures == 3
    assert b.policies["chg.t.test"] is not changed
    assert b.pool.group_limits == {"chg.t.test": 3}
    assert b.pool.idle_timeouts == {"chg.t.test": 2.0}
    assert b.policies["chg.t.test"].balancer.endpoints[0].key == "chg.t.test@127.0.0.1:7005"
