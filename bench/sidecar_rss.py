"""Idle and after-load RSS of a real `meshcar sidecar` pair (join-token identity, built-in CA).

    .venv/bin/python bench/sidecar_rss.py [--requests 5000] [--clients 8] [--wrk-seconds 10]

Starts a CA, the demo app and two sidecars (web -> api) like tests/e2e/test_sidecar_e2e.py,
prints each sidecar's VmRSS once /ready, then after N keep-alive requests through web's
outbound proxy (http.client, absolute-URI requests), then after `wrk -t1 -c32` for
--wrk-seconds through the same proxy (Host: api; skipped when 0 or wrk is missing). Each
line also has PSS and USS from /proc/PID/smaps_rollup: the shared libraries' pages count
once per host in PSS, not once per sidecar. A measurement, never an assertion.
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.e2e.procs import Procs  # noqa: E402
from tests.e2e.test_sidecar_e2e import _sidecar_cfg, init_pair_dir, sid  # noqa: E402


def rss(pid: int) -> str:
    """VmRSS (anonymous + file-backed, i.e. shared libraries) and the thread count."""
    st = Path(f"/proc/{pid}/status").read_text()
    f = {
        k: re.search(rf"{k}:\s+(\d+)", st).group(1)
        for k in ("VmRSS", "RssAnon", "RssFile", "Threads")
    }  # type: ignore[union-attr]
    roll = Path(f"/proc/{pid}/smaps_rollup").read_text()
    r = {
        k: int(re.search(rf"^{k}:\s+(\d+)", roll, re.M).group(1))  # type: ignore[union-attr]
        for k in ("Pss", "Private_Clean", "Private_Dirty")
    }
    uss = r["Private_Clean"] + r["Private_Dirty"]
    return (
        f"{int(f['VmRSS']) / 1024:.1f} MB (anon {int(f['RssAnon']) / 1024:.1f}, "
        f"file {int(f['RssFile']) / 1024:.1f}; pss {r['Pss'] / 1024:.1f}, "
        f"uss {uss / 1024:.1f}; {f['Threads']} threads)"
    )


def run_wrk(port: int, seconds: int) -> str:
    wrk = shutil.which("wrk")
    if not wrk or seconds <= 0:
        return "wrk skipped"
    out = subprocess.run(
        [wrk, "-t1", "-c32", f"-d{seconds}s", "-H", "Host: api", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return f"wrk -t1 -c32 -d{seconds}s: {m.group(1) if m else '?'} requests" + (
        f", {bad.group(1)} not 2xx/3xx" if bad else ""
    )


def load(port: int, n: int) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    ok = 0
    for i in range(n):
        c.request("GET", f"http://api/r{i}")
        r = c.getresponse()
        r.read()
        ok += r.status == 200
    c.close()
    return ok


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--wrk-seconds", type=int, default=10)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ports = init_pair_dir(d)
        procs = Procs(d)
        try:
            procs.start(
                "ca", "ca", "serve", "--dir", str(d / "ca"), "--listen", f"127.0.0.1:{ports['ca']}"
            )
            procs.wait_http(
                f"https://127.0.0.1:{ports['ca']}/healthz",
                verify=str(d / "ca" / "root.pem"),
                name="ca",
            )
            api_cfg = _sidecar_cfg(d, "api", ports, [sid("web")], {})
            web_cfg = _sidecar_cfg(
                d,
                "web",
                ports,
                [],
                {"api": {"endpoints": [f"127.0.0.1:{ports['api_in']}"], "spiffe_id": sid("api")}},
            )
            procs.start("api-app", "demo-app", "--name", "api", "--port", str(ports["api_app"]))
            side = {
                "api": procs.start("api-sidecar", "sidecar", "--config", str(api_cfg)),
                "web": procs.start("web-sidecar", "sidecar", "--config", str(web_cfg)),
            }
            for n in side:
                procs.wait_http(
                    f"http://127.0.0.1:{ports[f'{n}_admin']}/ready", name=f"{n}-sidecar"
                )
            for n, pr in side.items():
                print(f"{n} sidecar idle (ready): {rss(pr.pid)}")
            per = args.requests // args.clients
            oks: list[int] = []
            ts = [
                threading.Thread(target=lambda: oks.append(load(ports["web_out"], per)))
                for _ in range(args.clients)
            ]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            print(f"{sum(oks)} of {per * args.clients} requests answered 200")
            for n, pr in side.items():
                print(f"{n} sidecar after load: {rss(pr.pid)}")
            print(run_wrk(ports["web_out"], args.wrk_seconds))
            for n, pr in side.items():
                print(f"{n} sidecar after wrk: {rss(pr.pid)}")
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
