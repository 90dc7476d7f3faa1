"""`meshcar run`: app started after readiness, exit code passed on, SIGTERM drains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import Procs, free_port, meshcar_cmd
from tests.e2e.test_sidecar_e2e import TD, _sidecar_cfg, _token, sid

pytestmark = pytest.mark.e2e
SLOW_APP = str(Path(__file__).parent.parent / "support" / "slow_app.py")


@pytest.fixture
def env(tmp_path: Path):
    ports = {
        n: free_port()
        for n in ["ca"]
        + [f"{s}_{k}" for s in ("web", "api") for k in ("app", "in", "out", "admin")]
    }
    subprocess.run(
        meshcar_cmd("ca", "init", "--dir", str(tmp_path / "ca"), "--trust-domain", TD),
        check=True,
        capture_output=True,
    )
    procs = Procs(tmp_path)
    procs.start(
        "ca", "ca", "serve", "--dir", str(tmp_path / "ca"), "--listen", f"127.0.0.1:{ports['ca']}"
    )
    procs.wait_http(
        f"https://127.0.0.1:{ports['ca']}/healthz", verify=str(tmp_path / "ca" / "root.pem")
    )
    yield tmp_path, ports, procs
    procs.stop_all()


def _events(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_app_starts_after_ready_and_exit_code_is_passed_on(env) -> None:
    d, ports, _ = env
    (d / "api.token").write_text(_token(d / "ca", "api"))
    cfg = _sidecar_cfg(d, "api", ports, [], {})
    state = d / "state.jsonl"
    ready_url = f"http://127.0.0.1:{ports['api_admin']}/ready"
    r = subprocess.run(
        meshcar_cmd(
            "run",
            "--config",
            str(cfg),
            "--",
            sys.executable,
            SLOW_APP,
            str(ports["api_app"]),
            ready_url,
            str(state),
            "7",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 7, r.stdout + r.stderr
    assert _events(state) == [{"event": "started", "sidecar_ready": 200}]
    assert '"event": "run.app_exited", "exit_code": 7' in r.stdout


def test_missing_app_command_exits_127(env) -> None:
    d, ports, _ = env
    (d / "api.token").write_text(_token(d / "ca", "api"))
    cfg = _sidecar_cfg(d, "api", ports, [], {})
    r = subprocess.run(
        meshcar_cmd("run", "--config", str(cfg), "--", "/nonexistent/app"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 127


def test_sigterm_drains_in_flight_requests(env) -> None:
    d, ports, procs = env
    for n in ("api", "web"):
        (d / f"{n}.token").write_text(_token(d / "ca", n))
    api_cfg = _sidecar_cfg(d, "api", ports, [sid("web")], {})
    web_cfg = _sidecar_cfg(
        d,
        "web",
        ports,
        [],
        {"api": {"endpoints": [f"127.0.0.1:{ports['api_in']}"], "spiffe_id": sid("api")}},
    )
    state = d / "state.jsonl"
    ready_url = f"http://127.0.0.1:{ports['api_admin']}/ready"
    run = procs.start(
        "run",
        "run",
        "--config",
        str(api_cfg),
        "--",
        sys.executable,
        SLOW_APP,
        str(ports["api_app"]),
        ready_url,
        str(state),
    )
    procs.start("web-sidecar", "sidecar", "--config", str(web_cfg))
    procs.wait_http(f"http://127.0.0.1:{ports['web_admin']}/ready")
    proxy = f"http://127.0.0.1:{ports['web_out']}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # wait until the app itself answers through the mesh
        try:
            if httpx.get("http://api/ping", proxy=proxy, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
    result: dict = {}

    def slow() -> None:
        try:
            result["resp"] = httpx.get("http://api/slow", proxy=proxy, timeout=20)
        except httpx.HTTPError as exc:
            result["error"] = exc

    t = threading.Thread(target=slow)
    t.start()
    deadline = time.monotonic() + 10
    while not any(e["event"] == "slow_started" for e in _events(state)):
        assert time.monotonic() < deadline, "slow request never reached the app"
        time.sleep(0.02)
    os.kill(run.pid, signal.SIGTERM)  # as the kubelet does: to the container's main process
    t.join(30)
    assert "resp" in result, result
    assert result["resp"].status_code == 200 and result["resp"].json() == {"path": "/slow"}
    assert run.wait(timeout=30) == 0
    assert _events(state)[-1] == {"event": "stopped"}
    out = procs.log("run")
    assert '"event": "run.forwarding_signal", "signal": "SIGTERM"' in out
    assert '"event": "sidecar.draining"' in out


def test_sighup_goes_to_the_app_and_reloads_the_sidecar(env) -> None:
    """SIGHUP to `meshcar run`: forwarded to the app (which here ignores it and keeps
    running) and the sidecar's config read again (common/reload.py)."""
    d, ports, procs = env
    (d / "api.token").write_text(_token(d / "ca", "api"))
    cfg = _sidecar_cfg(d, "api", ports, [], {})
    started = d / "app.started"
    app = (
        "import pathlib, signal, sys, time; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
        "pathlib.Path(sys.argv[1]).touch(); time.sleep(600)"
    )
    run = procs.start(
        "run", "run", "--config", str(cfg), "--", sys.executable, "-c", app, str(started)
    )
    admin = f"http://127.0.0.1:{ports['api_admin']}"
    procs.wait_http(f"{admin}/ready", name="run")
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:  # the app runs: signals
        time.sleep(0.02)  # are forwarded from then on (polling, not synchronisation)
    data = json.loads(cfg.read_text())
    data["inbound"]["allow"] = [sid("web")]
    cfg.write_text(json.dumps(data))
    run.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = httpx.get(f"{admin}/config/status", timeout=5).json()
        if st["last_reload"] is not None:
            break
        time.sleep(0.05)  # polling interval, not synchronisation: we wait on the status
    assert st["last_reload"]["result"] == "success", st
    assert run.poll() is None  # the app ignored SIGHUP; nothing stopped
    assert '"event": "run.forwarding_signal", "signal": "SIGHUP"' in procs.log("run")
