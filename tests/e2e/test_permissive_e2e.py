"""End to end, permissive mode (`inbound.permissive`, issue 14): a real CA, two real sidecar
processes and the demo app; curl as a plaintext caller straight to api's mesh port, and
web's outbound (mTLS) as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.procs import Procs
from tests.e2e.test_sidecar_e2e import _sidecar_cfg, curl, init_pair_dir, sid

pytestmark = pytest.mark.e2e


def test_plaintext_and_mtls_callers_on_one_port(tmp_path: Path, procs: Procs) -> None:
    d = tmp_path
    ports = init_pair_dir(d)
    procs.start_ca(d / "ca", ports["ca"])
    api_cfg = _sidecar_cfg(d, "api", ports, [sid("web")], {})
    cfg = json.loads(api_cfg.read_text())
    cfg["inbound"]["permissive"] = True
    cfg["inbound"]["policies"] = [
        {"name": "legacy", "from": ["unauthenticated"], "methods": ["GET"], "paths": ["/v1/*"]}
    ]
    api_cfg.write_text(json.dumps(cfg))
    up = {"api": {"endpoints": [f"127.0.0.1:{ports['api_in']}"], "spiffe_id": sid("api")}}
    web_cfg = _sidecar_cfg(d, "web", ports, [], up)
    procs.start_web_api(ports, api_cfg, web_cfg)
    mesh = f"http://127.0.0.1:{ports['api_in']}"

    r = curl("-H", f"X-Forwarded-Client-Cert: URI={sid('web')}", f"{mesh}/v1/plain")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["path"] == "/v1/plain" and body["peer"] is None  # no XFCC reached the app
    assert "X-Meshcar-Authenticated: false" in body["headers"]

    r = curl("-o", "/dev/null", "-w", "%{http_code}", f"{mesh}/admin")
    assert r.stdout == "403"  # neither the allow list (web) nor any rule admits it there

    r = curl("-x", f"http://127.0.0.1:{ports['web_out']}", "http://api/admin")
    assert r.returncode == 0, r.stderr
    mtls = json.loads(r.stdout)
    assert mtls["peer"] == sid("web")  # the mTLS path is unchanged
    assert not any(h.lower().startswith("x-meshcar-authenticated") for h in mtls["headers"])

    metrics = curl(f"http://127.0.0.1:{ports['api_admin']}/metrics").stdout
    assert (
        'meshcar_peer_requests_total{code="2xx",direction="inbound",peer="unauthenticated"} 1.0'
        in metrics
    )
    assert (
        'meshcar_authz_decisions_total{decision="deny",policy="legacy",reason="path"} 1.0'
        in metrics
    )
    recent = json.loads(curl(f"http://127.0.0.1:{ports['api_admin']}/requests/recent").stdout)
    seen = {(e["peer"], e["path"], e["status"]) for e in recent["entries"]}
    assert {("unauthenticated", "/v1/plain", 200), ("unauthenticated", "/admin", 403)} <= seen
    assert (sid("web"), "/admin", 200) in seen
