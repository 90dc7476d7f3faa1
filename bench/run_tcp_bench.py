#!/usr/bin/env python3
"""Issue 13: opaque TCP throughput through a sidecar pair, meshcar against nginx `stream`.

    .venv/bin/python bench/run_tcp_bench.py [--mib 512] [--streams 1,4] [--rounds 3]

A script, not a test. Both pairs carry the same bulk upload from the same client to the same
sink ("the app": a separate Python process reading into a buffer until EOF, then answering
the byte count):

- nginx: outbound nginx `stream` (plain TCP in, `proxy_ssl on` with a client certificate,
  `proxy_ssl_verify on`, TLS 1.3) -> inbound nginx `stream` (`ssl_verify_client on`) -> sink;
- meshcar: `meshcar sidecar` a (`protocol: tcp` upstream on a local port) -> mTLS (ALPN
  meshcar-tcp/1) -> `meshcar sidecar` b (`inbound.tcp`, allow a) -> sink.

Each round runs nginx then meshcar with `--mib` MiB per stream over N parallel streams, and
reports the median MiB/s of each, the ratio meshcar/nginx, and the CPU seconds the two
proxies of each pair used per GiB. Machine load is printed: other work on the machine
skews both, which is why they alternate in one run.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from run_mesh_bench import (  # noqa: E402
    TRUST_DOMAIN,
    cpu_seconds,
    ensure_tools,
    free_ports,
    nginx_pki,
    run_meshcar_cmd,
    say,
)

from meshcar.demo.plan import Probe, ProcSpec, meshcar_argv  # noqa: E402
from meshcar.demo.supervisor import Supervisor  # noqa: E402

CHUNK = 1 << 20

SINK = r"""
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(128)
def serve(c):
    buf = bytearray(1 << 20); n = 0
    while True:
        k = c.recv_into(buf)
        if not k: break
        n += k
    c.sendall(str(n).encode()); c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

NGINX_STREAM = """
load_module @@STREAM_MODULE@@;
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
}
stream {
    server {
        @@SERVER@@
    }
}
"""

OUTBOUND = """listen 127.0.0.1:@@OUT@@;
        proxy_pass 127.0.0.1:@@IN@@;
        proxy_ssl on;
        proxy_ssl_protocols TLSv1.3;
        proxy_ssl_certificate @@CERTS@@/a.pem;
        proxy_ssl_certificate_key @@CERTS@@/a.key;
        proxy_ssl_trusted_certificate @@CERTS@@/root.pem;
        proxy_ssl_verify on;
        proxy_ssl_name b.mesh;
        proxy_ssl_session_reuse on;
        proxy_half_close on;"""

INBOUND = """listen 127.0.0.1:@@IN@@ ssl;
        ssl_protocols TLSv1.3;
        ssl_certificate @@CERTS@@/b.pem;
        ssl_certificate_key @@CERTS@@/b.key;
        ssl_client_certificate @@CERTS@@/root.pem;
        ssl_verify_client on;
        proxy_pass 127.0.0.1:@@SINK@@;
        proxy_half_close on;"""


def stream_module() -> str:
    for p in ("/usr/lib/nginx/modules/ngx_stream_module.so",):
        if Path(p).exists():
            return p
    sys.exit("bench: needed: apt-get install -y libnginx-mod-stream")


def upload(port: int, mib: int, streams: int) -> float:
    """Seconds to push `mib` MiB on each of `streams` connections (all acknowledged)."""
    data = b"\x5a" * CHUNK
    errors: list[str] = []

    def one() -> None:
        s = socket.create_connection(("127.0.0.1", port))
        try:
            for _ in range(mib):
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := s.recv(64):
                answer += chunk
            if int(answer or b"0") != mib * CHUNK:
                errors.append(f"sink counted {answer!r}, sent {mib * CHUNK}")
        finally:
            s.close()

    threads = [threading.Thread(target=one) for _ in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"bench: {errors[0]}")
    return took


