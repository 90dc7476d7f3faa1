"""`meshcar demo` as a real process: `--check` passes, SIGTERM leaves no child and no port.

These need every part of the mesh (CA, sidecar, demo app); they use the scenario's fixed
loopback ports, so no other demo may run at the same time.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshcar.demo import scenario as sc
from meshcar.demo.checks import all_checks
from meshcar.demo.plan import (
    DemoPaths,
    ProcSpec,
    PublicCerts,
    ca_process,
    edge_processes,
    mesh_processes,
)

pytestmark = pytest.mark.e2e

START_TIMEOUT = 120.0


def scenario_ports() -> list[int]:
    ports = [sc.CA_PORT]
    for s in sc.SCENARIO.services:
        ports += [s.app_port, s.inbound_port, s.outbound_port, s.admin_port]
        if s.public_tls_port:
            ports.append(s.public_tls_port)
        if s.ledger_port:  # payments' ledger database (opaque TCP, issue 13)
            ports.append(s.ledger_port)
        ports += [local_port for _, local_port in s.db_upstreams]  # the sidecars' tunnels
    return ports


def busy_ports() -> list[int]:
    busy = []
    for port in scenario_ports():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def planned_processes(d: Path) -> list[ProcSpec]:
    paths = DemoPaths(d)
    certs = PublicCerts(*(d / "-",) * 6)
    return (
        [ca_process(paths)]
        + mesh_processes(sc.SCENARIO, paths, certs)
        + edge_processes(sc.SCENARIO, paths)
    )


def demo_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshcar.cli", "demo", *args]


def test_demo_check_passes_and_prints_the_table(tmp_path: Path) -> None:
    assert busy_ports() == [], "scenario ports busy before the test"
    r = subprocess.run(
        demo_argv("--check", "--dir", str(tmp_path / "demo")),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT + 60,
        check=False,
    )
    out = r.stdout
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{out}\nstderr:\n{r.stderr}"
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("RESULT"))
    rows = lines[header + 2 : header + 2 + len(all_checks())]
    for check, row in zip(all_checks(), rows, strict=True):
        assert check.title in row
        expected = "PASS" if check.fn is not None else "SKIP (not implemented)"
        assert row.startswith(expected), row
    assert not any(row.startswith("FAIL") for row in rows)
    # issue 13: the gRPC service and the database path are checked, and passed
    grpc = next(row for row in rows if "gRPC Quote" in row)
    assert grpc.startswith("PASS") and "grpc-status 0 in trailers" in grpc
    assert "grpc-status 7" in grpc  # web, not on payments' allow list
    db = next(row for row in rows if "ledger DB over opaque TCP" in row)
    assert db.startswith("PASS") and "OK acct-1" in db and "denied" in db
    assert " 0 failed," in out
    for name in ("mesh-bundle.pem", "edge-ca.pem", "partner.pem", "partner.key"):
        assert (tmp_path / "demo" / name).is_file()
    assert busy_ports() == []


def _read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while marker not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                break
            if sel.select(left):
                line = proc.stdout.readline()
                if not line:
                    break
                seen += line
    return seen


def test_sigterm_stops_every_child_and_frees_the_ports(tmp_path: Path) -> None:
    assert busy_ports() == [], "scenario ports busy before the test"
    proc = subprocess.Popen(
        demo_argv("--dir", str(tmp_path / "demo")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out = _read_until(proc, "meshcar demo: ready:", START_TIMEOUT)
        assert "meshcar demo: ready:" in out, (
            f"not ready: exit {proc.poll()}\n{out}\n{proc.stderr.read() if proc.poll() is not None else ''}"
        )
        children = children_of(proc.pid)
        # CA, 3 sidecars, 3 apps, payments' public endpoint (+ the edge once it plugs in)
        assert len(children) == len(planned_processes(tmp_path / "demo"))
        assert set(busy_ports()) == set(scenario_ports())
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    survivors = [pid for pid in children if alive(pid)]
    assert survivors == []
    assert busy_ports() == []


def test_a_busy_port_is_named_and_nothing_is_left_running(tmp_path: Path) -> None:
    assert busy_ports() == [], "scenario ports busy before the test"
    api = sc.SCENARIO.service("api")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", api.inbound_port))
        squatter.listen()
        r = subprocess.run(
            demo_argv("--check", "--dir", str(tmp_path / "demo")),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert r.returncode == 1
    assert f"{api.inbound_port} (api sidecar inbound (mesh))" in r.stderr
    assert busy_ports() == []


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)"
)
def test_dashboard_from_demo_in_headless_chromium(tmp_path: Path) -> None:
    """`meshcar dashboard --from-demo` against a running `meshcar demo`, rendered by Chromium:
    all demo services, their calls (web -> api -> payments), each identity's certificate with
    its time to expiry, and a request made by this test in the live tail."""
    from tests.e2e.procs import free_port
    from tests.e2e.test_dashboard import _loaded_dom, _text

    assert busy_ports() == [], "scenario ports busy before the test"
    d = tmp_path / "demo"
    demo = subprocess.Popen(
        demo_argv("--dir", str(d)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    dash_port = free_port()
    dash = subprocess.Popen(
        [sys.executable, "-m", "meshcar.cli", "dashboard", "--from-demo"]
        + ["--listen", f"127.0.0.1:{dash_port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out = _read_until(demo, "meshcar demo: ready:", START_TIMEOUT)
        assert "meshcar demo: ready:" in out, out
        web_app = next(s for s in sc.SCENARIO.services if s.name == "web").app_port
        for _ in range(3):  # web -> api -> payments through the mesh
            r = subprocess.run(
                ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}"]
                + [f"http://127.0.0.1:{web_app}/pay"],
                capture_output=True,
                text=True,
            )
            assert r.stdout == "200", r
        probe = f"/v1/dashboard-probe-{os.getpid()}-{time.monotonic_ns() % 100000}"
        host = f"api.demo.test:{sc.EDGE_HTTPS_PORT}"
        r = subprocess.run(
            ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}"]
            + ["--cacert", str(d / "edge-ca.pem"), "--resolve", f"{host}:127.0.0.1"]
            + [f"https://{host}{probe}"],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0 and r.stdout.isdigit(), r

        dom = _loaded_dom(f"http://127.0.0.1:{dash_port}/", tmp_path / "chrome")
        services = _text(dom, "services")
        for s in sc.SCENARIO.services:
            assert s.name in services, services
        assert "edge" in services, services
        calls = _text(dom, "edges")
        for caller, callee in (("web", "api"), ("api", "payments")):
            assert re.search(rf"\b{caller}\s+→\s+{callee}\s+\d+\s+100\.0%", calls), calls
        certs = _text(dom, "certs")
        for s in sc.SCENARIO.services:
            assert sc.spiffe_id(s.name) in certs, certs
        assert any(u in certs for u in ("m ", "h ", "d ")), certs  # a time to expiry
        tail = _text(dom, "tail")
        assert probe in tail, tail
    finally:
        for p in (dash, demo):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for stream in (demo.stdout, demo.stderr, dash.stderr):
            if stream is not None:
                stream.close()
    assert busy_ports() == []
