"""Real `meshcar` processes for end-to-end tests: start, wait for readiness, stop, free ports."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.ports import free_port as free_port  # re-exported for the e2e tests


def meshcar_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshcar.cli", *args]


def ca_init(ca_dir: Path, trust_domain: str) -> None:
    """`meshcar ca init`: a new CA for trust_domain in ca_dir."""
    subprocess.run(
        meshcar_cmd("ca", "init", "--dir", str(ca_dir), "--trust-domain", trust_domain),
        check=True,
        capture_output=True,
    )


def ca_token(ca_dir: Path, spiffe_id: str) -> str:
    """A join token for spiffe_id from `meshcar ca token` of the CA in ca_dir."""
    out = subprocess.run(
        meshcar_cmd("ca", "token", "--dir", str(ca_dir), "--spiffe-id", spiffe_id),
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def sidecar_identity(d: Path, name: str, spiffe_id: str, ca_port: int) -> dict[str, str]:
    """A sidecar config's identity section: the CA of d/ca served on 127.0.0.1:ca_port
    (trusted with d/ca/root.pem), the join token in d/<name>.token, state in d/<name>-state."""
    return {
        "spiffe_id": spiffe_id,
        "ca_url": f"https://127.0.0.1:{ca_port}",
        "ca_bundle": str(d / "ca" / "root.pem"),
        "token_file": str(d / f"{name}.token"),
        "state_dir": str(d / f"{name}-state"),
    }


def wait_until(cond, what: str, timeout: float = 30.0, interval: float = 0.05):  # noqa: ANN001, ANN201
    """Poll `cond` until it returns something true and return that; AssertionError naming
    `what` after `timeout` seconds (a polling interval, not a sleep used as synchronisation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


class Procs:
    """Processes started by a test; all stopped (TERM, then KILL) at teardown."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")
        p = subprocess.Popen(
            meshcar_cmd(*args),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        log.close()
        self.procs.append((name, p))
        return p

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")

    def wait_http(
        self,
        url: str,
        *,
        verify: str | bool = False,
        timeout: float = 20.0,
        status: int = 200,
        name: str | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for pname, p in self.procs:
                if p.poll() is not None:
                    raise AssertionError(
                        f"{pname} exited with {p.returncode}:\n{self.log(pname)[-3000:]}"
                    )
            try:
                ctx = (
                    ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
                )
                r = httpx.get(url, verify=ctx, timeout=2)
                if r.status_code == status:
                    return
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.05)  # polling interval, not synchronisation: we wait on readiness
        logs = self.log(name)[-3000:] if name else ""
        raise AssertionError(f"{url} not ready after {timeout}s: {last}\n{logs}")

    def start_ca(self, ca_dir: Path, port: int) -> subprocess.Popen:
        """`meshcar ca serve` of an initialised ca_dir on 127.0.0.1:port, once its /healthz
        answers over TLS (verified with ca_dir/root.pem); its log is `ca`."""
        p = self.start("ca", "ca", "serve", "--dir", str(ca_dir), "--listen", f"127.0.0.1:{port}")
        self.wait_http(
            f"https://127.0.0.1:{port}/healthz", verify=str(ca_dir / "root.pem"), name="ca"
        )
        return p

    def wait_ready(self, admin_port: int, name: str, timeout: float = 20.0) -> None:
        """Until the role's admin listener on 127.0.0.1:admin_port says 200 on /ready."""
        self.wait_http(f"http://127.0.0.1:{admin_port}/ready", name=name, timeout=timeout)

    def start_web_api(self, ports: dict[str, int], api_cfg: Path, web_cfg: Path) -> None:
        """The demo app as api's app and the api and web sidecars on the ports of
        test_sidecar_e2e.init_pair_dir (logs api-app, api-sidecar, web-sidecar), once both
        sidecars' /ready say 200."""
        self.start("api-app", "demo-app", "--name", "api", "--port", str(ports["api_app"]))
        self.start("api-sidecar", "sidecar", "--config", str(api_cfg))
        self.start("web-sidecar", "sidecar", "--config", str(web_cfg))
        for n in ("api", "web"):
            self.wait_ready(ports[f"{n}_admin"], f"{n}-sidecar")

    def stop_all(self) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for _, p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()