def nginx_pair(sup: Supervisor, nginx: str, work: Path, sink: int) -> tuple[int, list[int]]:
    certs = work / "nginx-certs"
    nginx_pki(certs)
    out_port, in_port, p1, p2 = free_ports(4)
    children = []
    for role, server, probe in (("inbound", INBOUND, p1), ("outbound", OUTBOUND, p2)):
        prefix = work / f"nginx-{role}"
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        text = NGINX_STREAM.replace("@@SERVER@@", server)
        values = {
            "STREAM_MODULE": stream_module(),
            "PREFIX": str(prefix),
            "PROBE": str(probe),
            "OUT": str(out_port),
            "IN": str(in_port),
            "SINK": str(sink),
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


def meshcar_pair(sup: Supervisor, work: Path, sink: int) -> tuple[int, list[int]]:
    ca_port, a_in, a_admin, b_in, b_admin, local = free_ports(6)
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
    for name, inbound, admin, extra in (
        (
            "a",
            a_in,
            a_admin,
            {
                "outbound": {
                    "upstreams": {
                        "sink": {
                            "protocol": "tcp",
                            "endpoints": [f"127.0.0.1:{b_in}"],
                            "spiffe_id": ids["b"],
                            "local_port": local,
                            "target_port": sink,
                        }
                    }
                }
            },
        ),
        ("b", b_in, b_admin, {}),
    ):
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
            "app": {"port": sink},
            "inbound": {
                "listen": f"127.0.0.1:{inbound}",
                "allow": [ids["a"]] if name == "b" else [],
                "tcp": [{"port": sink}] if name == "b" else [],
            },
            "admin": {"listen": f"127.0.0.1:{admin}"},
            **extra,
        }
        (d / "sidecar.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        spec = ProcSpec(
            f"meshcar-sidecar-{name}",
            meshcar_argv("sidecar", "--config", str(d / "sidecar.yaml")),
            Probe(f"http://127.0.0.1:{admin}/ready"),
        )
        children.append(sup.start(spec, work / "logs" / f"{spec.name}.log"))
    sup.wait_ready(children, timeout=60)
    return local, [c.proc.pid for c in children]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=512, help="MiB per stream per round")
    ap.add_argument("--streams", default="1,4", help="parallel streams, comma separated")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    nginx, _ = ensure_tools()
    streams = [int(x) for x in args.streams.split(",")]
    work = Path(tempfile.mkdtemp(prefix="meshcar-tcp-bench-"))
    (sink_port,) = free_ports(1)
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(sink_port)])
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        with Supervisor() as sup:
            pairs = {
                "nginx": nginx_pair(sup, nginx, work, sink_port),
                "meshcar": meshcar_pair(sup, work, sink_port),
            }
            for name, (port, _) in pairs.items():  # warm-up and check
                upload(port, 8, 1)
                say(f"{name}: 8 MiB crossed")
            for r in range(args.rounds):
                for n in streams:
                    for name, (port, pids) in pairs.items():
                        cpu0 = cpu_seconds(pids)
                        took = upload(port, args.mib, n)
                        cpu = cpu_seconds(pids) - cpu0
                        gib = args.mib * n / 1024
                        results.setdefault((name, n), []).append((args.mib * n / took, cpu / gib))
                        say(
                            f"round {r + 1} {name} x{n}: {args.mib * n / took:.0f} MiB/s, "
                            f"{cpu / gib:.2f} CPU s/GiB"
                        )
    finally:
        sink.terminate()
        sink.wait()
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\nload average after the run: {' '.join(load)}; {os.cpu_count()} CPUs")
    print(f"{'streams':>8} {'nginx MiB/s':>12} {'meshcar MiB/s':>14} {'ratio':>6} "
          f"{'nginx CPU s/GiB':>16} {'meshcar CPU s/GiB':>18}")  # fmt: skip
    for n in streams:
        ng = results[("nginx", n)]
        mc = results[("meshcar", n)]
        ng_t = statistics.median(x[0] for x in ng)
        mc_t = statistics.median(x[0] for x in mc)
        print(
            f"{n:>8} {ng_t:>12.0f} {mc_t:>14.0f} {mc_t / ng_t:>6.2f} "
            f"{statistics.median(x[1] for x in ng):>16.2f} "
            f"{statistics.median(x[1] for x in mc):>18.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
