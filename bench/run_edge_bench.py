#!/usr/bin/env python3
"""Issue 3: the edge (`meshcar edge`) against nginx on one machine, three measures, one run.

    .venv/bin/python bench/run_edge_bench.py [--duration 10] [--size-mb 1024] [--rounds 5]
    .venv/bin/python bench/run_edge_bench.py --only hs --only pass     # some measures only
    .venv/bin/python bench/run_edge_bench.py --hold                    # start, print ports/pids, wait

A script, not a test.  It installs nginx (nginx-light, with libnginx-mod-stream), wrk, curl
and openssl from Debian's packages if they are missing, then starts, all on 127.0.0.1:

- the backends, shared by both fronts: "the app" (one nginx worker, `return 200`,
  bench/nginx/app.conf) and a TLS backend (one nginx worker serving a large sparse file
  with sendfile, the same ECDSA P-256 certificate, bench/nginx/edge_tls_backend.conf);
- meshcar's edge, a real process (`python -m meshcar.cli edge --config FILE`, ready when its
  admin `/ready` says so) with two routes on one listener: `www.bench.test` terminate to
  the app (also the `default_route`) and `pass.bench.test` passthrough to the TLS backend
  (no PROXY header);
- nginx as the edge (one worker; `--workers N`: N nginx workers and meshcar `workers: N`,
  N SO_REUSEPORT processes; bench/nginx/edge_front.conf): `listen ssl` with the same
  certificate and `proxy_pass http://` to the app over a keep-alive pool, and a `stream`
  server with `ssl_preread on` routing `$ssl_preread_server_name` to the TLS backend.

Every process is started and stopped by the demo's Supervisor (also on errors).  Each front
is checked once with a real request first.  Measures:

1. passthrough bulk throughput: `curl` downloads the large file through the front
   (`--resolve pass.bench.test:PORT:127.0.0.1`, the certificate verified), MB/s;
2. terminate requests/s: `wrk --latency` over HTTPS keep-alive to `https://127.0.0.1:PORT/`
   with `Host: www.bench.test` (wrk's SNI is then the IP: meshcar's default_route applies);
3. new TLS handshakes/s: `openssl s_time -new` (a full handshake per connection, no
   resumption; s_time sends no SNI, so meshcar's default_route applies), one or more
   clients in parallel; the rate is their connection count over the wall-clock seconds
   measured here (s_time itself prints whole seconds).

Method: each measure runs once per front as an uncounted warm-up (the first read of the big
file fills the page cache; pools fill), then `--rounds` times with meshcar and nginx
alternating in ABBA order, so background load hits both alike and neither always goes
first.  Around every sample the front's own CPU time is read from /proc (nginx: master +
worker), giving CPU seconds per GiB relayed and CPU ms per new connection, steadier figures
than the rates on a shared machine.  The table shows medians and the ratio meshcar/nginx
with the targets; every raw sample is printed.  From meshcar's own /metrics it reports the
change of `meshcar_tls_handshakes_total{direction="edge"}` per `result` label over the
counted handshake rounds, and from its access log that passthrough was spliced.  Access
logs are on for both fronts by default (meshcar at level info; nginx to a file with a
64 KiB buffer, as meshcar batches its writes); `--no-access-logs` turns both off.  Exit
status is non-zero if something failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
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
MEASURES = ("pass", "term", "hs")
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
GIB = 1024 * 1024 * 1024
HANDSHAKES_METRIC = "meshcar_tls_handshakes_total"

COMMANDS: list[str] = []  # the exact client commands, printed at the end


def log_command(cmd: str) -> None:
    if cmd not in COMMANDS:
        COMMANDS.append(cmd)


def run_logged(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    log_command(shlex.join(argv))
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
        subprocess.run(
            ["apt-get", "install", "-y", "libnginx-mod-stream", "curl", "openssl"],
            check=True,
            env=env,
        )
    if static:
        return nginx, wrk, ""
    if not STREAM_MODULE.exists():
        sys.exit(f"bench: {STREAM_MODULE} still missing after apt-get install")
    return nginx, wrk, f"load_module {STREAM_MODULE};"


def child_pids(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its direct children (nginx: master + worker)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in [pid, *child_pids(pid)]:
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
    write_private(
        d / "site.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def edge_spec(work: Path, ports: dict[str, int], access_logs: bool, workers: int = 1) -> ProcSpec:
    certs = work / "certs"
    cfg: dict[str, object] = {
        "listen": {"https": f"127.0.0.1:{ports['edge']}"},
        "admin": {"listen": f"127.0.0.1:{ports['edge_admin']}"},
        "default_route": HOST_T,
        "log_level": "info" if access_logs else "warning",
        "routes": [
            {
                "host": HOST_T,
                "mode": "terminate",
                "tls": {"cert": str(certs / "site.pem"), "key": str(certs / "site.key")},
                "backend": {"endpoints": [f"127.0.0.1:{ports['app']}"]},
            },
            {
                "host": HOST_P,
                "mode": "passthrough",
                "backend": {"endpoints": [f"127.0.0.1:{ports['tls_backend']}"]},
            },
        ],
    }
    if workers != 1:
        cfg["workers"] = workers
    d = work / "meshcar-edge"
    d.mkdir()
    (d / "edge.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return ProcSpec(
        "meshcar-edge",
        meshcar_argv("edge", "--config", str(d / "edge.yaml")),
        Probe(f"http://127.0.0.1:{ports['edge_admin']}/ready"),
    )


def start_all(
    sup: Supervisor, nginx: str, load_stream: str, work: Path, args: argparse.Namespace
) -> tuple[dict[str, int], dict[str, Child]]:
    """Backends, nginx front and meshcar edge; returns the ports and the children by role."""
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
    values = {
        "APP_PORT": str(ports["app"]),
        "TLS_BACKEND_PORT": str(ports["tls_backend"]),
        "TERM_PORT": str(ports["ng_term"]),
        "PASS_PORT": str(ports["ng_pass"]),
        "PASS_HOST": HOST_P,
        "CERTS": str(certs),
        "WWW": str(www),
        "LOAD_STREAM": load_stream,
        "WORKERS": str(args.workers),
    }
    front_prefix = work / "nginx-front"
    if args.access_logs:
        values["HTTP_ACCESS_LOG"] = (
            f"access_log {front_prefix}/access.log edge buffer=64k flush=1s;"
        )
        values["STREAM_ACCESS_LOG"] = (
            f"access_log {front_prefix}/stream.log conn buffer=64k flush=1s;"
        )
    else:
        values["HTTP_ACCESS_LOG"] = values["STREAM_ACCESS_LOG"] = "access_log off;"
    app = sup.start(
        nginx_spec(
            nginx,
            "app",
            render_nginx("app.conf", work / "nginx-app", values),
            Probe(f"http://127.0.0.1:{ports['app']}/"),
        ),
        logs / "app.log",
    )
    backend = sup.start(
        nginx_spec(
            nginx,
            "tls-backend",
            render_nginx("edge_tls_backend.conf", work / "nginx-tls-backend", values),
            Probe(
                f"https://127.0.0.1:{ports['tls_backend']}/index.html",
                cafile=certs / "root.pem",
                server_hostname=HOST_P,
            ),
        ),
        logs / "tls-backend.log",
    )
    sup.wait_ready([app, backend], timeout=30)
    front = sup.start(
        nginx_spec(
            nginx,
            "nginx-front",
            render_nginx("edge_front.conf", front_prefix, values),
            Probe(
                f"https://127.0.0.1:{ports['ng_term']}/",
                cafile=certs / "root.pem",
                server_hostname=HOST_T,
            ),
        ),
        logs / "nginx-front.log",
    )
    edge = sup.start(
        edge_spec(work, ports, args.access_logs, args.workers), logs / "meshcar-edge.log"
    )
    sup.wait_ready([front, edge], timeout=60)
    return ports, {"meshcar": edge, "nginx": front, "app": app, "tls_backend": backend}


def sanity(ports: dict[str, int], certs: Path) -> None:
    """Each front answers a real terminate request with the app's body, presenting the cert."""
    for name, port in (("meshcar", ports["edge"]), ("nginx", ports["ng_term"])):
        with httpx.Client(verify=str(certs / "root.pem"), trust_env=False, timeout=10) as c:
            r = c.get(
                f"https://127.0.0.1:{port}/",
                headers={"Host": HOST_T},
                extensions={"sni_hostname": HOST_T},
            )
        if r.status_code != 200 or r.content != APP_BODY:
            raise DemoStartupError(f"{name} terminate: {r.status_code} {r.content[:200]!r}")


