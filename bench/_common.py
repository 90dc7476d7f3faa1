"""What the sidecar-pair bench scripts share (run_mesh_bench, run_tcp_bench, run_ws_bench).

Not a script: free ports, CPU seconds from /proc, a meshcar CA for the run, a sidecar's
directory (join token, config) and its process spec, an nginx config written from a
template's text and its spec, and the alternating rounds of the bulk benches (TCP,
WebSocket) with their report.
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshcar.demo.pki import write_private  # noqa: E402
from meshcar.demo.plan import Probe, ProcSpec, meshcar_argv  # noqa: E402
from meshcar.demo.supervisor import DemoStartupError, Supervisor  # noqa: E402

TRUST_DOMAIN = "bench.meshcar.test"

# The start of the bulk benches' nginx configs (see start_nginx): one worker, no access log,
# the probe server on @@PROBE@@ that says it is up; the http block is left open.
NGINX_HEAD = """
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
"""


def say(msg: str) -> None:
    print(f"bench: {msg}", flush=True)


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_tree(pid: int) -> list[int]:
    """pid and its children (nginx: master and workers)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return [pid, *(int(k) for k in kids)]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and their children, from /proc."""
    ticks = 0
    for top in pids:
        for pid in _proc_tree(top):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def run_meshcar_cmd(*args: str) -> str:
    r = subprocess.run(meshcar_argv(*args), capture_output=True, text=True, check=False, timeout=60)
    if r.returncode != 0:
        raise DemoStartupError(f"meshcar {' '.join(args[:2])} failed: {r.stderr.strip()}")
    return r.stdout


def spiffe_ids(*names: str) -> dict[str, str]:
    return {n: f"spiffe://{TRUST_DOMAIN}/svc/{n}" for n in names}


def meshcar_ca(work: Path, ca_port: int) -> tuple[ProcSpec, Path]:
    """`meshcar ca init` in work/ca, and the spec of its `ca serve` on ca_port."""
    ca_dir = work / "ca"
    run_meshcar_cmd("ca", "init", "--dir", str(ca_dir), "--trust-domain", TRUST_DOMAIN)
    spec = ProcSpec(
        "meshcar-ca",
        meshcar_argv("ca", "serve", "--dir", str(ca_dir), "--listen", f"127.0.0.1:{ca_port}"),
        Probe(f"https://127.0.0.1:{ca_port}/healthz", cafile=ca_dir / "root.pem"),
    )
    return spec, ca_dir


def sidecar_spec(
    work: Path,
    name: str,
    spiffe_id: str,
    ca_dir: Path,
    ca_port: int,
    admin: int,
    cfg: dict[str, object],
    uses: int | None = None,
) -> ProcSpec:
    """work/sidecar-NAME with a join token (single-use with uses=1) and sidecar.yaml: the
    identity from the CA on ca_port, then cfg, then the admin listener on admin."""
    d = work / f"sidecar-{name}"
    d.mkdir(mode=0o700)
    limit = ("--uses", str(uses)) if uses is not None else ()
    token = run_meshcar_cmd(
        "ca", "token", "--dir", str(ca_dir), "--spiffe-id", spiffe_id, "--ttl", "1h", *limit
    ).strip()
    write_private(d / "join.token", token.encode() + b"\n")
    full: dict[str, object] = {
        "identity": {
            "spiffe_id": spiffe_id,
            "ca_url": f"https://127.0.0.1:{ca_port}",
            "ca_bundle": str(ca_dir / "root.pem"),
            "token_file": str(d / "join.token"),
            "state_dir": str(d / "state"),
        },
        **cfg,
        "admin": {"listen": f"127.0.0.1:{admin}"},
    }
    (d / "sidecar.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    return ProcSpec(
        f"meshcar-sidecar-{name}",
        meshcar_argv("sidecar", "--config", str(d / "sidecar.yaml")),
        Probe(f"http://127.0.0.1:{admin}/ready"),
    )


def start_sidecars(
    sup: Supervisor,
    work: Path,
    ca_port: int,
    sidecars: dict[str, tuple[str, int, dict[str, object]]],
) -> list[int]:
    """A meshcar CA on ca_port, then a sidecar per name (-> its SPIFFE ID, admin port and
    config, as sidecar_spec takes them), all ready; the sidecars' pids."""
    ca, ca_dir = meshcar_ca(work, ca_port)
    sup.wait_ready([sup.start(ca, work / "logs" / "meshcar-ca.log")], timeout=30)
    children = []
    for name, (spiffe_id, admin, cfg) in sidecars.items():
        spec = sidecar_spec(work, name, spiffe_id, ca_dir, ca_port, admin, cfg)
        children.append(sup.start(spec, work / "logs" / f"{spec.name}.log"))
    sup.wait_ready(children, timeout=60)
    return [c.proc.pid for c in children]


