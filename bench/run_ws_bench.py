#!/usr/bin/env python3
"""Issue 13: WebSocket throughput through a sidecar pair, meshcar against nginx.

    .venv/bin/python bench/run_ws_bench.py [--mib 256] [--rounds 3]

A script, not a test. Both pairs carry the same upload of 1 MiB binary WebSocket messages
from the same `websockets` client to the same app (a `websockets` server in its own
process that counts what it receives and answers the count):

- nginx: outbound nginx `http` (plain in; `proxy_pass https://`, a client certificate,
  `proxy_ssl_verify on`, TLS 1.3; `Upgrade`/`Connection` passed as nginx's WebSocket
  guide says) -> inbound nginx (`ssl_verify_client on`) -> app;
- meshcar: `meshcar sidecar` a (outbound listener, Host `sink`) -> mTLS -> `meshcar
  sidecar` b (inbound, allow a) -> app.

Each round runs nginx then meshcar; the median MiB/s of each, the ratio, and the CPU
seconds the two proxies used per GiB are printed with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from websockets.sync.client import connect

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from run_mesh_bench import (  # noqa: E402
    TRUST_DOMAIN,
    cpu_seconds,
    free_ports,
    nginx_pki,
    run_meshcar_cmd,
    say,
)

from meshcar.demo.plan import Probe, ProcSpec, meshcar_argv  # noqa: E402
from meshcar.demo.supervisor import Supervisor  # noqa: E402

MSG = 1 << 20

APP = r"""
import sys
from websockets.sync.server import serve
def handler(ws):
    n = 0
    for m in ws:
        if isinstance(m, str):
            ws.send(str(n)); n = 0
        else:
            n += len(m)
with serve(handler, "127.0.0.1", int(sys.argv[1]), max_size=None, compression=None,
           ping_interval=None) as s:
    s.serve_forever()
"""

NGINX_HTTP = """
daemon off;
worker_processes 1;
pid @@PREFIX@@/nginx.pid;
error_log @@PREFIX@@/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path @@PREFIX@@/tmp; proxy_temp_path @@PREFIX@@/tmp;
    fastcgi_temp_path @@PREFIX@@/tmp; uwsgi_temp_path @@PREFIX@@/tmp; scgi_temp_path @@PREFIX@@/tmp;
    server { listen 127.0.0.1:@@PROBE@@; location / { return 200 "ok\\n"; } }
    server {
        @@SERVER@@
        location / {
            proxy_pass @@UPSTREAM@@;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
            @@PROXY_SSL@@
        }
    }
}
"""

OUT_SSL = """proxy_ssl_protocols TLSv1.3;
            proxy_ssl_certificate @@CERTS@@/a.pem;
            proxy_ssl_certificate_key @@CERTS@@/a.key;
            proxy_ssl_trusted_certificate @@CERTS@@/root.pem;
            proxy_ssl_verify on;
            proxy_ssl_name b.mesh;
            proxy_ssl_server_name on;"""

IN_SERVER = """listen 127.0.0.1:@@IN@@ ssl;
        ssl_protocols TLSv1.3;
        ssl_certificate @@CERTS@@/b.pem;
        ssl_certificate_key @@CERTS@@/b.key;
        ssl_client_certificate @@CERTS@@/root.pem;
        ssl_verify_client on;"""


def upload(port: int, mib: int) -> float:
    """Seconds to send `mib` 1 MiB messages and get the app's count back."""
    data = os.urandom(MSG)
    sock = socket.create_connection(("127.0.0.1", port))
    with connect(
        "ws://sink/up", sock=sock, max_size=None, compression=None, proxy=None, ping_interval=None
    ) as ws:
        t0 = time.perf_counter()
        for _ in range(mib):
            ws.send(data)
        ws.send("count")
        got = int(ws.recv(timeout=120))
        took = time.perf_counter() - t0
    if got != mib * MSG:
        raise SystemExit(f"bench: the app counted {got}, sent {mib * MSG}")
    return took


def nginx_pair(sup: Supervisor, nginx: str, work: Path, app: int) -> tuple[int, list[int]]:
    certs = work / "nginx-certs"
    nginx_pki(certs)
    out_port, in_port, p1, p2 = free_ports(4)
    children = []
    roles = (
        ("inbound", IN_SERVER, f"http://127.0.0.1:{app}", "", p1),
        ("outbound", f"listen 127.0.0.1:{out_port};", f"https://127.0.0.1:{in_port}", OUT_SSL, p2),
    )
    for role, server, upstream, proxy_ssl, probe in roles:
        prefix = work / f"nginx-{role}"
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        text = NGINX_HTTP.replace("@@SERVER@@", server).replace("@@PROXY_SSL@@", proxy_ssl)
        values = {
            "PREFIX": str(prefix),
            "PROBE": str(probe),
            "IN": str(in_port),
            "UPSTREAM": upstream,
            "CERTS": str(certs),
        }
        for k, v in values.items():
            text = text.replace(f"@@{k}@@", v)
        conf = prefix / "nginx.conf"
        conf.write_text(text)
        spec = ProcSpec(
            f"nginx-{role}",
            (nginx, "-p", str(prefix), "-c", str(conf)),
            Probe(f"http://127.0.0.1:{probe}/"),
        )
        children.append(sup.start(spec, work / "logs" / f"{spec.name}.log"))
    sup.wait_ready(children, timeout=30)
    return out_port, [c.proc.pid for c in children]


