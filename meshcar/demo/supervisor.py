"""Child processes of `meshcar demo`: start, wait until ready, notice deaths, stop cleanly.

Theory of operation: every child is started in its own session (so its own process group)
with its output appended to its log file, and on Linux with a parent-death signal, so that
even a runner killed with SIGKILL leaves no orphan.  Readiness is polled (HTTP(S) probes)
against one deadline while watching every child: a child that exits during start-up is
reported by name with the tail of its log.  Stopping sends SIGTERM to every process group
(newest first), waits for all of them against one deadline, then SIGKILLs what is left.
"""

from __future__ import annotations

import ctypes
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx

from meshcar.demo.plan import Probe, ProcSpec

POLL_INTERVAL_SECONDS = 0.1
LOG_TAIL_LINES = 25


class DemoStartupError(Exception):
    """A child failed to start (exited, or not ready by the deadline)."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived while waiting."""


@dataclass(frozen=True)
class Child:
    spec: ProcSpec
    proc: subprocess.Popen[bytes]
    log_path: Path


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        data = path.read_bytes()[-64 * 1024 :]
    except OSError as exc:
        return f"(no log: {exc})"
    text = data.decode("utf-8", "replace").splitlines()[-lines:]
    return "\n".join("    " + line for line in text) or "    (log is empty)"


def _set_parent_death_signal() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def probe_once(probe: Probe, timeout: float = 1.0) -> bool:
    verify: ssl.SSLContext | bool = False
    if probe.url.startswith("https:"):
        ctx = ssl.create_default_context(cafile=str(probe.cafile) if probe.cafile else None)
        if probe.client_cert is not None:
            ctx.load_cert_chain(str(probe.client_cert), str(probe.client_key))
        verify = ctx
    headers = {}
    extensions = {}
    if probe.server_hostname:
        headers["Host"] = probe.server_hostname
        extensions["sni_hostname"] = probe.server_hostname
    try:
        with httpx.Client(verify=verify, trust_env=False, timeout=timeout) as client:
            r = client.get(probe.url, headers=headers, extensions=extensions)
    except httpx.HTTPError:
        return False
    return r.status_code == probe.expect_status


class Supervisor:
    """Owns the demo's children.  Use as a context manager: leaving it stops everything."""

    def __init__(self, stop_event: threading.Event | None = None) -> None:
        self.children: list[Child] = []
        self.stop_event = stop_event or threading.Event()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, spec: ProcSpec, log_path: Path) -> Child:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(dict(spec.env))
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(log_path, "ab") as log:
            log.write(f"---- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {spec.name}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_set_parent_death_signal,
            )
        child = Child(spec, proc, log_path)
        self.children.append(child)
        return child

    def wait_ready(self, children: Iterable[Child], timeout: float) -> None:
        """Poll every child's probe until all are ready; raise naming the first failure."""
        pending = list(children)
        deadline = time.monotonic() + timeout
        while pending:
            if self.stop_event.is_set():
                raise Interrupted()
            for child in list(pending):
                rc = child.proc.poll()
                if rc is not None:
                    raise DemoStartupError(
                        f"{child.spec.name} exited with status {rc} during start-up "
                        f"(log {child.log_path}):\n{tail(child.log_path)}"
                    )
                if probe_once(child.spec.probe):
                    pending.remove(child)
            if not pending:
                return
            if time.monotonic() > deadline:
                details = "\n".join(
                    f"{c.spec.name}: {c.spec.probe.url} not answering "
                    f"{c.spec.probe.expect_status} (log {c.log_path}):\n{tail(c.log_path)}"
                    for c in pending
                )
                raise DemoStartupError(f"not ready after {timeout:.0f}s:\n{details}")
            self.stop_event.wait(POLL_INTERVAL_SECONDS)

    def dead_children(self) -> list[Child]:
        return [c for c in self.children if c.proc.poll() is not None]

    def stop_all(self, timeout: float = 5.0) -> list[str]:
        """SIGTERM every child's group (newest first), wait, SIGKILL leftovers.

        Returns the names of the children that had to be killed."""
        killed: list[str] = []
        for child in reversed(self.children):
            _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in reversed(self.children):
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.append(child.spec.name)
                _signal_group(child.proc, signal.SIGKILL)
                child.proc.wait()
            # Anything the child left behind in its group goes too.
            _signal_group(child.proc, signal.SIGKILL)
        self.children.clear()
        return killed


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass
