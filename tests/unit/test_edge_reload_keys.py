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
