#!/usr/bin/env python3
"""Issue 2 §6: app -> sidecar -> mTLS -> sidecar -> app, meshcar against nginx, in one run.

    .venv/bin/python bench/run_mesh_bench.py [--duration 10] [--threads 2] [--connections 32]

A script, not a test.  It installs nginx and wrk from Debian's packages if they are missing,
then measures two sidecar pairs in front of the same upstream ("the app": an nginx worker
answering a static 200, so that only the sidecars differ):

- nginx: outbound nginx (plain HTTP in, `proxy_pass https://` with a client certificate,
  `proxy_ssl_verify on`, TLS 1.3, keep-alive upstream pool, session reuse) -> inbound nginx
  (`ssl_verify_client on`, caller authorized by certificate, XFCC set) -> app;
- meshcar: `meshcar sidecar` a (outbound proxy, `Host: b`) -> `meshcar sidecar` b (mesh
  listener, allow a) -> app; identities from a `meshcar ca serve` started for the run.

One worker/process per sidecar by default; `--workers 1,2` measures every pair at each count
(nginx `worker_processes N`, meshcar `workers: N`: N SO_REUSEPORT processes) in the same
run and reports the scaling from the first count to the others.  Each pair is checked once with a real request (200 and the
app's body) and warmed up (pools filled), then wrk runs with `--latency`.  Prints requests/s,
p50 and p99 latency for both and the ratio meshcar/nginx.  Both pairs write one access-log
line per request by default (meshcar always does at log level info); `--no-access-logs`
turns logging off on both.  Exit status is non-zero if either half failed or saw errors.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _common import (  # noqa: E402
    TRUST_DOMAIN,
    cpu_seconds,
    free_ports,
    meshcar_ca,
    nginx_spec,
    say,
    sidecar_spec,
    spiffe_ids,
    write_nginx_conf,
)

from meshcar.demo.pki import make_ca, make_leaf, write_private  # noqa: E402
from meshcar.demo.plan import Probe, ProcSpec  # noqa: E402
from meshcar.demo.supervisor import DemoStartupError, Supervisor  # noqa: E402

NGINX_DIR = REPO / "bench" / "nginx"
APP_BODY = b"hello from the app\n"


@dataclass(frozen=True)
class WrkResult:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: str  # "" when wrk reported no socket errors and no non-2xx/3xx answers
    raw: str
    cpu_us_per_req: float = 0.0  # the pair's user+system CPU over the measured run / requests


# --------------------------------------------------------------------------- tools


def ensure_tools() -> tuple[str, str]:
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    wrk = shutil.which("wrk")
    if nginx and wrk:
        return nginx, wrk
    if os.geteuid() != 0:
        sys.exit("bench: nginx and wrk are needed: apt-get install -y nginx-light wrk (as root)")
    say("installing nginx and wrk from Debian packages")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env)
    pkgs = ["wrk"] + ([] if nginx else ["nginx-light"])
    if subprocess.run(["apt-get", "install", "-y", *pkgs], env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "install", "-y", "wrk", "nginx"], check=True, env=env)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    wrk = shutil.which("wrk")
    if not (Path(nginx).exists() and wrk):
        sys.exit("bench: nginx or wrk still missing after apt-get install")
    return nginx, wrk


# --------------------------------------------------------------------------- nginx pair


def nginx_pki(d: Path) -> None:
    """Root -> a, b: ECDSA P-256 leaves with SPIFFE URI SANs (and DNS names nginx can check)."""
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    root, root_key = make_ca("bench mesh root")
    (d / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    for name in ("a", "b"):
        cert, key = make_leaf(
            root,
            root_key,
            f"{name}.mesh",
            dns_names=(f"{name}.mesh",),
            uris=(f"spiffe://{TRUST_DOMAIN}/svc/{name}",),
            server=True,
            client=True,
            days=2,
        )
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_private(
            d / f"{name}.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )


def render_nginx(template: str, prefix: Path, values: dict[str, str]) -> Path:
    return write_nginx_conf((NGINX_DIR / template).read_text(), prefix, values, template)


# --------------------------------------------------------------------------- meshcar pair


def meshcar_specs(
    work: Path, app_port: int, access_logs: bool, workers: int = 1
) -> tuple[ProcSpec, list[ProcSpec], dict[str, int]]:
    ca_port, a_in, a_out, a_admin, b_in, b_admin = free_ports(6)
    ca, ca_dir = meshcar_ca(work, ca_port)
    ids = spiffe_ids("a", "b")
    sidecars = []
    for name, inbound, admin, allow, upstreams, out in (
        (
            "a",
            a_in,
            a_admin,
            [],
            {"b": {"endpoints": [f"127.0.0.1:{b_in}"], "spiffe_id": ids["b"]}},
            a_out,
        ),
        ("b", b_in, b_admin, [ids["a"]], {}, None),
    ):
        cfg: dict[str, object] = {
            "app": {"host": "127.0.0.1", "port": app_port},
            "inbound": {"listen": f"127.0.0.1:{inbound}", "allow": allow},
            "log_level": "info" if access_logs else "warning",
        }
        if workers != 1:
            cfg["workers"] = workers
        if out is not None:
            cfg["outbound"] = {"listen": f"127.0.0.1:{out}", "upstreams": upstreams}
        sidecars.append(sidecar_spec(work, name, ids[name], ca_dir, ca_port, admin, cfg, uses=1))
    return ca, sidecars, {"out": a_out, "in": b_in, "a_admin": a_admin, "b_admin": b_admin}


# --------------------------------------------------------------------------- measuring


def sanity(url: str, host: str | None) -> None:
    headers = {"Host": host} if host else {}
    with httpx.Client(trust_env=False, timeout=10) as c:
        r = c.get(url, headers=headers)
    if r.status_code != 200 or r.content != APP_BODY:
        raise DemoStartupError(f"GET {url}: {r.status_code} {r.content[:200]!r}, expected the app")


def refuses_without_client_cert(port: int, cafile: Path) -> None:
    """The inbound side must not serve a TLS client that presents no certificate."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.check_hostname = False  # SVIDs carry no DNS name; the chain is still verified
    try:
        with httpx.Client(verify=ctx, trust_env=False, timeout=10) as c:
            status = c.get(f"https://127.0.0.1:{port}/").status_code
    except httpx.HTTPError as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise DemoStartupError(
                f"inbound 127.0.0.1:{port}: its certificate does not verify against {cafile}: {exc}"
            ) from exc
        return  # refused during or right after the handshake, as it should be
    if status == 200:
        raise DemoStartupError(f"inbound 127.0.0.1:{port} served a client without a certificate")


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(name: str, out: str) -> WrkResult:
    def latency(pct: str) -> float:
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            raise ValueError(f"no {pct}% line in wrk output")
        return float(m.group(1)) * _UNIT_MS[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not (rps and total):
        raise ValueError("wrk output without Requests/sec")
    errors = []
    if m := re.search(r"Socket errors:.*", out):
        errors.append(m.group(0).strip())
    if m := re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out):
        errors.append(f"{m.group(1)} non-2xx/3xx responses")
    return WrkResult(
        name,
        float(rps.group(1)),
        latency("50"),
        latency("99"),
        int(total.group(1)),
        "; ".join(errors),
        out,
    )


