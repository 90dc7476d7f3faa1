"""docker-compose.yml in real containers (issue 16), with ../shared/containers/podman-here.sh:
rootful podman in a private network namespace, a local python:3.11-slim, wheels and the
iptables packages downloaded on the host.

Builds deploy/docker/Dockerfile, brings the compose file up in a project directory owned by a
non-root "operator" uid (a copy of docker-compose.yml and deploy/compose/, as a checkout is),
runs the README's curl and DEPLOY.md's openssl as that operator against the published ports,
the scenario's checks through the edge (SCENARIO.md 3-6), checks that the operator owns the
files `init` wrote, brings it down (`down -v`) and lets the operator delete them.

Marked `containers`: deselected unless `-m` names it (tests/e2e/conftest.py); `.ci/run` runs
`.venv/bin/pytest -m containers -rP` as its own step. Budget on a 2-core VM, overlay storage:
setup ~80-115 s on a fresh machine (debootstrap; ~1 s after), build ~1 min, up ~1 min.
The state dir (base image, layers, wheels) stays for the next run: MESHCAR_PODMAN_STATE.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshcar.demo import scenario as sc

ROOT = Path(__file__).resolve().parents[2]
PODMAN_HERE = ROOT.parent / "shared" / "containers" / "podman-here.sh"
STATE = Path(os.environ.get("MESHCAR_PODMAN_STATE", "/tmp/meshcar-podman-here"))
# the image's build context: this checkout, or another tree (e.g. `git archive HEAD` of it)
CONTEXT = Path(os.environ.get("MESHCAR_BUILD_CONTEXT", str(ROOT)))
PROJECT = "meshcarci"
OPERATOR = (4242, 4242)  # a uid:gid that is not root and owns the project directory
# iptables for `meshcar init-iptables` and its Debian dependencies (bookworm): podman build has
# no network here, so the Dockerfile installs them from /debs when they are mounted there
IPTABLES_DEBS = (
    "iptables libip4tc2 libip6tc2 libxtables12 netbase libmnl0 libnetfilter-conntrack3 "
    "libnfnetlink0 libnftnl11"
).split()
ENV = {
    **os.environ,
    "PODMAN_HERE_DRIVER": os.environ.get("PODMAN_HERE_DRIVER", "overlay"),  # new states only
    "PODMAN_HERE_HEALTH_TIMEOUT": "240",
}

pytestmark = [
    pytest.mark.containers,
    pytest.mark.skipif(not PODMAN_HERE.is_file(), reason=f"no {PODMAN_HERE} (../shared)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="podman-here.sh needs root (rootful podman)"),
]


def ph(*args: str, timeout: float, check: bool = True, cwd: Path | None = None) -> str:
    """podman-here.sh --state STATE ARGS; its stdout. A failure shows its output."""
    argv = [str(PODMAN_HERE), "--state", str(STATE), *args]
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd, check=False
    )
    if check and r.returncode != 0:
        pytest.fail(
            f"{shlex.join(argv)}: exit {r.returncode}\n"
            f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-5000:]}"
        )
    return r.stdout


def as_operator(*argv: str) -> list[str]:
    uid, gid = OPERATOR
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *argv]


class Timings:
    def __init__(self) -> None:
        self.steps: dict[str, float] = {}

    def run(self, name: str, fn: Any, *args: Any, **kw: Any) -> Any:
        t0 = time.monotonic()
        try:
            return fn(*args, **kw)
        finally:
            self.steps[name] = round(time.monotonic() - t0, 1)
            print(f"[compose-containers] {name}: {self.steps[name]} s", flush=True)


def download_debs(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.deb"):
        old.unlink()
    cmd = ["apt-get", "download", *IPTABLES_DEBS]
    r = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=300, check=False)
    if r.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=300)
        subprocess.run(cmd, cwd=dest, check=True, timeout=300, capture_output=True)
    os.chmod(dest, 0o755)
    for deb in dest.glob("*.deb"):
        os.chmod(deb, 0o644)


@pytest.fixture
def project() -> Iterator[Path]:
    """A checkout-like directory owned by the operator: docker-compose.yml, deploy/compose/."""
    top = Path(tempfile.mkdtemp(prefix="meshcar-compose-"))
    proj = top / PROJECT
    shutil.copytree(ROOT / "deploy" / "compose", proj / "deploy" / "compose")
    shutil.copy2(ROOT / "docker-compose.yml", proj / "docker-compose.yml")
    for p in [top, *proj.rglob("*"), proj]:
        os.chown(p, *OPERATOR)
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    try:
        yield proj
    finally:
        shutil.rmtree(top, ignore_errors=True)


def curl(proj: Path, *args: str) -> tuple[int, str]:
    """The README's curl, run as the operator in the netns from the project directory."""
    out = ph(
        "in-netns",
        *as_operator("curl", "-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}", *args),
        timeout=60,
        cwd=proj,
    )
    body, _, code = out.rpartition("\n")
    return int(code), body


def edge_json(proj: Path, host: str, path: str) -> tuple[int, dict[str, Any]]:
    code, body = curl(
        proj,
        "--cacert",
        ".meshcar-compose/edge-ca.pem",
        "--resolve",
        f"{host}:{sc.EDGE_HTTPS_PORT}:127.0.0.1",
        f"https://{host}:{sc.EDGE_HTTPS_PORT}{path}",
    )
    try:
        doc = json.loads(body)
    except ValueError:
        pytest.fail(f"https://{host}{path}: {code}, not JSON: {body[:300]!r}")
    return code, doc


