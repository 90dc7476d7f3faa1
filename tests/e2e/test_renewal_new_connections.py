"""Real processes: after a renewal (client side, then server side), connections opened once
the pool's idle timeout has passed, and bursts, still work and no sidecar exits.

This is round 1's renewal crash as a user met it: `meshcar cert renew`, a lull longer than
the pool's idle timeout, then a request; the sidecar died with "Session refers to a
different SSLContext". Here the idle timeout is set to 0.5 s (`outbound.pool_idle_seconds`)
so the lull is short; waiting past it is one-sided (the connection is then certainly idle
for longer than the timeout), not a race.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.procs import Procs, meshcar_cmd
from tests.e2e.test_sidecar_e2e import _sidecar_cfg, curl, init_pair_dir, sid

pytestmark = pytest.mark.e2e
IDLE = 0.5


def _metric(admin: str, name: str, labels: str) -> float:
    text = curl(f"http://{admin}/metrics").stdout
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_renewals_then_new_connections_and_bursts(tmp_path) -> None:
    d = tmp_path
    ports = init_pair_dir(d)
    procs = Procs(d)
    try:
        procs.start(
            "ca", "ca", "serve", "--dir", str(d / "ca"), "--listen", f"127.0.0.1:{ports['ca']}"
        )
        procs.wait_http(
            f"https://127.0.0.1:{ports['ca']}/healthz", verify=str(d / "ca" / "root.pem")
        )
        api_cfg = _sidecar_cfg(d, "api", ports, [sid("web")], {})
        web_cfg = _sidecar_cfg(
            d,
            "web",
            ports,
            [],
            {"api": {"endpoints": [f"127.0.0.1:{ports['api_in']}"], "spiffe_id": sid("api")}},
        )
        cfg = json.loads(web_cfg.read_text())
        cfg["outbound"]["pool_idle_seconds"] = IDLE
        web_cfg.write_text(json.dumps(cfg))
        procs.start("api-app", "demo-app", "--name", "api", "--port", str(ports["api_app"]))
        api = procs.start("api-sidecar", "sidecar", "--config", str(api_cfg))
        web = procs.start("web-sidecar", "sidecar", "--config", str(web_cfg))
        for n in ("api", "web"):
            procs.wait_http(f"http://127.0.0.1:{ports[f'{n}_admin']}/ready", name=f"{n}-sidecar")
        proxy = f"http://127.0.0.1:{ports['web_out']}"
        web_admin = f"127.0.0.1:{ports['web_admin']}"

        def get(path: str) -> str:
            return curl(
                "-x", proxy, "-o", "/dev/null", "-w", "%{http_code}", f"http://api{path}"
            ).stdout

        def burst(n: int) -> list[str]:
            with ThreadPoolExecutor(n) as ex:
                return list(ex.map(get, [f"/burst{i}" for i in range(n)]))

        assert get("/first") == "200"
        time.sleep(IDLE * 2)
        assert get("/resumed") == "200"  # a new connection resuming the cached session
        assert (
            _metric(
                web_admin, "meshcar_tls_handshakes_total", 'direction="outbound",result="resumed"'
            )
            >= 1
        )

        for who in ("web", "api"):  # the client's credential, then the server's
            r = subprocess.run(
                meshcar_cmd("cert", "renew", "--admin", f"127.0.0.1:{ports[f'{who}_admin']}"),
                capture_output=True,
                text=True,
            )
            assert r.returncode == 0 and json.loads(r.stdout)["renewed"], r.stdout + r.stderr
            time.sleep(IDLE * 2)  # the lull: every pooled connection is now past its idle timeout
            assert get(f"/after-{who}-renewal") == "200", procs.log("web-sidecar")[-3000:]
            assert burst(8) == ["200"] * 8
            assert web.poll() is None and api.poll() is None
        assert (
            _metric(
                web_admin, "meshcar_tls_handshakes_total", 'direction="outbound",result="failure"'
            )
            == 0
        )
        assert "different SSLContext" not in procs.log("web-sidecar")
        assert "Traceback" not in procs.log("web-sidecar") + procs.log("api-sidecar")
    finally:
        procs.stop_all()