def start_nginx(
    sup: Supervisor,
    nginx: str,
    work: Path,
    template: str,
    roles: dict[str, tuple[int, dict[str, str]]],
) -> list[int]:
    """An nginx per role (-> its probe port and its values for template, see write_nginx_conf)
    in work/nginx-ROLE, all ready; their pids."""
    children = []
    for role, (probe, values) in roles.items():
        conf = write_nginx_conf(
            template, work / f"nginx-{role}", {**values, "PROBE": str(probe)}, role
        )
        spec = nginx_spec(nginx, f"nginx-{role}", conf, Probe(f"http://127.0.0.1:{probe}/"))
        children.append(sup.start(spec, work / "logs" / f"{spec.name}.log"))
    sup.wait_ready(children, timeout=30)
    return [c.proc.pid for c in children]


def write_nginx_conf(text: str, prefix: Path, values: dict[str, str], what: str) -> Path:
    """prefix/nginx.conf from text with each @@KEY@@ replaced in values' order, then
    @@PREFIX@@ (prefix/tmp made for the temp paths); an unfilled placeholder is an error."""
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "tmp").mkdir(exist_ok=True)
    for key, value in {**values, "PREFIX": str(prefix)}.items():
        text = text.replace(f"@@{key}@@", value)
    left = re.findall(r"@@[A-Z_]+@@", text)
    if left:
        raise SystemExit(f"bench: unfilled placeholders in {what}: {left}")
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    return conf


def nginx_spec(nginx: str, name: str, conf: Path, probe: Probe) -> ProcSpec:
    return ProcSpec(name, (nginx, "-p", str(conf.parent), "-c", str(conf)), probe)


def bulk_rounds(
    pairs: dict[str, Pair],
    rounds: int,
    cases: Mapping[str, Callable[[int], tuple[float, float]]],
    warm: Callable[[int], object],
) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """Each pair (name -> its port and the pids of its two proxies) warmed up and checked
    with `warm(port)` (8 MiB), then `rounds` rounds of each case on each pair in turn: a
    case (its label -> a send taking the port, returning seconds and MiB sent) is timed
    with the CPU its pair's proxies used. Returns (pair, label) -> [(MiB/s, CPU s/GiB)]."""
    for name, (port, _) in pairs.items():
        warm(port)
        say(f"{name}: 8 MiB crossed")
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in range(rounds):
        for case, send in cases.items():
            for name, (port, pids) in pairs.items():
                cpu0 = cpu_seconds(pids)
                took, mib = send(port)
                cpu = cpu_seconds(pids) - cpu0
                gib = mib / 1024
                results.setdefault((name, case), []).append((mib / took, cpu / gib))
                what = f"{name} {case}" if case else name
                say(f"round {r + 1} {what}: {mib / took:.0f} MiB/s, {cpu / gib:.2f} CPU s/GiB")
    return results


Pair = tuple[int, list[int]]  # the port a client sends to, the pids of the pair's two proxies


def run_bulk(
    kind: str,
    app_code: str,
    nginx_pair: Callable[[Supervisor, Path, int], Pair],
    meshcar_pair: Callable[[Supervisor, Path, int], Pair],
    rounds: int,
    cases: Mapping[str, Callable[[int], tuple[float, float]]],
    warm: Callable[[int], object],
    column: str,
) -> None:
    """A bulk bench: the app (app_code run with its port as argument), both pairs in front
    of it, bulk_rounds over them, then bulk_report."""
    work = Path(tempfile.mkdtemp(prefix=f"meshcar-{kind}-bench-"))
    (app_port,) = free_ports(1)
    app = subprocess.Popen([sys.executable, "-c", app_code, str(app_port)])
    try:
        with Supervisor() as sup:
            pairs = {
                "nginx": nginx_pair(sup, work, app_port),
                "meshcar": meshcar_pair(sup, work, app_port),
            }
            results = bulk_rounds(pairs, rounds, cases, warm)
    finally:
        app.terminate()
        app.wait()
    bulk_report(results, list(cases), column)


def bulk_report(
    results: dict[tuple[str, str], list[tuple[float, float]]], cases: list[str], column: str
) -> None:
    """The load average, then a row per case (under `column`, none when it is ""): the
    medians of nginx and meshcar, their ratio and the proxies' CPU per GiB."""
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\nload average after the run: {' '.join(load)}; {os.cpu_count()} CPUs")
    head = f"{column:>8} " if column else ""
    print(f"{head}{'nginx MiB/s':>12} {'meshcar MiB/s':>14} {'ratio':>6} "
          f"{'nginx CPU s/GiB':>16} {'meshcar CPU s/GiB':>18}")  # fmt: skip
    for case in cases:
        ng, mc = results[("nginx", case)], results[("meshcar", case)]
        ng_t = statistics.median(x[0] for x in ng)
        mc_t = statistics.median(x[0] for x in mc)
        row = f"{case:>8} " if column else ""
        print(
            f"{row}{ng_t:>12.0f} {mc_t:>14.0f} {mc_t / ng_t:>6.2f} "
            f"{statistics.median(x[1] for x in ng):>16.2f} "
            f"{statistics.median(x[1] for x in mc):>18.2f}"
        )
