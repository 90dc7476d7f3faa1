"""Idle and after-load RSS of a real `meshcar sidecar` pair (join-token identity, built-in CA).

    .venv/bin/python bench/sidecar_rss.py [--requests 5000] [--clients 8]

Starts a CA, the demo app and two sidecars (web -> api) like tests/e2e/test_sidecar_e2e.py,
prints each sidecar's VmRSS once /ready, then after N keep-alive requests through web's
outbound proxy (http.client, absolute-URI requests). A measurement, never an assertion.
"""

from __future__ import annotations

import argparse
import http.client
import re
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
    return (
        f"{int(f['VmRSS']) / 1024:.1f} MB (anon {int(f['RssAnon']) / 1024:.1f}, "
        f"file {int(f['RssFile']) / 1024:.1f}; {f['Threads']} threads)"
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
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
