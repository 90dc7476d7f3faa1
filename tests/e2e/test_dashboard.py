"""`meshcar dashboard` in a real headless browser (Debian's Chromium, its own headless mode)
against real processes: a CA, two sidecars (web calls api), an edge with a terminate and a
passthrough route, and the dashboard reading their admin listeners. The rendered DOM (after
the page's JavaScript ran) must show the services, the web -> api edge with a success rate,
a certificate's time to expiry, the edge's routes by mode and a request made by the test in
the live tail. The screenshot of the same page is docs/dashboard.png."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
import trustme

from tests.e2e.procs import Procs, free_port
from tests.e2e.test_sidecar_e2e import _sidecar_cfg, init_pair_dir, sid

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium")
ROOT = Path(__file__).resolve().parents[2]


def _chromium(url: str, profile: Path, *extra: str) -> str:
    """The DOM of `url` after its scripts ran (virtual time lets the fetches finish); with
    `extra` (e.g. --screenshot=FILE) instead of the DOM dump."""
    r = subprocess.run(
        [CHROMIUM or "chromium", "--headless=new", "--no-sandbox", "--disable-gpu"]
        + ["--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
        + ["--window-size=1400,1100", *(extra or ["--dump-dom"]), url],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _loaded_dom(url: str, profile: Path, attempts: int = 5) -> str:
    """The DOM once the page rendered /api/mesh (body data-loaded="1"): on a loaded machine
    the first fetch may not finish within Chromium's virtual-time budget, so ask again."""
    dom = ""
    for _ in range(attempts):
        dom = _chromium(url, profile)
        if 'data-loaded="1"' in dom:
            return dom
    raise AssertionError(f"the page never rendered /api/mesh:\n{dom[:3000]}")


def _text(dom: str, table_id: str) -> str:
    """The text of the table with this id (tags dropped, entities decoded)."""
    m = re.search(rf'<table id="{table_id}">(.*?)</table>', dom, re.S)
    assert m, f"no table {table_id} in the DOM:\n{dom[:3000]}"
    return html.unescape(re.sub(r"<[^>]+>", " ", m.group(1)))


def _edge(procs: Procs, d: Path, ports: dict[str, int]) -> dict[str, int]:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "site-ca.pem"))
    ca.issue_cert("www.test").private_key_and_cert_chain_pem.write_to_path(str(d / "site.pem"))
    e = {"https": free_port(), "admin": free_port()}
    (d / "edge.yaml").write_text(
        f"listen: {{https: '127.0.0.1:{e['https']}'}}\nadmin: {{listen: '127.0.0.1:{e['admin']}'}}\n"
        "routes:\n"
        "  - {host: www.test, mode: terminate, tls: {cert: site.pem, key: site.pem},"
        f" backend: {{endpoints: ['127.0.0.1:{ports['api_app']}']}}}}\n"
        "  - {host: api.mesh.test, mode: passthrough,"
        f" backend: {{endpoints: ['127.0.0.1:{ports['api_in']}']}}}}\n"
    )
    procs.start("edge", "edge", "--config", str(d / "edge.yaml"))
    procs.wait_ready(e["admin"], "edge")
    return e


def _curl(*args: str) -> str:
    r = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", *args],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_dashboard_in_headless_chromium(tmp_path: Path, procs: Procs) -> None:
    d = tmp_path
    ports = init_pair_dir(d)
    procs.start_ca(d / "ca", ports["ca"])
    api_cfg = _sidecar_cfg(d, "api", ports, [sid("web")], {})
    up = {"api": {"endpoints": [f"127.0.0.1:{ports['api_in']}"], "spiffe_id": sid("api")}}
    web_cfg = _sidecar_cfg(d, "web", ports, [], up)
    procs.start_web_api(ports, api_cfg, web_cfg)
    edge = _edge(procs, d, ports)
    dash = free_port()
    procs.start(
        "dashboard",
        "dashboard",
        "--listen",
        f"127.0.0.1:{dash}",
        "--admin",
        f"web=http://127.0.0.1:{ports['web_admin']}",
        "--admin",
        f"api=http://127.0.0.1:{ports['api_admin']}",
        "--admin",
        f"edge=http://127.0.0.1:{edge['admin']}",
    )
    procs.wait_http(f"http://127.0.0.1:{dash}/api/mesh", name="dashboard")

    # traffic: web -> api through the mesh (one refused: an unknown path still answers),
    # and one request through the edge's terminate route, its path unique to this run
    proxy = f"http://127.0.0.1:{ports['web_out']}"
    for _ in range(5):
        assert _curl("-x", proxy, "http://api/v1/hello") == "200"
    probe = f"/dashboard-probe-{uuid.uuid4().hex[:8]}"
    resolve = f"www.test:{edge['https']}:127.0.0.1"
    url = f"https://www.test:{edge['https']}{probe}"
    assert _curl("--resolve", resolve, "--cacert", str(d / "site-ca.pem"), url) == "200"

    mesh = httpx.get(f"http://127.0.0.1:{dash}/api/mesh", timeout=10).json()
    edges = {(e["caller"], e["callee"]): e for e in mesh["edges"]}
    assert edges[("web", "api")]["requests"] >= 5, mesh["edges"]
    assert edges[("web", "api")]["success_rate"] == 1.0
    assert edges[("web", "api")]["source"] == "metrics"  # api's per-peer counters

    dom = _loaded_dom(f"http://127.0.0.1:{dash}/", d / "chrome")
    services = _text(dom, "services")
    for name in ("web", "api", "edge"):
        assert re.search(rf"\b{name}\b", services), services
    calls = _text(dom, "edges")
    assert re.search(r"web\s+→\s+api\s+\d+\s+100\.0%", calls), calls
    certs = _text(dom, "certs")
    assert sid("api") in certs and sid("web") in certs, certs
    assert re.search(r"\d+h \d+m|\d+d \d+h|\d+m \d+s", certs), certs  # time to expiry
    terminate, passthrough = _text(dom, "routes-terminate"), _text(dom, "routes-passthrough")
    assert "www.test" in terminate and "api.mesh.test" in passthrough
    tail = _text(dom, "tail")
    assert probe in tail and "edge" in tail, tail

    if os.environ.get("MESHCAR_DASHBOARD_SCREENSHOT"):  # refresh docs/dashboard.png
        shot = ROOT / "docs" / "dashboard.png"
        _chromium(f"http://127.0.0.1:{dash}/", d / "chrome", f"--screenshot={shot}")
        assert shot.stat().st_size > 10_000
    # the live tail is served on loopback only; its JSON names this request
    recent = httpx.get(f"http://127.0.0.1:{edge['admin']}/requests/recent").json()
    assert any(e.get("path") == probe for e in recent["entries"]), json.dumps(recent)[:2000]
