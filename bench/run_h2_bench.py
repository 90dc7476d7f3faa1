#!/usr/bin/env python3
"""Issue 13: HTTP/2 (gRPC-shaped) requests/s through a sidecar pair, meshcar against nginx.

    .venv/bin/python bench/run_h2_bench.py [--rounds 3] [--seconds 5] [-c 4] [-m 10]

A script, not a test. The same h2load (`-c N -m M`, requests with `content-type:
application/grpc` and `te: trailers`, for a fixed time) drives both pairs to the same app,
an nginx speaking h2c (prior knowledge) that answers every request itself (HTTP 200,
`grpc-status: 0`, no body). The requests are GETs: with `--post` each carries a 5-byte gRPC
frame, but the app's `return` discards a body with RST_STREAM NO_ERROR and nginx 1.22's
`grpc_pass` then fails other streams of the connection ("upstream sent frame for unknown
stream", 502s), so only meshcar can be measured that way.

- nginx: outbound nginx (`listen ... http2`, h2c in; `grpc_pass grpcs://`, a client
  certificate, `grpc_ssl_verify on`, TLS 1.3, upstream keepalive) -> inbound nginx
  (`listen ... ssl http2`, `ssl_verify_client on`; `grpc_pass grpc://`) -> app;
- meshcar: `meshcar sidecar` a (outbound listener, h2c in, `:authority` `sink`) -> mTLS
  with ALPN h2 -> `meshcar sidecar` b (inbound, allow a, `app.protocol: h2c`) -> app.

Each round runs nginx then meshcar; the median requests/s of each, the ratio, and the CPU
seconds the two proxies used per 10k requests are printed with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (_common puts the repository on sys.path)
    NGINX_HEAD,
    Pair,
    cpu_seconds,
    free_ports,
    say,
    spiffe_ids,
    start_nginx,
    start_sidecars,
)
from run_mesh_bench import nginx_pki  # noqa: E402

from meshcar.demo.supervisor import Supervisor  # noqa: E402

GRPC_FRAME = b"\x00" + (5).to_bytes(4, "big") + b"hello"  # one uncompressed message

NGINX_H2 = (
    NGINX_HEAD
    + """    keepalive_requests 100000000;  # nginx ends an h2 connection after 1000 by default
    upstream next { server @@UPSTREAM@@; keepalive 32; keepalive_requests 100000000; }
    server {
        @@SERVER@@
        location / { @@LOCATION@@ }
    }
}
"""
)

APP_LOCATION = 'default_type application/grpc; add_header grpc-status 0; return 200 "";'

OUT_LOCATION = """grpc_pass grpcs://next;
            grpc_ssl_protocols TLSv1.3;
            grpc_ssl_certificate @@CERTS@@/a.pem;
            grpc_ssl_certificate_key @@CERTS@@/a.key;
            grpc_ssl_trusted_certificate @@CERTS@@/root.pem;
            grpc_ssl_verify on;
            grpc_ssl_name b.mesh;
            grpc_ssl_server_name on;
            grpc_ssl_session_reuse on;"""

IN_SERVER = """listen 127.0.0.1:@@IN@@ ssl http2;
        ssl_protocols TLSv1.3;
        ssl_certificate @@CERTS@@/b.pem;
        ssl_certificate_key @@CERTS@@/b.key;
        ssl_client_certificate @@CERTS@@/root.pem;
        ssl_verify_client on;"""


def h2load(
    port: int, body: Path | None, seconds: int, clients: int, streams: int
) -> tuple[float, int]:
    """Requests/s and the number of 2xx answers of one h2load run against `port`."""
    done = subprocess.run(
        [
            "h2load", "-D", str(seconds), "--warm-up-time", "1", "-c", str(clients),
            "-m", str(streams), *(("-d", str(body)) if body else ()), "-H", ":authority: sink",
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            f"http://127.0.0.1:{port}/bench.Echo/Unary",
        ],
        capture_output=True, text=True, timeout=seconds + 60, check=False,
    )  # fmt: skip
    rate = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", done.stdout)
    ok = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", done.stdout)
    failed = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored", done.stdout)
    if rate is None or ok is None or failed is None:
        raise SystemExit(f"bench: h2load said\n{done.stdout}\n{done.stderr}")
    # the streams still in flight when the time is up count as failed: at most c * m
    cut = int(failed.group(2)) > clients * streams
    if int(ok.group(1)) == 0 or any(int(ok.group(i)) for i in (2, 3, 4)) or cut:
        raise SystemExit(f"bench: requests failed through port {port}:\n{done.stdout}")
    return float(rate.group(1)), int(ok.group(1))


def nginx_pair(sup: Supervisor, work: Path, app: int, nginx: str) -> Pair:
    certs = work / "nginx-certs"
    nginx_pki(certs)
    out_port, in_port, p1, p2 = free_ports(4)
    common = {"IN": str(in_port), "CERTS": str(certs)}
    inbound = {
        "SERVER": IN_SERVER,
        "LOCATION": "grpc_pass grpc://next;",
        "UPSTREAM": f"127.0.0.1:{app}",
    }
    outbound = {
        "SERVER": f"listen 127.0.0.1:{out_port} http2;",
        "LOCATION": OUT_LOCATION,
        "UPSTREAM": f"127.0.0.1:{in_port}",
    }
    roles = {"inbound": (p1, {**inbound, **common}), "outbound": (p2, {**outbound, **common})}
    return out_port, start_nginx(sup, nginx, work, NGINX_H2, roles)


def meshcar_pair(sup: Supervisor, work: Path, app: int) -> Pair:
    ca_port, a_in, a_admin, b_in, b_admin, out = free_ports(6)
    ids = spiffe_ids("a", "b")
    sidecars: dict[str, tuple[str, int, dict[str, object]]] = {}
    upstreams = {"sink": {"endpoints": [f"127.0.0.1:{b_in}"], "spiffe_id": ids["b"]}}
    for name, inbound, admin in (("a", a_in, a_admin), ("b", b_in, b_admin)):
        cfg: dict[str, object] = {
            "log_level": "warning",  # no access log lines, as nginx's access_log off
            "app": {"port": app, "protocol": "h2c"},
            "inbound": {
                "listen": f"127.0.0.1:{inbound}",
                "allow": [ids["a"]] if name == "b" else [],
            },
        }
        if name == "a":
            cfg["outbound"] = {"listen": f"127.0.0.1:{out}", "upstreams": upstreams}
        sidecars[name] = (ids[name], admin, cfg)
    return out, start_sidecars(sup, work, ca_port, sidecars)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5, help="h2load -D per run")
    ap.add_argument("-c", type=int, default=4, help="h2load clients (connections)")
    ap.add_argument("-m", type=int, default=10, help="h2load streams per connection")
    ap.add_argument(
        "--post",
        action="store_true",
        help="POST a gRPC frame (nginx 1.22's grpc_pass then fails streams: see the docstring)",
    )
    args = ap.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if shutil.which("h2load") is None:
        raise SystemExit("bench: needs h2load (apt-get install nghttp2-client)")
    work = Path(tempfile.mkdtemp(prefix="meshcar-h2-bench-"))
    body = work / "frame.bin" if args.post else None
    if body is not None:
        body.write_bytes(GRPC_FRAME)
    app, app_probe = free_ports(2)
    app_values = {"SERVER": f"listen 127.0.0.1:{app} http2;", "LOCATION": APP_LOCATION}
    results: dict[str, list[tuple[float, float]]] = {"nginx": [], "meshcar": []}
    with Supervisor() as sup:
        start_nginx(sup, nginx, work, NGINX_H2, {"app": (app_probe, {**app_values,
                    "UPSTREAM": "127.0.0.1:1"})})  # fmt: skip
        pairs = {
            "nginx": nginx_pair(sup, work, app, nginx),
            "meshcar": meshcar_pair(sup, work, app),
        }
        for name, (port, _) in pairs.items():
            h2load(port, body, 2, 1, 1)
            say(f"{name}: h2 requests cross")
        for r in range(args.rounds):
            for name, (port, pids) in pairs.items():
                cpu0 = cpu_seconds(pids)
                rate, n = h2load(port, body, args.seconds, args.c, args.m)
                per_10k = (cpu_seconds(pids) - cpu0) / n * 10_000
                results[name].append((rate, per_10k))
                say(f"round {r + 1} {name}: {rate:.0f} req/s, {per_10k:.2f} CPU s/10k req")
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\nload average after the run: {' '.join(load)}; {os.cpu_count()} CPUs")
    print(f"h2load -D {args.seconds} -c {args.c} -m {args.m}, {args.rounds} rounds (medians)")
    ng = statistics.median(x[0] for x in results["nginx"])
    mc = statistics.median(x[0] for x in results["meshcar"])
    ng_cpu = statistics.median(x[1] for x in results["nginx"])
    mc_cpu = statistics.median(x[1] for x in results["meshcar"])
    print(f"{'nginx req/s':>12} {'meshcar req/s':>14} {'ratio':>6} "
          f"{'nginx CPU s/10k':>16} {'meshcar CPU s/10k':>18}")  # fmt: skip
    print(f"{ng:>12.0f} {mc:>14.0f} {mc / ng:>6.2f} {ng_cpu:>16.2f} {mc_cpu:>18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
