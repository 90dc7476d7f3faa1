#!/usr/bin/env python3
"""Issue 3: the edge (`meshcar edge`) against nginx on one machine, three measures, one run.

    .venv/bin/python bench/run_edge_bench.py [--duration 10] [--size-mb 1024] [--transfers 5]

A script, not a test.  It installs nginx (with the stream module), wrk, curl and openssl
from Debian's packages if they are missing, then starts, all on 127.0.0.1:

- the backends, shared by both fronts: "the app" (one nginx worker, `return 200`,
  bench/nginx/app.conf) and a TLS backend (one nginx worker serving a large sparse file
  with sendfile, its own copy of the ECDSA P-256 certificate, bench/nginx/edge_tls_backend.conf);
- meshcar's edge, a real process (`python -m meshcar.cli edge --config FILE`, ready when its
  admin `/ready` says so) with two routes on one listener: `www.bench.test` terminate to
  the app (also the `default_route`) and `pass.bench.test` passthrough to the TLS backend
  (no PROXY header);
- nginx as the edge (one worker, bench/nginx/edge_front.conf): `listen ssl` with the same
  certificate and `proxy_pass http://` to the app over a keep-alive pool, and a `stream`
  server with `ssl_preread on` routing `$ssl_preread_server_name` to the TLS backend.

Measures (each front checked once with a real request first; warm-up runs not counted;
then the fronts alternate in ABBA order so background load hits both alike; medians):

1. passthrough bulk throughput: `curl` downloads the large file through the front
   (`--resolve pass.bench.test:PORT:127.0.0.1`, the certificate verified), MB/s;
2. terminate requests/s: `wrk --latency` over HTTPS keep-alive to `https://127.0.0.1:PORT/`
   with `Host: www.bench.test` (wrk's SNI is then the IP: meshcar's default_route applies);
3. new TLS handshakes/s: `openssl s_time -new` (a full handshake per connection, no
   resumption; s_time sends no SNI, so meshcar's default_route applies), one or more
   clients in parallel, connections over wall-clock seconds.

It also reports each front's own CPU time (from /proc) per GiB relayed and per new
connection, and checks from meshcar's access log that passthrough was spliced and from its
metrics that the handshakes were full ones.  Access logs are on for both fronts by default
(meshcar logs at level info; nginx to a file with a 64 KiB buffer, as meshcar batches its
writes); `--no-access-logs` turns both off.  Exit status is non-zero if something failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml
from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_mesh_bench import (  # noqa: E402  (run_mesh_bench puts the repository on sys.path)
    APP_BODY,
    WrkResult,
    ensure_tools,
    free_ports,
    metric_sum,
    nginx_spec,
    parse_wrk,
    render_nginx,
    say,
)

from meshcar.demo.pki import make_ca, make_leaf, write_private  # noqa: E402
from meshcar.demo.plan import Probe, ProcSpec, meshcar_argv  # noqa: E402
from meshcar.demo.supervisor import Child, DemoStartupError, Supervisor  # noqa: E402

HOST_T, HOST_P = "www.bench.test", "pass.bench.test"
FRONTS = ("meshcar", "nginx")
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

COMMANDS: list[str] = []  # the exact client commands, printed at the end


def run_logged(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    cmd = shlex.join(argv)
    if cmd not in COMMANDS:
        COMMANDS.append(cmd)
    return subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


# --------------------------------------------------------------------------- tools


def ensure_edge_tools() -> tuple[str, str, str]:
    """nginx + wrk (run_mesh_bench's installer), then the stream module, curl and openssl.
    Returns (nginx, wrk, the `load_module` line nginx needs for `stream`, or "")."""
    nginx, wrk = ensure_tools()
    built = subprocess.run([nginx, "-V"], capture_output=True, text=True, check=True).stderr
    static = re.search(r"--with-stream(\s|$)", built) is not None
    missing = [t for t in ("curl", "openssl") if shutil.which(t) is None]
    if missing or (not static and not STREAM_MODULE.exists()):
        if os.geteuid() != 0:
            sys.exit("bench: needed: apt-get install -y libnginx-mod-stream curl openssl (as root)")
        say(f"installing libnginx-mod-stream curl openssl ({missing or 'stream module'})")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "libnginx-mod-stream", "curl", "openssl"],
                       check=True, env=env)
    if static:
        return nginx, wrk, ""
    if not STREAM_MODULE.exists():
        sys.exit(f"bench: {STREAM_MODULE} still missing after apt-get install")
    return nginx, wrk, f"load_module {STREAM_MODULE};"


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its direct children (nginx: master + worker)."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    total = 0.0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


# --------------------------------------------------------------------------- set-up


def make_certs(d: Path) -> None:
    """One ECDSA P-256 certificate for both names, used by both fronts and the TLS backend."""
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    root, root_key = make_ca("bench edge root")
    (d / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    cert, key = make_leaf(root, root_key, HOST_T, dns_names=(HOST_T, HOST_P), server=True, days=2)
    (d / "site.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(d / "site.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def edge_spec(work: Path, ports: dict[str, int], access_logs: bool) -> ProcSpec:
    certs = work / "certs"
    cfg = {
        "listen": {"https": f"127.0.0.1:{ports['edge']}"},
        "admin": {"listen": f"127.0.0.1:{ports['edge_admin']}"},
        "default_route": HOST_T,
        "log_level": "info" if access_logs else "warning",
        "routes": [
            {"host": HOST_T, "mode": "terminate",
             "tls": {"cert": str(certs / "site.pem"), "key": str(certs / "site.key")},
             "backend": {"endpoints": [f"127.0.0.1:{ports['app']}"]}},
            {"host": HOST_P, "mode": "passthrough",
             "backend": {"endpoints": [f"127.0.0.1:{ports['tls_backend']}"]}},
        ],
    }
    d = work / "meshcar-edge"
    d.mkdir()
    (d / "edge.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return ProcSpec("meshcar-edge", meshcar_argv("edge", "--config", str(d / "edge.yaml")),
                    Probe(f"http://127.0.0.1:{ports['edge_admin']}/ready"))


def start_all(sup: Supervisor, nginx: str, load_stream: str, work: Path, args: argparse.Namespace
              ) -> tuple[dict[str, int], dict[str, Child]]:
    names = ("app", "tls_backend", "edge", "edge_admin", "ng_term", "ng_pass")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    certs, www = work / "certs", work / "www"
    make_certs(certs)
    www.mkdir(mode=0o755)
    (www / "index.html").write_text("tls backend\n")
    with open(www / "big", "wb") as f:  # sparse: no disk, and the page cache holds it at once
        f.truncate(args.size_mb * 1024 * 1024)
    for p in (www / "index.html", www / "big"):
        p.chmod(0o644)
    logs = work / "logs"
    values = {"APP_PORT": str(ports["app"]), "TLS_BACKEND_PORT": str(ports["tls_backend"]),
              "TERM_PORT": str(ports["ng_term"]), "PASS_PORT": str(ports["ng_pass"]),
              "PASS_HOST": HOST_P, "CERTS": str(certs), "WWW": str(www), "LOAD_STREAM": load_stream}
    front_prefix = work / "nginx-front"
    if args.access_logs:
        values["HTTP_ACCESS_LOG"] = f"access_log {front_prefix}/access.log edge buffer=64k flush=1s;"
        values["STREAM_ACCESS_LOG"] = f"access_log {front_prefix}/stream.log conn buffer=64k flush=1s;"
    else:
        values["HTTP_ACCESS_LOG"] = values["STREAM_ACCESS_LOG"] = "access_log off;"
    app = sup.start(nginx_spec(nginx, "app", render_nginx("app.conf", work / "nginx-app", values),
                               Probe(f"http://127.0.0.1:{ports['app']}/")), logs / "app.log")
    backend = sup.start(nginx_spec(
        nginx, "tls-backend", render_nginx("edge_tls_backend.conf", work / "nginx-tls-backend", values),
        Probe(f"https://127.0.0.1:{ports['tls_backend']}/index.html", cafile=certs / "root.pem",
              server_hostname=HOST_P)), logs / "tls-backend.log")
    sup.wait_ready([app, backend], timeout=30)
    front = sup.start(nginx_spec(
        nginx, "nginx-front", render_nginx("edge_front.conf", front_prefix, values),
        Probe(f"https://127.0.0.1:{ports['ng_term']}/", cafile=certs / "root.pem",
              server_hostname=HOST_T)), logs / "nginx-front.log")
    edge = sup.start(edge_spec(work, ports, args.access_logs), logs / "meshcar-edge.log")
    sup.wait_ready([front, edge], timeout=60)
    return ports, {"meshcar": edge, "nginx": front}


def sanity(ports: dict[str, int], certs: Path) -> None:
    """Each front answers a real terminate request with the app's body, presenting the cert."""
    for name, port in (("meshcar", ports["edge"]), ("nginx", ports["ng_term"])):
        with httpx.Client(verify=str(certs / "root.pem"), trust_env=False, timeout=10) as c:
            r = c.get(f"https://127.0.0.1:{port}/", headers={"Host": HOST_T},
                      extensions={"sni_hostname": HOST_T})
        if r.status_code != 200 or r.content != APP_BODY:
            raise DemoStartupError(f"{name} terminate: {r.status_code} {r.content[:200]!r}")


# --------------------------------------------------------------------------- measures


def download(port: int, cafile: Path, size: int) -> float:
    """One download of the big file through the front's passthrough route, in MB/s."""
    r = run_logged(["curl", "-sS", "--cacert", str(cafile), "--resolve", f"{HOST_P}:{port}:127.0.0.1",
                    "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}",
                    f"https://{HOST_P}:{port}/big"], check=False, timeout=600)
    parts = r.stdout.split()
    if r.returncode != 0 or len(parts) != 3 or parts[0] != "200" or int(parts[1]) != size:
        raise DemoStartupError(f"curl through {port}: rc {r.returncode} {r.stdout!r} {r.stderr.strip()!r}"
                               f" (expected 200 and {size} bytes)")
    return int(parts[1]) / float(parts[2]) / 1e6


def wrk_terminate(wrk: str, port: int, seconds: int, args: argparse.Namespace, name: str) -> WrkResult:
    argv = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s", "--latency",
            "-H", f"Host: {HOST_T}", f"https://127.0.0.1:{port}/"]
    r = run_logged(argv, check=True, timeout=seconds + 60)
    return parse_wrk(name, r.stdout)


