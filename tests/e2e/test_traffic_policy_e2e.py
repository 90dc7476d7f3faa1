"""End to end with real processes: a CA, a client sidecar (web) and two api sidecars, each in
front of a misbehaving app process (tests/support/faulty_app.py). An endpoint answering 503
is ejected (metric), gets no traffic while ejected and is readmitted once healthy; a hanging
app makes the per-try timeout fire at its configured value with a clear 504."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import Procs, free_port, meshcar_cmd

pytestmark = pytest.mark.e2e
TD = "meshcar.demo"
ROOT = Path(__file__).resolve().parents[2]


def sid(n: str) -> str:
    return f"spiffe://{TD}/svc/{n}"


@dataclass
class Mesh:
    dir: Path
    ports: dict[str, int]


def _cfg(d: Path, node: str, identity: str, ports: dict[str, int], **rest: object) -> Path:
    cfg = {
        "identity": {
            "spiffe_id": sid(identity),
            "ca_url": f"https://127.0.0.1:{ports['ca']}",
            "ca_bundle": str(d / "ca" / "root.pem"),
            "token_file": str(d / f"{node}.token"),
            "state_dir": str(d / f"{node}-state"),
        },
        "app": {"port": ports[f"{node}_app"]},
        "admin": {"listen": f"127.0.0.1:{ports[f'{node}_admin']}"},
        **rest,
    }
    path = d / f"{node}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _start_app(d: Path, name: str, port: int, mode: str, delay: float = 0.0) -> subprocess.Popen:
    log = open(d / f"{name}-app.log", "wb")  # noqa: SIM115
    argv = [sys.executable, "-m", "tests.support.faulty_app", "--name", name]
    argv += ["--port", str(port), "--mode", mode, "--delay", str(delay)]
    p = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return p


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    d = tmp_path_factory.mktemp("traffic")
    nodes = ("web", "api1", "api2")
    ports = {"ca": free_port()}
    for n in nodes:
        for k in ("app", "in", "out", "admin"):
            ports[f"{n}_{k}"] = free_port()
    subprocess.run(
        meshcar_cmd("ca", "init", "--dir", str(d / "ca"), "--trust-domain", TD),
        check=True,
        capture_output=True,
    )
    for n in nodes:
        ident = "web" if n == "web" else "api"
        tok = subprocess.run(
            meshcar_cmd("ca", "token", "--dir", str(d / "ca"), "--spiffe-id", sid(ident)),
            check=True,
            capture_output=True,
            text=True,
        )
        (d / f"{n}.token").write_text(tok.stdout.strip())
    procs = Procs(d)
    apps = [
        _start_app(d, "bad", ports["api1_app"], "503"),
        _start_app(d, "good", ports["api2_app"], "slow", 0.02),
    ]
    try:
        procs.start(
            "ca", "ca", "serve", "--dir", str(d / "ca"), "--listen", f"127.0.0.1:{ports['ca']}"
        )
        procs.wait_http(
            f"https://127.0.0.1:{ports['ca']}/healthz", verify=str(d / "ca" / "root.pem"), name="ca"
        )
        for n in ("api1", "api2"):
            inbound = {"listen": f"127.0.0.1:{ports[f'{n}_in']}", "allow": [sid("web")]}
            procs.start(
                f"{n}-sidecar",
                "sidecar",
                "--config",
                str(_cfg(d, n, "api", ports, inbound=inbound)),
            )
        eps = [f"127.0.0.1:{ports['api1_in']}", f"127.0.0.1:{ports['api2_in']}"]
        outbound = {
            "listen": f"127.0.0.1:{ports['web_out']}",
            "upstreams": {
                "api": {
                    "endpoints": eps,
                    "spiffe_id": sid("api"),
                    "retries": {"retry_on": []},
                    "outlier": {"consecutive_failures": 3, "base_ejection_seconds": 5},
                },
                "api1": {
                    "endpoints": eps[:1],
                    "spiffe_id": sid("api"),
                    "timeouts": {"per_try_seconds": 0.5},
                    "retries": {"retry_on": []},
                },
            },
        }
        inbound = {"listen": f"127.0.0.1:{ports['web_in']}"}
        web = _cfg(d, "web", "web", ports, inbound=inbound, outbound=outbound)
        procs.start("web-sidecar", "sidecar", "--config", str(web))
        for n in nodes:
            procs.wait_http(f"http://127.0.0.1:{ports[f'{n}_admin']}/ready", name=f"{n}-sidecar")
        yield Mesh(d, ports)
    finally:
        procs.stop_all()
        for p in apps:
            p.terminate()
            p.wait(timeout=10)


def _get(mesh: Mesh, host: str = "api") -> httpx.Response:
    proxy = f"http://127.0.0.1:{mesh.ports['web_out']}"
    with httpx.Client(proxy=proxy, trust_env=False, timeout=20) as c:
        return c.get(f"http://{host}/x")


def _ejections(mesh: Mesh) -> float:
    text = httpx.get(f"http://127.0.0.1:{mesh.ports['web_admin']}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("meshcar_upstream_policy_events_total{") and 'event="ejected"' in line:
            if 'upstream="api"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_failing_endpoint_is_ejected_and_readmitted(mesh: Mesh) -> None:
    for _ in range(200):
        _get(mesh)
        if _ejections(mesh):
            break
    assert _ejections(mesh) == 1
    for _ in range(10):  # ejected (5 s): every request goes to the good endpoint
        r = _get(mesh)
        assert r.status_code == 200 and r.json()["name"] == "good", r.text
        assert r.headers["x-meshcar-attempts"] == "1"
    httpx.get(f"http://127.0.0.1:{mesh.ports['api1_app']}/__mode/ok", timeout=5)
    deadline = time.monotonic() + 20
    names = set()
    while "bad" not in names:  # each probe is a real request: it ends when api1 is picked
        assert time.monotonic() < deadline, "the ejected endpoint was never readmitted"
        names.add(_get(mesh).json()["name"])
        time.sleep(0.02)  # pacing of the probes, not synchronisation
    assert _ejections(mesh) == 1


def test_the_per_try_timeout_fires_at_its_value(mesh: Mesh) -> None:
    httpx.get(f"http://127.0.0.1:{mesh.ports['api1_app']}/__mode/hang", timeout=5)
    start = time.monotonic()
    r = _get(mesh, "api1")
    took = time.monotonic() - start
    assert r.status_code == 504
    assert "did not answer within 0.5s" in r.json()["message"]
    assert 0.5 <= took < 5
    httpx.get(f"http://127.0.0.1:{mesh.ports['api1_app']}/__mode/ok", timeout=5)
