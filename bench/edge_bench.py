"""Issue 3's edge benchmarks, one run, meshcar's edge against nginx on the same machine.

1. passthrough bulk throughput: curl downloads a large file from a TLS backend through
   the meshcar edge (passthrough by SNI, splice relay) and through nginx's stream module
   (`ssl_preread`, routing by SNI);
2. terminate requests/s: wrk over HTTPS keep-alive, TLS ending at the front, plain HTTP
   to the same backend;
3. new TLS handshakes/s: `openssl s_time -new` (a full handshake per connection) against
   the same terminate listener.

Everything is on 127.0.0.1, one worker/process per front. Needs nginx (with
libnginx-mod-stream), wrk, curl and openssl; installs them with apt-get if missing.

    .venv/bin/python bench/edge_bench.py [--duration 8] [--size-mb 256] [--rounds 5] [--only pass|term|hs]

Each measure runs once per front as an uncounted warm-up (the first read of the big file
fills the page cache), then `--rounds` times with meshcar and nginx alternating in ABBA
order (so background load hits both alike and neither always goes first); the table
shows medians, and the raw samples are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

HOST_T, HOST_P = "www.bench.test", "pass.bench.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_tools() -> None:
    missing = [t for t in ("nginx", "wrk", "curl", "openssl") if shutil.which(t) is None]
    if missing or not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists():
        print(f"bench: installing nginx-light libnginx-mod-stream wrk ({missing or 'stream module'})")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light", "libnginx-mod-stream", "wrk",
                        "curl", "openssl"], check=True)


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"bench: nothing listening on {port}")


def nginx_conf(d: Path, name: str, body: str, stream: str = "") -> Path:
    conf = d / f"{name}.conf"
    conf.write_text(f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
daemon off;
pid {d}/{name}.pid;
error_log {d}/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  keepalive_requests 1000000;
  client_body_temp_path {d}/{name}-body;
  proxy_temp_path {d}/{name}-proxy;
{body}
}}
{stream}
""")
    return conf


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (nginx: master + workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    pids += [int(c) for c in children]
    for p in pids:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def start(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wrk(url: str, duration: int) -> dict:
    out = subprocess.run(["wrk", "-t2", "-c32", f"-d{duration}s", "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors or "Socket errors" in out:
        raise SystemExit(f"bench: wrk saw errors on {url}:\n{out}")
    return {"rps": rps, "p50": float(p50.group(1)) * scale[p50.group(2)],
            "p99": float(p99.group(1)) * scale[p99.group(2)]}


def download(port: int, ca: Path) -> float:
    """One download of the big file through `port`, in MB/s."""
    r = subprocess.run(["curl", "-sS", "--cacert", str(ca), "--resolve", f"{HOST_P}:{port}:127.0.0.1",
                        "-o", "/dev/null", "-w", "%{http_code} %{time_total} %{size_download}",
                        f"https://{HOST_P}:{port}/big"], capture_output=True, text=True, check=True)
    code, seconds, size = r.stdout.split()
    if code != "200" or int(size) == 0:
        raise SystemExit(f"bench: download through {port} answered {code} with {size} bytes")
    return int(size) / float(seconds) / 1e6


def handshakes(port: int, duration: int) -> float:
    """New TLS connections per second with `openssl s_time -new` (one full handshake per
    connection, one connection at a time). s_time prints whole seconds, so the rate is its
    connection count over the wall-clock time measured here."""
    t0 = time.monotonic()
    r = subprocess.run(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time", str(duration)],
                       capture_output=True, text=True, check=False)
    wall = time.monotonic() - t0
    m = re.search(r"(\d+) connections in ([\d.]+) real seconds", r.stdout)
    if not m:
        raise SystemExit(f"bench: openssl s_time failed on {port}: {r.stdout[-500:]} {r.stderr[-500:]}")
    return int(m.group(1)) / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=8, help="seconds per wrk / s_time run")
    ap.add_argument("--size-mb", type=int, default=256, help="size of the passthrough download")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds per measure; the fronts alternate within a round and the median counts")
    ap.add_argument("--only", choices=("pass", "term", "hs"), action="append",
                    help="run only these measures (repeatable; default: all)")
    ap.add_argument("--hold", action="store_true",
                    help="start everything, print the ports and wait (for profiling by hand)")
    args = ap.parse_args()
    ensure_tools()
    d = Path(tempfile.mkdtemp(prefix="meshcar-edge-bench-"))
    d.chmod(0o755)  # nginx workers run as an unprivileged user and must read the files
    procs: list[subprocess.Popen] = []
    try:
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(d / "ca.pem"))
        cert = ca.issue_cert(HOST_T, HOST_P)
        cert.private_key_and_cert_chain_pem.write_to_path(str(d / "site.pem"))
        (d / "www").mkdir()
        with open(d / "www" / "big", "wb") as f:
            f.truncate(args.size_mb * 1024 * 1024)
        (d / "www").chmod(0o755)
        (d / "www" / "big").chmod(0o644)
        ports = {k: free_port() for k in ("app", "tls_backend", "edge", "edge_admin", "ng_term", "ng_pass")}

        # the shared backends: plain HTTP `return 200` and a TLS server with a large file
        backend = nginx_conf(d, "backend", f"""
  server {{ listen 127.0.0.1:{ports['app']}; location / {{ return 200 "ok"; }} }}
  server {{ listen 127.0.0.1:{ports['tls_backend']} ssl; ssl_certificate {d}/site.pem;
           ssl_certificate_key {d}/site.pem; root {d}/www; }}""")
        procs.append(start(["nginx", "-c", str(backend), "-p", str(d)], d / "backend.log"))
        # nginx as the front: terminate (http) and passthrough (stream + ssl_preread)
        front = nginx_conf(d, "front", f"""
  upstream app {{ server 127.0.0.1:{ports['app']}; keepalive 64; }}
  server {{ listen 127.0.0.1:{ports['ng_term']} ssl; ssl_certificate {d}/site.pem;
           ssl_certificate_key {d}/site.pem; ssl_protocols TLSv1.2 TLSv1.3;
           location / {{ proxy_pass http://app; proxy_http_version 1.1;
                         proxy_set_header Connection ""; }} }}""", stream=f"""
stream {{
  map $ssl_preread_server_name $backend {{ {HOST_P} 127.0.0.1:{ports['tls_backend']}; }}
  server {{ listen 127.0.0.1:{ports['ng_pass']}; ssl_preread on; proxy_pass $backend; }}
}}""")
        procs.append(start(["nginx", "-c", str(front), "-p", str(d)], d / "front.log"))
        nginx_front = procs[-1]
        # the meshcar edge: the same two routes on one listener
        edge_cfg = {
            "listen": {"https": f"127.0.0.1:{ports['edge']}"},
            "admin": {"listen": f"127.0.0.1:{ports['edge_admin']}"},
            "default_route": HOST_T,
            "log_level": "warning",
            "routes": [
                {"host": HOST_T, "mode": "terminate", "tls": {"cert": str(d / "site.pem"), "key": str(d / "site.pem")},
                 "backend": {"endpoints": [f"127.0.0.1:{ports['app']}"]}},
                {"host": HOST_P, "mode": "passthrough",
                 "backend": {"endpoints": [f"127.0.0.1:{ports['tls_backend']}"]}},
            ],
        }
        (d / "edge.yaml").write_text(json.dumps(edge_cfg))
        procs.append(start([sys.executable, "-m", "meshcar.cli", "edge", "--config", str(d / "edge.yaml")],
                           d / "edge.log"))
        for p in ("app", "tls_backend", "edge", "ng_term", "ng_pass"):
            wait_port(ports[p])

        if args.hold:
            print(json.dumps({"dir": str(d), "pids": {"edge": procs[-1].pid}, **ports}), flush=True)
            signal.pause()
        only = set(args.only or ("pass", "term", "hs"))
        fronts = {"meshcar": (ports["edge"], ports["edge"]), "nginx": (ports["ng_term"], ports["ng_pass"])}
        front_pid = {"meshcar": procs[-1].pid, "nginx": nginx_front.pid}
        samples: dict[str, dict[str, list[float]]] = {name: {} for name in fronts}

        def measure(key: str, what: str, fn) -> None:  # noqa: ANN001
            # meshcar and nginx alternate, so load from elsewhere on the machine hits both alike
            print(f"bench: {what}, 1 warm-up + {args.rounds} rounds, fronts alternating", flush=True)
            for term, pas in fronts.values():  # warm-up, not counted (page cache, pools)
                fn(term, pas)
            for i in range(args.rounds):
                order = list(fronts.items())
                for name, (term, pas) in order if i % 2 == 0 else order[::-1]:  # ABBA: neither always first
                    cpu0 = cpu_seconds(front_pid[name])
                    value = fn(term, pas)
                    cpu = cpu_seconds(front_pid[name]) - cpu0
                    for k, v in (value if isinstance(value, dict) else {key: value}).items():
                        samples[name].setdefault(k, []).append(v)
                    samples[name].setdefault(key + "_cpu", []).append(cpu)

        if "pass" in only:
            measure("pass_mbps", f"passthrough download of {args.size_mb} MiB",
                    lambda term, pas: download(pas, d / "ca.pem"))
        if "term" in only:
            measure("term_rps", f"terminate wrk -t2 -c32 -d{args.duration}s", lambda term, pas: {
                "term_rps": (w := wrk(f"https://127.0.0.1:{term}/", args.duration))["rps"],
                "term_p50": w["p50"], "term_p99": w["p99"]})
        if "hs" in only:
            measure("hs", f"openssl s_time -new -time {args.duration}",
                    lambda term, pas: handshakes(term, args.duration))
        results = {name: {k: statistics.median(v) for k, v in per.items()} for name, per in samples.items()}
        for per in results.values():  # the front's own CPU for the work it did (a steadier figure)
            if "pass_mbps_cpu" in per:
                per["pass_cpu_per_gib"] = per.pop("pass_mbps_cpu") / (args.size_mb / 1024)
            if "hs_cpu" in per:
                per["hs_cpu_ms"] = per.pop("hs_cpu") * 1000 / (per["hs"] * args.duration)
            per.pop("term_rps_cpu", None)
        print("\nsamples: " + json.dumps({n: {k: [round(x, 1) for x in v] for k, v in per.items()}
                                          for n, per in samples.items()}))
        m, n = results["meshcar"], results["nginx"]
        print(f"\nedge benchmarks, one worker each, 127.0.0.1, {os.cpu_count()} CPUs, "
              f"median of {args.rounds} alternating rounds\n")
        print(f"{'measure':46} {'meshcar':>10} {'nginx':>10} {'ratio':>7}")
        rows = [("passthrough download MB/s", "pass_mbps"),
                ("passthrough front CPU s per GiB (lower wins)", "pass_cpu_per_gib"),
                ("terminate requests/s (wrk -c32)", "term_rps"),
                ("terminate p50 ms", "term_p50"), ("terminate p99 ms", "term_p99"),
                ("new TLS handshakes/s (s_time -new)", "hs"),
                ("front CPU ms per new connection (lower wins)", "hs_cpu_ms")]
        for label, key in rows:
            if key not in m:
                continue
            print(f"{label:46} {m[key]:10.2f} {n[key]:10.2f} {m[key] / n[key]:6.2f}x")
        return 0
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