def hold(work: Path, ports: dict[str, int], children: dict[str, Child]) -> None:
    """Print where everything is as one JSON line, then wait for Ctrl-C or SIGTERM."""
    pids = {role: c.proc.pid for role, c in children.items()}
    info = {
        "work_dir": str(work),
        "ports": ports,
        "pids": pids,
        "nginx_front_workers": child_pids(pids["nginx"]),
        "hosts": {"terminate": HOST_T, "passthrough": HOST_P},
        "cafile": str(work / "certs" / "root.pem"),
        "big_file": f"https://{HOST_P}:PORT/big ({(work / 'www' / 'big').stat().st_size} bytes)",
    }
    print(json.dumps(info), flush=True)
    say("holding: everything runs until Ctrl-C or SIGTERM")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        say("stopping")


# --------------------------------------------------------------------------- measures


def download(port: int, cafile: Path, size: int) -> float:
    """One download of the big file through the front's passthrough route, in MB/s."""
    r = run_logged(
        [
            "curl",
            "-sS",
            "--cacert",
            str(cafile),
            "--resolve",
            f"{HOST_P}:{port}:127.0.0.1",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{time_total}",
            f"https://{HOST_P}:{port}/big",
        ],
        check=False,
        timeout=600,
    )
    parts = r.stdout.split()
    if r.returncode != 0 or len(parts) != 3 or parts[0] != "200" or int(parts[1]) != size:
        raise DemoStartupError(
            f"curl through {port}: rc {r.returncode} {r.stdout!r} {r.stderr.strip()!r}"
            f" (expected 200 and {size} bytes)"
        )
    return int(parts[1]) / float(parts[2]) / 1e6


