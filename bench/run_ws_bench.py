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
import sys
import time
from functools import partial
from pathlib import Path

from websockets.sync.client import connect

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
from run_mesh_bench import nginx_pki  # noqa: E402

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

NGINX_HTTP = (
    NGINX_HEAD
    + """    server {
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
)

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


def nginx_pair(sup: Supervisor, work: Path, app: int, nginx: str) -> Pair:
    certs = work / "nginx-certs"
    nginx_pki(certs)
    out_port, in_port, p1, p2 = free_ports(4)
    common = {"IN": str(in_port), "CERTS": str(certs)}
    inbound = {"SERVER": IN_SERVER, "PROXY_SSL": "", "UPSTREAM": f"http://127.0.0.1:{app}"}
    outbound = {
        "SERVER": f"listen 127.0.0.1:{out_port};",
        "PROXY_SSL": OUT_SSL,
        "UPSTREAM": f"https://127.0.0.1:{in_port}",
    }
    roles = {"inbound": (p1, {**inbound, **common}), "outbound": (p2, {**outbound, **common})}
    return out_port, start_nginx(sup, nginx, work, NGINX_HTTP, roles)


def meshcar_pair(sup: Supervisor, work: Path, app: int) -> Pair:
    ca_port, a_in, a_admin, b_in, b_admin, out = free_ports(6)
    ids = spiffe_ids("a", "b")
    sidecars: dict[str, tuple[str, int, dict[str, object]]] = {}
    upstreams = {"sink": {"endpoints": [f"127.0.0.1:{b_in}"], "spiffe_id": ids["b"]}}
    for name, inbound, admin in (("a", a_in, a_admin), ("b", b_in, b_admin)):
        cfg: dict[str, object] = {
            "log_level": "warning",  # no access log lines, as nginx's access_log off
            "app": {"port": app},
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
    ap.add_argument("--mib", type=int, default=256, help="1 MiB messages per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    cases = {"": lambda port: (upload(port, args.mib), args.mib)}
    pair = partial(nginx_pair, nginx=nginx)
    run_bulk("ws", APP, pair, meshcar_pair, args.rounds, cases, lambda port: upload(port, 8), "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
