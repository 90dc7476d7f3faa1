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
import socket
import sys
import threading
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (_common puts the repository on sys.path)
    NGINX_HEAD,
    Pair,
    free_ports,
    run_bulk,
    spiffe_ids,
    start_nginx,
    start_sidecars,
)
from run_mesh_bench import ensure_tools, nginx_pki  # noqa: E402

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

NGINX_STREAM = (
    "\nload_module @@STREAM_MODULE@@;"
    + NGINX_HEAD
    + """}
stream {
    server {
        @@SERVER@@
    }
}
"""
)

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


def nginx_pair(sup: Supervisor, work: Path, sink: int, nginx: str) -> Pair:
    certs = work / "nginx-certs"
    nginx_pki(certs)
    out_port, in_port, p1, p2 = free_ports(4)
    common = {"STREAM_MODULE": stream_module(), "OUT": str(out_port), "IN": str(in_port)}
    common |= {"SINK": str(sink), "CERTS": str(certs)}
    roles = {
        "inbound": (p1, {"SERVER": INBOUND, **common}),
        "outbound": (p2, {"SERVER": OUTBOUND, **common}),
    }
    return out_port, start_nginx(sup, nginx, work, NGINX_STREAM, roles)


def meshcar_pair(sup: Supervisor, work: Path, sink: int) -> Pair:
    ca_port, a_in, a_admin, b_in, b_admin, local = free_ports(6)
    ids = spiffe_ids("a", "b")
    sidecars: dict[str, tuple[str, int, dict[str, object]]] = {}
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
        cfg = {
            "app": {"port": sink},
            "inbound": {
                "listen": f"127.0.0.1:{inbound}",
                "allow": [ids["a"]] if name == "b" else [],
                "tcp": [{"port": sink}] if name == "b" else [],
            },
            **extra,
        }
        sidecars[name] = (ids[name], admin, cfg)
    return local, start_sidecars(sup, work, ca_port, sidecars)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=512, help="MiB per stream per round")
    ap.add_argument("--streams", default="1,4", help="parallel streams, comma separated")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    nginx, _ = ensure_tools()
    streams = [int(x) for x in args.streams.split(",")]
    cases = {f"x{n}": lambda port, n=n: (upload(port, args.mib, n), args.mib * n) for n in streams}
    pair = partial(nginx_pair, nginx=nginx)
    run_bulk(
        "tcp", SINK, pair, meshcar_pair, args.rounds, cases, lambda p: upload(p, 8, 1), "streams"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