def wrk_terminate(
    wrk: str, port: int, seconds: int, args: argparse.Namespace, name: str
) -> WrkResult:
    argv = [
        wrk,
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{seconds}s",
        "--latency",
        "-H",
        f"Host: {HOST_T}",
        f"https://127.0.0.1:{port}/",
    ]
    r = run_logged(argv, check=True, timeout=seconds + 60)
    return parse_wrk(name, r.stdout)


def handshakes(port: int, seconds: int, clients: int, cafile: Path) -> tuple[int, float]:
    """New TLS connections: `clients` parallel `openssl s_time -new`, each a full handshake
    per connection, one at a time.  Returns (their connection count, the wall-clock seconds
    measured here); s_time itself prints whole seconds."""
    argv = [
        "openssl",
        "s_time",
        "-connect",
        f"127.0.0.1:{port}",
        "-new",
        "-time",
        str(seconds),
        "-CAfile",
        str(cafile),
    ]
    log_command(shlex.join(argv) + (f"   ({clients} in parallel)" if clients > 1 else ""))
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(clients)
    ]
    outs = [p.communicate(timeout=seconds + 60) for p in procs]
    wall = time.monotonic() - t0
    total = 0
    for out, err in outs:
        m = re.search(r"(\d+) connections in ([\d.]+) real seconds", out)
        if not m:
            raise DemoStartupError(f"openssl s_time on {port} failed: {out[-400:]} {err[-400:]}")
        total += int(m.group(1))
    return total, wall


Sample = dict[str, float]


def alternate(
    what: str,
    rounds: int,
    warmup: Callable[[str], object],
    one: Callable[[str], Sample],
    per_cpu: Callable[[Sample, float], Sample],
    pids: dict[str, int],
    samples: dict[str, dict[str, list[float]]],
    before_rounds: Callable[[], None] | None = None,
) -> None:
    """Warm up both fronts (not counted), then `rounds` rounds with the fronts in ABBA order;
    each sample also gets the front's own CPU for it, turned into figures by `per_cpu`."""
    say(f"{what}: warm-up, then {rounds} rounds, meshcar and nginx alternating (ABBA)")
    for name in FRONTS:
        warmup(name)
    if before_rounds is not None:
        before_rounds()
    for i in range(rounds):
        for name in FRONTS if i % 2 == 0 else FRONTS[::-1]:
            cpu0 = cpu_seconds(pids[name])
            values = one(name)
            cpu = cpu_seconds(pids[name]) - cpu0
            values.update(per_cpu(values, cpu))
            for k, v in values.items():
                samples[name].setdefault(k, []).append(v)


# --------------------------------------------------------------------------- meshcar's own view

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def edge_handshakes(admin_port: int) -> dict[str, float]:
    """meshcar_tls_handshakes_total{direction="edge"} by `result`, every label that appears."""
    with httpx.Client(trust_env=False, timeout=10) as c:
        text = c.get(f"http://127.0.0.1:{admin_port}/metrics").text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(HANDSHAKES_METRIC + "{"):
            continue
        labels_text, _, value = line[len(HANDSHAKES_METRIC) + 1 :].rpartition("} ")
        labels = dict(_LABEL.findall(labels_text))
        if labels.get("direction") == "edge":
            result = labels.get("result", "?")
            counts[result] = counts.get(result, 0.0) + float(value)
    return counts