def meshcar_pair(sup: Supervisor, work: Path, app: int) -> tuple[int, list[int]]:
    ca_port, a_in, a_admin, b_in, b_admin, out = free_ports(6)
    ca_dir = work / "ca"
    run_meshcar_cmd("ca", "init", "--dir", str(ca_dir), "--trust-domain", TRUST_DOMAIN)
    ca = ProcSpec(
        "meshcar-ca",
        meshcar_argv("ca", "serve", "--dir", str(ca_dir), "--listen", f"127.0.0.1:{ca_port}"),
        Probe(f"https://127.0.0.1:{ca_port}/healthz", cafile=ca_dir / "root.pem"),
    )
    sup.wait_ready([sup.start(ca, work / "logs" / "meshcar-ca.log")], timeout=30)
    ids = {n: f"spiffe://{TRUST_DOMAIN}/svc/{n}" for n in ("a", "b")}
    children = []
    upstreams = {"sink": {"endpoints": [f"127.0.0.1:{b_in}"], "spiffe_id": ids["b"]}}
    for name, inbound, admin in (("a", a_in, a_admin), ("b", b_in, b_admin)):
        d = work / f"sidecar-{name}"
        d.mkdir(mode=0o700)
        token = run_meshcar_cmd(
            "ca", "token", "--dir", str(ca_dir), "--spiffe-id", ids[name], "--ttl", "1h"
        ).strip()
        (d / "join.token").write_text(token + "\n")
        cfg = {
            "identity": {
                "spiffe_id": ids[name],
                "ca_url": f"https://127.0.0.1:{ca_port}",
                "ca_bundle": str(ca_dir / "root.pem"),
                "token_file": str(d / "join.token"),
                "state_dir": str(d / "state"),
            },
            "log_level": "warning",  # no access log lines, as nginx's access_log off
            "app": {"port": app},
            "inbound": {
                "listen": f"127.0.0.1:{inbound}",
                "allow": [ids["a"]] if name == "b" else [],
            },
            "admin": {"listen": f"127.0.0.1:{admin}"},
        }
        if name == "a":
            cfg["outbound"] = {"listen": f"127.0.0.1:{out}", "upstreams": upstreams}
        (d / "sidecar.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        spec = ProcSpec(
            f"meshcar-sidecar-{name}",
            meshcar_argv("sidecar", "--config", str(d / "sidecar.yaml")),
            Probe(f"http://127.0.0.1:{admin}/ready"),
        )
        children.append(sup.start(spec, work / "logs" / f"{spec.name}.log"))
    sup.wait_ready(children, timeout=60)
    return out, [c.proc.pid for c in children]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="1 MiB messages per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    work = Path(tempfile.mkdtemp(prefix="meshcar-ws-bench-"))
    (app_port,) = free_ports(1)
    app = subprocess.Popen([sys.executable, "-c", APP, str(app_port)])
    results: dict[str, list[tuple[float, float]]] = {}
    try:
        with Supervisor() as sup:
            pairs = {
                "nginx": nginx_pair(sup, nginx, work, app_port),
                "meshcar": meshcar_pair(sup, work, app_port),
            }
            for name, (port, _) in pairs.items():  # warm-up and check
                upload(port, 8)
                say(f"{name}: 8 MiB crossed")
            for r in range(args.rounds):
                for name, (port, pids) in pairs.items():
                    cpu0 = cpu_seconds(pids)
                    took = upload(port, args.mib)
                    cpu = cpu_seconds(pids) - cpu0
                    gib = args.mib / 1024
                    results.setdefault(name, []).append((args.mib / took, cpu / gib))
                    say(
                        f"round {r + 1} {name}: {args.mib / took:.0f} MiB/s, {cpu / gib:.2f} CPU s/GiB"
                    )
    finally:
        app.terminate()
        app.wait()
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\nload average after the run: {' '.join(load)}; {os.cpu_count()} CPUs")
    ng, mc = results["nginx"], results["meshcar"]
    ng_t = statistics.median(x[0] for x in ng)
    mc_t = statistics.median(x[0] for x in mc)
    print(f"{'nginx MiB/s':>12} {'meshcar MiB/s':>14} {'ratio':>6} {'nginx CPU s/GiB':>16} "
          f"{'meshcar CPU s/GiB':>18}")  # fmt: skip
    print(
        f"{ng_t:>12.0f} {mc_t:>14.0f} {mc_t / ng_t:>6.2f} "
        f"{statistics.median(x[1] for x in ng):>16.2f} {statistics.median(x[1] for x in mc):>18.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