def run_wrk(
    wrk: str, name: str, url: str, host: str | None, args: argparse.Namespace, pids: list[int]
) -> WrkResult:
    base = [wrk, f"-t{args.threads}", f"-c{args.connections}"]
    hdr = ["-H", f"Host: {host}"] if host else []
    subprocess.run(base + [f"-d{args.warmup}s", *hdr, url], capture_output=True, check=True)
    say(f"{name}: wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency")
    cpu0 = cpu_seconds(pids)
    out = subprocess.run(
        base + [f"-d{args.duration}s", "--latency", *hdr, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu = cpu_seconds(pids) - cpu0
    r = parse_wrk(name, out)
    return replace(r, cpu_us_per_req=cpu * 1e6 / max(r.requests, 1))


def measure_nginx(
    sup: Supervisor, nginx: str, wrk: str, work: Path, app_port: int, args: argparse.Namespace
) -> WrkResult:
    certs = work / "nginx-certs"
    nginx_pki(certs)
    out_port, in_port = free_ports(2)
    log_line = "access_log @@PREFIX@@/access.log mesh;" if args.access_logs else "access_log off;"
    values = {
        "APP_PORT": str(app_port),
        "IN_PORT": str(in_port),
        "OUT_PORT": str(out_port),
        "CERTS": str(certs),
        "WORKERS": str(args.workers_now),
    }
    specs = []
    for role in ("inbound", "outbound"):
        prefix = work / f"nginx-{role}"
        text_values = {**values, "ACCESS_LOG": log_line.replace("@@PREFIX@@", str(prefix))}
        conf = render_nginx(f"{role}.conf", prefix, text_values)
        # The outbound probe goes through the inbound nginx to the app: it covers both.
        probe_port = out_port if role == "outbound" else app_port
        specs.append(
            nginx_spec(nginx, f"nginx-{role}", conf, Probe(f"http://127.0.0.1:{probe_port}/"))
        )
    children = [sup.start(s, work / "logs" / f"{s.name}.log") for s in specs]
    sup.wait_ready(children, timeout=30)
    url = f"http://127.0.0.1:{out_port}/"
    sanity(url, None)
    refuses_without_client_cert(in_port, certs / "root.pem")
    return run_wrk(wrk, "nginx", url, None, args, [c.proc.pid for c in children])


def measure_meshcar(
    sup: Supervisor, wrk: str, work: Path, app_port: int, args: argparse.Namespace
) -> WrkResult:
    ca, sidecars, ports = meshcar_specs(
        work / "meshcar", app_port, args.access_logs, args.workers_now
    )
    out_port, in_port = ports["out"], ports["in"]
    sup.wait_ready([sup.start(ca, work / "logs" / f"{ca.name}.log")], timeout=30)
    children = [sup.start(s, work / "logs" / f"{s.name}.log") for s in sidecars]
    sup.wait_ready(children, timeout=60)
    url = f"http://127.0.0.1:{out_port}/"
    sanity(url, "b")
    refuses_without_client_cert(in_port, work / "meshcar" / "ca" / "root.pem")
    result = run_wrk(wrk, "meshcar", url, "b", args, [c.proc.pid for c in children])
    say("meshcar: " + pooling_summary(ports["a_admin"], ports["b_admin"]))
    return result


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def pooling_summary(a_admin: int, b_admin: int) -> str:
    """Requests against mesh connections/handshakes, from the sidecars' own /metrics."""
    with httpx.Client(trust_env=False, timeout=10) as c:
        a = c.get(f"http://127.0.0.1:{a_admin}/metrics").text
        b = c.get(f"http://127.0.0.1:{b_admin}/metrics").text
    return (
        f"{metric_sum(a, 'meshcar_requests_total', direction='outbound'):.0f} outbound "
        f"requests over {metric_sum(a, 'meshcar_upstream_connections_total'):.0f} mesh "
        f"connections; {metric_sum(b, 'meshcar_tls_handshakes_total', direction='inbound'):.0f}"
        f" inbound handshakes at b (including warm-up and checks)"
    )


def label(name: str, workers: int, args: argparse.Namespace) -> str:
    return name if args.workers == [1] else f"{name}-w{workers}"


def report(results: dict[str, list[WrkResult | str]], args: argparse.Namespace) -> str:
    lines = [
        f"app -> sidecar -> mTLS (TLS 1.3) -> sidecar -> app; wrk -t{args.threads} "
        f"-c{args.connections} -d{args.duration}s; workers per sidecar "
        f"{'/'.join(map(str, args.workers))}; "
        f"access logs {'on' if args.access_logs else 'off'}; {os.cpu_count()} CPUs; "
        f"{args.rounds} round(s), alternating",
        "",
        f"{'pair':<12}{'round':>6}{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'CPU us/req':>12}  errors",
    ]
    medians: dict[str, tuple[float, float, float, float]] = {}
    names = [label(n, w, args) for w in args.workers for n in ("meshcar", "nginx")]
    for name in names:
        rs = results.get(name)
        if not rs:
            lines.append(f"{name:<12}{'':>6}{'not run':>12}  (--only {args.only})")
            continue
        for i, r in enumerate(rs):
            if isinstance(r, WrkResult):
                lines.append(
                    f"{name:<12}{i:>6}{r.rps:>12.0f}{r.p50_ms:>10.2f}{r.p99_ms:>10.2f}"
                    f"{r.cpu_us_per_req:>12.0f}  {r.errors or 'none'}"
                )
            else:
                lines.append(f"{name:<12}{i:>6}{'FAILED':>12}  {r}")
        good = [r for r in rs if isinstance(r, WrkResult)]
        if good:
            med = tuple(
                statistics.median(getattr(r, f) for r in good)
                for f in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")
            )
            medians[name] = med  # type: ignore[assignment]
            lines.append(
                f"{name:<12}{'med':>6}{med[0]:>12.0f}{med[1]:>10.2f}{med[2]:>10.2f}{med[3]:>12.0f}"
            )
    for w in args.workers:
        lines.append("")
        lines += _ratios(results, medians, label("meshcar", w, args), label("nginx", w, args), args)
    lines += _scaling(medians, args)
    return "\n".join(lines)


def _ratios(
    results: dict[str, list[WrkResult | str]],
    medians: dict[str, tuple[float, float, float, float]],
    mesh: str,
    ngx: str,
    args: argparse.Namespace,
) -> list[str]:
    m, n = medians.get(mesh), medians.get(ngx)
    if not (m and n):
        why = "only one pair was run" if args.only != "both" else "a half failed"
        return [f"ratio {mesh}/{ngx}: n/a ({why})"]
    per_round = [
        a.rps / b.rps
        for a, b in zip(results[mesh], results[ngx], strict=False)
        if isinstance(a, WrkResult) and isinstance(b, WrkResult)
    ]
    return [
        f"ratio {mesh}/{ngx} (medians): requests/s {m[0] / n[0]:.2f}x, "
        f"CPU per request {m[3] / n[3]:.2f}x, p50 latency {m[1] / n[1]:.2f}x, "
        f"p99 latency {m[2] / n[2]:.2f}x",
        "requests/s ratio per round: " + ", ".join(f"{x:.2f}x" for x in per_round),
    ]


def _scaling(
    medians: dict[str, tuple[float, float, float, float]], args: argparse.Namespace
) -> list[str]:
    """Requests/s at each worker count over the first count's, per pair (medians)."""
    if len(args.workers) < 2:
        return []
    first, lines = args.workers[0], [""]
    for name in ("meshcar", "nginx"):
        base = medians.get(label(name, first, args))
        for w in args.workers[1:]:
            cur = medians.get(label(name, w, args))
            if base and cur:
                lines.append(
                    f"scaling {name} {first} -> {w} workers (medians): requests/s "
                    f"{cur[0] / base[0]:.2f}x, CPU per request {cur[3] / base[3]:.2f}x"
                )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=int, default=10, help="seconds of measurement per pair")
    p.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per pair")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--only", choices=("both", "nginx", "meshcar"), default="both")
    p.add_argument("--no-access-logs", dest="access_logs", action="store_false")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each pair this many times, alternating which goes first; medians",
    )
    p.add_argument(
        "--workers",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1],
        help="worker processes per sidecar, a comma list (e.g. 1,2): every pair at each count",
    )
    args = p.parse_args()

    nginx, wrk = ensure_tools()
    work = Path(tempfile.mkdtemp(prefix="meshcar-bench-"))
    (work / "logs").mkdir()
    results: dict[str, list[WrkResult | str]] = {}
    load_start = os.getloadavg()
    try:
        with Supervisor() as sup:
            (app_port,) = free_ports(1)
            app_conf = render_nginx("app.conf", work / "nginx-app", {"APP_PORT": str(app_port)})
            app = sup.start(
                nginx_spec(nginx, "app", app_conf, Probe(f"http://127.0.0.1:{app_port}/")),
                work / "logs" / "app.log",
            )
            sup.wait_ready([app], timeout=30)
            order = [("nginx", "meshcar"), ("meshcar", "nginx")]
            runs = [
                (n, w) for rnd in range(args.rounds) for w in args.workers for n in order[rnd % 2]
            ]
            for name, w in runs:
                if args.only not in ("both", name):
                    continue
                args.workers_now = w
                key = label(name, w, args)
                started = len(sup.children)
                try:
                    rnd_dir = work / f"{key}-{len(results.get(key, []))}"
                    (rnd_dir / "logs").mkdir(parents=True)
                    if name == "nginx":
                        r: WrkResult | str = measure_nginx(sup, nginx, wrk, rnd_dir, app_port, args)
                    else:
                        r = measure_meshcar(sup, wrk, rnd_dir, app_port, args)
                except (
                    DemoStartupError,
                    subprocess.CalledProcessError,
                    ValueError,
                    httpx.HTTPError,
                ) as exc:
                    r = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    print(f"bench: {name} failed:\n{exc}", file=sys.stderr)
                results.setdefault(key, []).append(r)
                # Stop this pair before measuring the next: they must not share the CPUs.
                for child in sup.children[started:]:
                    child.proc.terminate()
                for child in sup.children[started:]:
                    try:
                        child.proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        child.proc.kill()
                        child.proc.wait()
    finally:
        wanted = [
            label(n, w, args)
            for w in args.workers
            for n in (("nginx", "meshcar") if args.only == "both" else (args.only,))
        ]
        ok = all(
            results.get(n) and all(isinstance(r, WrkResult) and not r.errors for r in results[n])
            for n in wanted
        )
        if args.keep or not ok:
            say(f"work directory kept (logs, configs): {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(report(results, args))
    print(
        f"load average (1/5/15 min): start {' '.join(f'{x:.2f}' for x in load_start)}, "
        f"end {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