def handshake_note(before: dict[str, float], after: dict[str, float], connections: float) -> str:
    deltas = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in sorted(set(before) | set(after))}
    shown = ", ".join(f"{k} +{v:.0f}" for k, v in deltas.items() if v) or "no change"
    return (
        f'meshcar {HANDSHAKES_METRIC}{{direction="edge"}} during the counted handshake rounds '
        f"({connections:.0f} s_time connections to meshcar): {shown}"
    )


def passthrough_note(work: Path) -> str:
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
    return f"meshcar passthrough connections (access log): {spliced} spliced, {copied} copied in Python"


# --------------------------------------------------------------------------- report

# label, key, format, lower wins, target (text, met when the ratio meshcar/nginx satisfies it)
ROWS: list[tuple[str, str, str, bool, tuple[str, Callable[[float], bool]] | None]] = [
    (
        "passthrough download MB/s",
        "pass_mbps",
        "{:.0f}",
        False,
        ("ahead of nginx", lambda r: r > 1.0),
    ),
    ("passthrough front CPU s per GiB", "pass_cpu_per_gib", "{:.2f}", True, None),
    ("terminate requests/s", "term_rps", "{:.0f}", False, None),
    ("terminate p50 ms", "term_p50", "{:.2f}", True, None),
    ("terminate p99 ms", "term_p99", "{:.2f}", True, None),
    ("terminate front CPU us per request", "term_cpu_us", "{:.1f}", True, None),
    ("new TLS handshakes/s", "hs", "{:.0f}", False, (">= 0.8x", lambda r: r >= 0.8)),
    ("front CPU ms per new connection", "hs_cpu_ms", "{:.2f}", True, None),
]