def handshakes(port: int, seconds: int, clients: int, cafile: Path) -> float:
    """New TLS connections per second: `clients` parallel `openssl s_time -new`, each a full
    handshake per connection, one at a time; their connection counts over wall-clock time
    (s_time itself prints whole seconds)."""
    argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time", str(seconds),
            "-CAfile", str(cafile)]
    cmd = shlex.join(argv) + (f"   ({clients} in parallel)" if clients > 1 else "")
    if cmd not in COMMANDS:
        COMMANDS.append(cmd)
    t0 = time.monotonic()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(clients)]
    outs = [p.communicate(timeout=seconds + 60) for p in procs]
    wall = time.monotonic() - t0
    total = 0
    for out, err in outs:
        m = re.search(r"(\d+) connections in ([\d.]+) real seconds", out)
        if not m:
            raise DemoStartupError(f"openssl s_time on {port} failed: {out[-400:]} {err[-400:]}")
        total += int(m.group(1))
    return total / wall


def alternate(what: str, rounds: int, warmup: Callable[[str], object],
              one: Callable[[str], dict[str, float]], pids: dict[str, int],
              samples: dict[str, dict[str, list[float]]], cpu_key: str) -> None:
    """Warm up both fronts, then `rounds` rounds with the fronts in ABBA order."""
    say(f"{what}: warm-up, then {rounds} rounds, meshcar and nginx alternating")
    for name in FRONTS:
        warmup(name)
    for i in range(rounds):
        for name in FRONTS if i % 2 == 0 else FRONTS[::-1]:
            cpu0 = cpu_seconds(pids[name])
            values = one(name)
            values[cpu_key] = cpu_seconds(pids[name]) - cpu0
            for k, v in values.items():
                samples[name].setdefault(k, []).append(v)


