"""Hot reload of real `meshcar sidecar` processes (common/reload.py): SIGHUP to a `workers: 2`
parent reloads both workers of the called sidecar; its allow list changed under continuous
load through the caller's sidecar with no failed request; an invalid file rejected with the
reason (log, metric, GET /config/status) while the old allow list still decides; the
change applied (the caller removed: 403)."""

from __future__ import annotations

import http.client
import json
import re
import signal
import threading
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import Procs, wait_until
from tests.e2e.test_workers import _ports, ca, sid, sidecar_cfg, start_pair  # noqa: F401 (fixture)

pytestmark = pytest.mark.e2e


def _reloads(admin: int, result: str) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10).text
    out: dict[str, float] = {}
    pat = r"^meshcar_config_reloads_total\{([^}]*)\} (\S+)$"
    for labels, value in re.findall(pat, text, re.M):
        if f'result="{result}"' in labels:
            worker = re.search(r'worker="(\d+)"', labels)
            out[worker.group(1) if worker else "0"] = float(value)
    return out


def _rewrite(path: Path, allow: list[str], extra: dict | None = None) -> None:
    cfg = json.loads(path.read_text())
    cfg["inbound"]["allow"] = allow
    cfg.update(extra or {})
    new = path.with_suffix(".new")
    new.write_text(json.dumps(cfg))
    new.replace(path)


def _status(out_port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", out_port, timeout=10)
    try:
        conn.request("GET", "http://api/hello")
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def test_sidecar_allow_list_reload_under_load_two_workers(ca, tmp_path: Path, procs: Procs) -> None:  # noqa: ANN001, F811
    d, ca_port = ca
    api, web = _ports(), _ports()
    api_cfg = sidecar_cfg(d, ca_port, "api", api, {}, workers=2)
    up = {"api": {"endpoints": [f"127.0.0.1:{api['in']}"], "spiffe_id": sid("api")}}
    web_cfg = sidecar_cfg(d, ca_port, "web", web, up)
    api_p, _ = start_pair(procs, api, api_cfg, web, web_cfg)

    statuses: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def load() -> None:  # keep-alive requests through web's outbound, pooled mesh conns
        conn = http.client.HTTPConnection("127.0.0.1", web["out"], timeout=10)
        while not stop.is_set():
            try:
                conn.request("GET", "http://api/hello")
                r = conn.getresponse()
                r.read()
                statuses.append(r.status)
            except (OSError, http.client.HTTPException) as exc:
                errors.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", web["out"], timeout=10)
        conn.close()

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: len(statuses) >= 50, "load to run")

    # valid: another caller added; both workers reload, SIGHUP stops nothing
    _rewrite(api_cfg, [sid("web"), sid("ops")])
    api_p.send_signal(signal.SIGHUP)
    wait_until(lambda: _reloads(api["admin"], "success") == {"0": 1, "1": 1}, "both workers")
    assert api_p.poll() is None
    st = httpx.get(f"http://127.0.0.1:{api['admin']}/config/status", timeout=5).json()
    assert st["last_reload"]["result"] == "success" and st["restart_required"] == []

    # invalid: rejected by both with the reason; web still served
    _rewrite(api_cfg, [sid("web"), "nope"])
    api_p.send_signal(signal.SIGHUP)
    wait_until(lambda: _reloads(api["admin"], "failure") == {"0": 1, "1": 1}, "both rejected")
    st = httpx.get(f"http://127.0.0.1:{api['admin']}/config/status", timeout=5).json()
    assert "inbound.allow[1]" in st["last_reload"]["error"], st
    assert procs.log("api").count('"event": "sidecar.config.reload_failed"') == 2
    at = len(statuses)
    wait_until(lambda: len(statuses) >= at + 50, "load to go on")
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert errors == [] and set(statuses) == {200}, (errors[:3], set(statuses))

    # applied: web removed from the allow list is refused (by every worker)
    _rewrite(api_cfg, [sid("ops")])
    api_p.send_signal(signal.SIGHUP)
    wait_until(lambda: _reloads(api["admin"], "success") == {"0": 2, "1": 2}, "both applied")
    assert {_status(web["out"]) for _ in range(16)} == {403}