def report(
    samples: dict[str, dict[str, list[float]]], args: argparse.Namespace, notes: list[str]
) -> str:
    med = {n: {k: statistics.median(v) for k, v in per.items()} for n, per in samples.items()}
    runs = {
        "pass_mbps": f"{args.transfers} downloads of {args.size_mb} MiB",
        "term_rps": f"{args.rounds} x wrk -t{args.threads} -c{args.connections} -d{args.duration}s",
        "hs": f"{args.rounds} x {args.hs_clients} s_time -new -time {args.duration}",
    }
    lines = [
        f"edge benchmarks: meshcar edge (workers: {args.workers}) vs nginx (worker_processes "
        f"{args.workers}), 127.0.0.1, "
        f"{os.cpu_count()} CPUs; access logs {'on' if args.access_logs else 'off'}; medians after "
        f"one warm-up per front, fronts alternating ABBA: "
        + " / ".join(text for key, text in runs.items() if key in med["meshcar"]),
        "",
        f"{'measure':<50}{'meshcar':>10}{'nginx':>10}{'meshcar/nginx':>15}  target",
    ]
    m, n = med["meshcar"], med["nginx"]
    for label, key, fmt, lower_wins, target in ROWS:
        if key not in m or key not in n:
            continue
        ratio = m[key] / n[key] if n[key] else None
        goal = ""
        if target is not None and ratio is not None:
            goal = f"{target[0]}: {'met' if target[1](ratio) else 'NOT met'}"
        lines.append(
            f"{label + (' (lower wins)' if lower_wins else ''):<50}"
            f"{fmt.format(m[key]):>10}{fmt.format(n[key]):>10}"
            f"{(f'{ratio:.2f}x' if ratio is not None else 'n/a'):>15}  {goal}".rstrip()
        )
    lines += [
        "",
        "samples (in order): "
        + json.dumps(
            {
                name: {k: [round(x, 2) for x in v] for k, v in per.items()}
                for name, per in samples.items()
            }
        ),
    ]
    lines += notes
    lines += [
        "",
        "client commands (PORT: meshcar's edge listener, or nginx's terminate/stream port):",
    ]
    lines += [f"  {c}" for c in COMMANDS]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk and s_time run")
    p.add_argument(
        "--warmup", type=int, default=2, help="seconds of the wrk/s_time warm-up per front"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="counted rounds per measure; the fronts alternate ABBA and the median counts",
    )
    p.add_argument(
        "--transfers",
        type=int,
        default=None,
        help="counted downloads per front for passthrough (default: --rounds)",
    )
    p.add_argument(
        "--size-mb", type=int, default=1024, help="size of the passthrough download, MiB"
    )
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--connections", type=int, default=32, help="wrk connections")
    p.add_argument(
        "--hs-clients", type=int, default=1, help="parallel `openssl s_time -new` clients"
    )
    p.add_argument(
        "--only",
        choices=MEASURES,
        action="append",
        help="run only this measure: pass, term or hs (repeatable; default: all three)",
    )
    p.add_argument(
        "--hold",
        action="store_true",
        help="start everything, print ports and pids as JSON and wait (to profile by hand)",
    )
    p.add_argument("--no-access-logs", dest="access_logs", action="store_false")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="meshcar edge `workers` and nginx `worker_processes` (same for both fronts)",
    )
    args = p.parse_args()
    if args.transfers is None:
        args.transfers = args.rounds
    only = set(args.only or MEASURES)

    nginx, wrk, load_stream = ensure_edge_tools()
    work = Path(tempfile.mkdtemp(prefix="meshcar-edge-bench-"))
    work.chmod(0o755)  # nginx workers (an unprivileged user when run as root) read the file tree
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in FRONTS}
    notes: list[str] = []
    ok = False
    try:
        with Supervisor() as sup:
            ports, children = start_all(sup, nginx, load_stream, work, args)
            pids = {name: children[name].proc.pid for name in FRONTS}
            say(
                f"ready: meshcar edge 127.0.0.1:{ports['edge']} (admin {ports['edge_admin']}), nginx "
                f"terminate {ports['ng_term']} / stream {ports['ng_pass']}; work dir {work}"
            )
            sanity(ports, work / "certs")
            if args.hold:
                hold(work, ports, children)
                ok = True
                return 0
            cafile = work / "certs" / "root.pem"
            term_port = {"meshcar": ports["edge"], "nginx": ports["ng_term"]}
            pass_port = {"meshcar": ports["edge"], "nginx": ports["ng_pass"]}
            size = args.size_mb * 1024 * 1024
            if "pass" in only:
                alternate(
                    f"passthrough: curl downloads of {args.size_mb} MiB",
                    args.transfers,
                    lambda f: download(pass_port[f], cafile, size),
                    lambda f: {"pass_mbps": download(pass_port[f], cafile, size)},
                    lambda v, cpu: {"pass_cpu_per_gib": cpu / (size / GIB)},
                    pids,
                    samples,
                )
            if "term" in only:

                def term(f: str) -> Sample:
                    r = wrk_terminate(wrk, term_port[f], args.duration, args, f)
                    if r.errors:
                        raise DemoStartupError(f"wrk against {f}: {r.errors}\n{r.raw}")
                    return {
                        "term_rps": r.rps,
                        "term_p50": r.p50_ms,
                        "term_p99": r.p99_ms,
                        "term_requests": r.requests,
                    }

                alternate(
                    f"terminate: wrk -t{args.threads} -c{args.connections} -d{args.duration}s",
                    args.rounds,
                    lambda f: wrk_terminate(wrk, term_port[f], args.warmup, args, f),
                    term,
                    lambda v, cpu: {"term_cpu_us": cpu * 1e6 / max(v["term_requests"], 1)},
                    pids,
                    samples,
                )
            if "hs" in only:
                before: dict[str, float] = {}

                def snapshot() -> None:
                    time.sleep(0.5)  # the warm-up's last connections are counted when they end
                    before.update(edge_handshakes(ports["edge_admin"]))

                def hs(f: str) -> Sample:
                    conns, wall = handshakes(term_port[f], args.duration, args.hs_clients, cafile)
                    return {"hs": conns / wall, "hs_conns": conns, "hs_wall": wall}

                alternate(
                    f"handshakes: {args.hs_clients} x openssl s_time -new -time {args.duration}",
                    args.rounds,
                    lambda f: handshakes(term_port[f], args.warmup, args.hs_clients, cafile),
                    hs,
                    lambda v, cpu: {"hs_cpu_ms": cpu * 1000 / max(v["hs_conns"], 1)},
                    pids,
                    samples,
                    before_rounds=snapshot,
                )
                time.sleep(1)  # let the last connections end and be counted
                notes.append(
                    handshake_note(
                        before,
                        edge_handshakes(ports["edge_admin"]),
                        sum(samples["meshcar"]["hs_conns"]),
                    )
                )
            if "pass" in only and args.access_logs:
                time.sleep(1.5)  # meshcar flushes its access log every second
                notes.append(passthrough_note(work))
            dead = [c.spec.name for c in sup.dead_children()]
            if dead:
                raise DemoStartupError(f"exited during the run: {', '.join(dead)}")
            ok = True
    except (
        DemoStartupError,
        subprocess.CalledProcessError,
        subprocess.TimeoutExpired,
        ValueError,
        httpx.HTTPError,
    ) as exc:
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