def edge_checks(work: Path, admin_port: int, access_logs: bool, passthrough: bool) -> list[str]:
    """What meshcar says it did: spliced passthrough connections, full (not resumed) handshakes."""
    notes = []
    with httpx.Client(trust_env=False, timeout=10) as c:
        text = c.get(f"http://127.0.0.1:{admin_port}/metrics").text
    full = metric_sum(text, "meshcar_tls_handshakes_total", direction="edge", result="full")
    resumed = metric_sum(text, "meshcar_tls_handshakes_total", direction="edge", result="resumed")
    failed = metric_sum(text, "meshcar_tls_handshakes_total", direction="edge", result="failure")
    notes.append(f"meshcar edge handshakes: {full:.0f} full, {resumed:.0f} resumed, {failed:.0f} failed")
    if access_logs and passthrough:
        spliced = copied = 0
        for line in (work / "logs" / "meshcar-edge.log").read_text(errors="replace").splitlines():
            if '"mode":"passthrough"' in line and line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("spliced"):
                    spliced += 1
                else:
                    copied += 1
        notes.append(f"meshcar passthrough connections: {spliced} spliced, {copied} copied in Python")
    return notes


# --------------------------------------------------------------------------- report


ROWS = [
    ("passthrough download MB/s", "pass_mbps", "{:.0f}", False),
    ("passthrough front CPU s per GiB", "pass_cpu_per_gib", "{:.2f}", True),
    ("terminate requests/s", "term_rps", "{:.0f}", False),
    ("terminate p50 ms", "term_p50", "{:.2f}", True),
    ("terminate p99 ms", "term_p99", "{:.2f}", True),
    ("new TLS handshakes/s", "hs", "{:.0f}", False),
    ("front CPU ms per new connection", "hs_cpu_ms", "{:.2f}", True),
]


def report(samples: dict[str, dict[str, list[float]]], args: argparse.Namespace, notes: list[str]) -> str:
    med = {n: {k: statistics.median(v) for k, v in per.items()} for n, per in samples.items()}
    for per in med.values():  # the front's own CPU for the work it did
        if "pass_cpu" in per:
            per["pass_cpu_per_gib"] = per.pop("pass_cpu") / (args.size_mb / 1024)
        if "hs_cpu" in per and per.get("hs"):
            per["hs_cpu_ms"] = per.pop("hs_cpu") * 1000 / (per["hs"] * args.duration)
        per.pop("term_cpu", None)
    lines = [
        f"edge benchmarks: meshcar edge (one process) vs nginx (one worker), 127.0.0.1, "
        f"{os.cpu_count()} CPUs; access logs {'on' if args.access_logs else 'off'}; medians of "
        f"{args.transfers} downloads of {args.size_mb} MiB / {args.rounds} x wrk -t{args.threads} "
        f"-c{args.connections} -d{args.duration}s / {args.rounds} x {args.hs_clients} s_time -new "
        f"-time {args.duration}",
        "",
        f"{'measure':<46}{'meshcar':>10}{'nginx':>10}{'meshcar/nginx':>15}",
    ]
    m, n = med["meshcar"], med["nginx"]
    for label, key, fmt, lower_wins in ROWS:
        if key not in m or key not in n:
            continue
        ratio = f"{m[key] / n[key]:.2f}x" if n[key] else "n/a"
        lines.append(f"{label + (' (lower wins)' if lower_wins else ''):<46}"
                     f"{fmt.format(m[key]):>10}{fmt.format(n[key]):>10}{ratio:>15}")
    lines += ["", "samples (in order): " + json.dumps(
        {name: {k: [round(x, 2) for x in v] for k, v in per.items()} for name, per in samples.items()})]
    lines += notes
    lines += ["", "client commands (PORT: meshcar's edge listener, or nginx's terminate/stream port):"]
    lines += [f"  {c}" for c in COMMANDS]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk and s_time run")
    p.add_argument("--warmup", type=int, default=2, help="seconds of wrk/s_time warm-up per front")
    p.add_argument("--rounds", type=int, default=3, help="wrk and s_time runs per front (median)")
    p.add_argument("--transfers", type=int, default=5, help="downloads per front (median)")
    p.add_argument("--size-mb", type=int, default=1024, help="size of the passthrough download, MiB")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--hs-clients", type=int, default=1, help="parallel `openssl s_time -new` clients")
    p.add_argument("--only", choices=("pass", "term", "hs"), action="append",
                   help="run only these measures (repeatable; default: all three)")
    p.add_argument("--no-access-logs", dest="access_logs", action="store_false")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    args = p.parse_args()
    only = set(args.only or ("pass", "term", "hs"))

    nginx, wrk, load_stream = ensure_edge_tools()
    work = Path(tempfile.mkdtemp(prefix="meshcar-edge-bench-"))
    work.chmod(0o755)  # nginx workers (an unprivileged user when run as root) read the file tree
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in FRONTS}
    notes: list[str] = []
    ok = False
    try:
        with Supervisor() as sup:
            ports, fronts = start_all(sup, nginx, load_stream, work, args)
            pids = {name: child.proc.pid for name, child in fronts.items()}
            say(f"ready: meshcar edge 127.0.0.1:{ports['edge']} (admin {ports['edge_admin']}), nginx "
                f"terminate {ports['ng_term']} / stream {ports['ng_pass']}; work dir {work}")
            sanity(ports, work / "certs")
            cafile = work / "certs" / "root.pem"
            term_port = {"meshcar": ports["edge"], "nginx": ports["ng_term"]}
            pass_port = {"meshcar": ports["edge"], "nginx": ports["ng_pass"]}
            size = args.size_mb * 1024 * 1024
            if "pass" in only:
                alternate(f"passthrough: curl downloads of {args.size_mb} MiB", args.transfers,
                          lambda f: download(pass_port[f], cafile, size),
                          lambda f: {"pass_mbps": download(pass_port[f], cafile, size)},
                          pids, samples, "pass_cpu")
            if "term" in only:
                def term(f: str) -> dict[str, float]:
                    r = wrk_terminate(wrk, term_port[f], args.duration, args, f)
                    if r.errors:
                        raise DemoStartupError(f"wrk against {f}: {r.errors}\n{r.raw}")
                    return {"term_rps": r.rps, "term_p50": r.p50_ms, "term_p99": r.p99_ms}
                alternate(f"terminate: wrk -t{args.threads} -c{args.connections} -d{args.duration}s",
                          args.rounds, lambda f: wrk_terminate(wrk, term_port[f], args.warmup, args, f),
                          term, pids, samples, "term_cpu")
            if "hs" in only:
                alternate(f"handshakes: {args.hs_clients} x openssl s_time -new -time {args.duration}",
                          args.rounds, lambda f: handshakes(term_port[f], args.warmup, args.hs_clients, cafile),
                          lambda f: {"hs": handshakes(term_port[f], args.duration, args.hs_clients, cafile)},
                          pids, samples, "hs_cpu")
            time.sleep(1.5)  # meshcar flushes its access log every second
            notes = edge_checks(work, ports["edge_admin"], args.access_logs, "pass" in only)
            dead = [c.spec.name for c in sup.dead_children()]
            if dead:
                raise DemoStartupError(f"exited during the run: {', '.join(dead)}")
            ok = True
    except (DemoStartupError, subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError,
            httpx.HTTPError) as exc:
        print(f"bench: failed: {exc}", file=sys.stderr)
    finally:
        if args.keep or not ok:
            say(f"work directory kept (logs, configs): {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if any(samples[name] for name in FRONTS):
        print()
        print(report(samples, args, notes))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