def check_scenario(proj: Path) -> None:
    # README / SCENARIO 4: through the edge (bridge) to api, which calls payments over the mesh
    code, doc = edge_json(proj, "api.demo.test", "/v1/pay")
    assert code == 200, doc
    pay = doc.get("payments", {})
    assert pay.get("status") == 200, f"api -> payments: {pay}"
    assert pay["body"]["peer"] == sc.spiffe_id("api")
    # the full chain: edge (terminate) -> web -> api -> payments, identities at each hop
    code, doc = edge_json(proj, "www.demo.test", "/pay")
    api = doc.get("api", {})
    assert code == 200 and api.get("status") == 200, f"web -> api: {api}"
    assert api["body"]["peer"] == sc.spiffe_id("web")
    assert api["body"]["payments"]["status"] == 200, api["body"]["payments"]
    assert api["body"]["payments"]["body"]["peer"] == sc.spiffe_id("api")
    # SCENARIO 5: web may not call payments: the mesh refuses with 403
    code, doc = edge_json(proj, "www.demo.test", "/try-payments")
    assert code == 200 and doc.get("payments", {}).get("status") == 403, doc
    # SCENARIO 6: plain HTTP is redirected
    code, _ = curl(proj, "-H", "Host: www.demo.test", f"http://127.0.0.1:{sc.EDGE_HTTP_PORT}/x")
    assert code == 301
    # SCENARIO 3 / DEPLOY.md: payments' own endpoint through the passthrough route, with the
    # partner key that init left for the operator (unreadable to them when init left it root's)
    request = "GET /healthz HTTP/1.1\r\nHost: payments.demo.test\r\nConnection: close\r\n\r\n"
    openssl = [
        "openssl", "s_client", "-connect", f"127.0.0.1:{sc.EDGE_HTTPS_PORT}",
        "-servername", "payments.demo.test", "-verify_hostname", "payments.demo.test",
        "-CAfile", ".meshcar-compose/edge-ca.pem", "-verify_return_error", "-quiet", "-ign_eof",
        "-cert", ".meshcar-compose/partner.pem", "-key", ".meshcar-compose/partner.key",
    ]  # fmt: skip
    argv = [str(PODMAN_HERE), "--state", str(STATE), "in-netns", *as_operator(*openssl)]
    r = subprocess.run(
        argv, input=request, capture_output=True, text=True, timeout=60, cwd=proj, env=ENV
    )
    assert r.stdout.startswith("HTTP/1.1 200"), (r.returncode, r.stdout[:300], r.stderr[-500:])


def check_operator_files(proj: Path) -> list[str]:
    out = proj / ".meshcar-compose"
    names = {p.name for p in out.iterdir()}
    assert {"edge-ca.pem", "partner.pem", "partner.key", "mesh-bundle.pem"} <= names, names
    wrong = []
    for p in [out, *out.rglob("*")]:
        st = p.lstat()
        if (st.st_uid, st.st_gid) != OPERATOR:
            wrong.append(
                f"{p.relative_to(proj)} {st.st_uid}:{st.st_gid} {stat.filemode(st.st_mode)}"
            )
    assert wrong == [], f"not the operator's ({OPERATOR}): {wrong}"
    return sorted(names)


def test_compose_up_in_containers(project: Path) -> None:
    t = Timings()
    compose = ["compose", "-p", PROJECT, "-f", str(project / "docker-compose.yml")]
    t.run("setup", ph, "setup", timeout=900)
    wheels = t.run("wheels", ph, "wheels", str(ROOT), timeout=600).split()
    debs = STATE / "debs"
    t.run("debs", download_debs, debs)
    ph("compose", *compose, "down", "-v", timeout=300, check=False)  # a previous run's leftovers
    try:
        t.run(
            "build",
            ph,
            "podman", "build", "--pull=never", *wheels, "-v", f"{debs}:/debs:ro",
            "-f", str(CONTEXT / "deploy" / "docker" / "Dockerfile"), "-t", "meshcar:dev",
            str(CONTEXT),
            timeout=1200,
        )  # fmt: skip
        version = ph("podman", "run", "--rm", "--entrypoint", "iptables", "meshcar:dev",
                     "--version", timeout=120)  # fmt: skip
        assert version.startswith("iptables v"), version
        # `up --wait`: every healthcheck polled until it passes (podman-here's shim)
        try:
            t.run("up", ph, *compose, "up", "-d", "--wait", timeout=900, cwd=project)
        except BaseException:
            print(ph("podman", "ps", "-a", "--format", "{{.Names}} {{.Status}}", timeout=60))
            for name in ph("podman", "ps", "-a", "--filter", "status=exited",
                           "--format", "{{.Names}}", timeout=60).split():  # fmt: skip
                logs = subprocess.run(
                    [str(PODMAN_HERE), "--state", str(STATE), "podman", "logs", name],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
                    env=ENV, check=False,
                )  # fmt: skip
                print(f"--- {name} (exited):\n{logs.stdout[-3000:]}")
            raise
        t.run("checks", check_scenario, project)
        files = check_operator_files(project)
        print(f"[compose-containers] operator files: {files}")
    finally:
        t.run("down", ph, *compose, "down", "-v", timeout=600, check=False, cwd=project)
        t.run("teardown", ph, "teardown", timeout=300, check=False)
        print(f"[compose-containers] timings (s): {json.dumps(t.steps)}")
    # the operator can delete what init left them (root-owned 0700 pki/ could not be)
    r = subprocess.run(
        as_operator("rm", "-r", str(project / ".meshcar-compose")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert not (project / ".meshcar-compose").exists()
