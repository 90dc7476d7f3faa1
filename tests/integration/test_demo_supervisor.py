"""The demo's supervisor with real child processes: start-up failures, readiness, clean stop."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from meshcar.demo.plan import Probe, ProcSpec, meshcar_argv
from meshcar.demo.supervisor import DemoStartupError, Supervisor
from tests.support.ports import free_port


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def wait_until(cond, timeout: float = 10.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_child_dying_during_startup_is_named_with_its_log_tail(tmp_path: Path) -> None:
    spec = ProcSpec(
        "sidecar-api",
        py("import sys; print('cannot read token_file'); sys.exit(3)"),
        Probe(f"http://127.0.0.1:{free_port()}/ready"),
    )
    with Supervisor() as sup:
        child = sup.start(spec, tmp_path / "sidecar-api.log")
        with pytest.raises(DemoStartupError) as info:
            sup.wait_ready([child], timeout=20)
    msg = str(info.value)
    assert "sidecar-api exited with status 3" in msg
    assert "cannot read token_file" in msg


def test_not_ready_by_the_deadline(tmp_path: Path) -> None:
    port = free_port()
    spec = ProcSpec("slow", py("import time; time.sleep(60)"), Probe(f"http://127.0.0.1:{port}/"))
    with Supervisor() as sup:
        child = sup.start(spec, tmp_path / "slow.log")
        with pytest.raises(DemoStartupError, match=r"not ready after 1s:\nslow: "):
            sup.wait_ready([child], timeout=1)
    assert child.proc.returncode is not None


def test_ready_app_then_stop_frees_the_port(tmp_path: Path) -> None:
    port = free_port()
    spec = ProcSpec(
        "app-api",
        meshcar_argv("demo-app", "--name", "api", "--port", str(port)),
        Probe(f"http://127.0.0.1:{port}/healthz"),
    )
    sup = Supervisor()
    child = sup.start(spec, tmp_path / "app.log")
    try:
        sup.wait_ready([child], timeout=20)
        assert not port_is_free(port)
    finally:
        killed = sup.stop_all(timeout=5)
    assert killed == []  # it stopped on SIGTERM
    assert child.proc.returncode is not None
    assert port_is_free(port)
    assert '"event": "app.ready"' in (tmp_path / "app.log").read_text()


def test_stubborn_child_and_its_grandchild_are_killed(tmp_path: Path) -> None:
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('grandchild', g.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    log = tmp_path / "stubborn.log"
    sup = Supervisor()
    child = sup.start(ProcSpec("stubborn", py(code), Probe("http://127.0.0.1:1/")), log)
    assert wait_until(lambda: "grandchild" in log.read_text())
    grandchild = int(log.read_text().split("grandchild")[1].split()[0])
    killed = sup.stop_all(timeout=0.5)
    assert killed == ["stubborn"]
    assert child.proc.returncode == -9
    assert wait_until(lambda: gone(grandchild)), f"grandchild {grandchild} survived"
    assert os.getpgid(os.getpid()) != child.proc.pid  # it had its own group, not ours
