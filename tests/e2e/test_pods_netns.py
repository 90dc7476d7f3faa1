"""Pods on one machine: each pod is a network namespace with its own IP on a bridge, its
sidecar and (for api) its app inside; capture is done the way an init container does it,
with iptables rules inside each pod's namespace. An unmodified client's plain HTTP call to
another pod's IP leaves the pod as mTLS, which a packet capture on the bridge confirms.

Layout (10.77.0.0/24 on a bridge in a namespace of its own, never the host's):
  ca 10.77.0.10 (CA API :8600) | web 10.77.0.2 (sidecar) | api 10.77.0.3 (sidecar + app)
  rogue 10.77.0.4 (sidecar, not allowed by api) | outside 10.77.0.9 (no sidecar)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.procs import meshcar_cmd

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

TD = "meshcar.demo"
PREFIX = f"mcp{os.getpid() % 100000}"
PODS = {"ca": "10.77.0.10", "web": "10.77.0.2", "api": "10.77.0.3", "rogue": "10.77.0.4",
        "outside": "10.77.0.9"}
MESH_PORT, APP_PORT, CA_PORT, TRANSPARENT_PORT, ADMIN_PORT = 7002, 9002, 8600, 15001, 7200
CAPTURE = str(Path(__file__).parent.parent / "support" / "capture.py")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


def ns(pod: str) -> str:
    return f"{PREFIX}-{pod}"


def in_ns(pod: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns(pod), *args, check=check)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns, veth, iptables)"
    for tool in ("ip", "iptables", "curl"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    probe = f"{PREFIX}-probe"
    try:
        r = sh("ip", "netns", "add", probe, check=False)
        if r.returncode != 0:
            return f"needs ip netns: {r.stderr.strip()}"
        r = sh("ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", check=False)
        if r.returncode != 0:
            return f"needs iptables in a namespace: {r.stderr.strip()}"
    finally:
        sh("ip", "netns", "del", probe, check=False)
    return None


def _cleanup_leftovers() -> None:
    """Namespaces of earlier crashed runs (same prefix shape); deleting one removes its rules."""
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith("mcp") and "-" in name:
            sh("ip", "netns", "del", name, check=False)


@pytest.fixture(scope="module")
def pods(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(f"pods-on-one-machine test skipped: {reason}")
    _cleanup_leftovers()
    d = tmp_path_factory.mktemp("pods")
    procs: list[subprocess.Popen] = []
    try:
        sh("ip", "netns", "add", ns("br"))
        sh("ip", "netns", "exec", ns("br"), "ip", "link", "add", "br0", "type", "bridge")
        sh("ip", "netns", "exec", ns("br"), "ip", "link", "set", "br0", "up")
        for i, (pod, ip) in enumerate(PODS.items()):
            sh("ip", "netns", "add", ns(pod))
            in_ns(pod, "ip", "link", "set", "lo", "up")
            # create the veth pair inside the bridge namespace, then move one end into the pod
            sh("ip", "netns", "exec", ns("br"), "ip", "link", "add", f"v{i}", "type", "veth",
               "peer", "name", "eth0", "netns", ns(pod))
            sh("ip", "netns", "exec", ns("br"), "ip", "link", "set", f"v{i}", "master", "br0", "up")
            in_ns(pod, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            in_ns(pod, "ip", "link", "set", "eth0", "up")

        # init-container rules. web and rogue: outbound TCP to other pods goes to the sidecar's
        # transparent listener, except the sidecar's own mTLS (mesh port) and CA traffic.
        for pod in ("web", "rogue"):
            in_ns(pod, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "10.77.0.0/24",
                  "-m", "multiport", "!", "--dports", f"{MESH_PORT},{CA_PORT}",
                  "-j", "REDIRECT", "--to-ports", str(TRANSPARENT_PORT))
        # api: inbound TCP to the app's port goes to the mesh listener (plaintext never reaches it).
        in_ns("api", "iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", str(APP_PORT),
              "-j", "REDIRECT", "--to-ports", str(MESH_PORT))

        ca_dir = d / "ca"
        subprocess.run(meshcar_cmd("ca", "init", "--dir", str(ca_dir), "--trust-domain", TD), check=True,
                       capture_output=True)
        for pod in ("web", "api", "rogue"):
            tok = subprocess.run(meshcar_cmd("ca", "token", "--dir", str(ca_dir), "--spiffe-id",
                                             f"spiffe://{TD}/svc/{pod}"), check=True, capture_output=True,
                                 text=True).stdout.strip()
            (d / f"{pod}.token").write_text(tok)

        def start(pod: str, name: str, *args: str) -> None:
            log = open(d / f"{name}.log", "wb")
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns(pod), *meshcar_cmd(*args)],
                                          stdout=log, stderr=subprocess.STDOUT))
            log.close()

        start("ca", "ca", "ca", "serve", "--dir", str(ca_dir), "--listen", f"{PODS['ca']}:{CA_PORT}",
              "--san", PODS["ca"])
        start("api", "api-app", "demo-app", "--name", "api", "--port", str(APP_PORT), "--host", "127.0.0.1")

        def sidecar_cfg(pod: str, allow: list[str]) -> Path:
            cfg = {
                "identity": {"spiffe_id": f"spiffe://{TD}/svc/{pod}", "ca_url": f"https://{PODS['ca']}:{CA_PORT}",
                             "ca_bundle": str(ca_dir / "root.pem"), "token_file": str(d / f"{pod}.token"),
                             "state_dir": str(d / f"{pod}-state")},
                "app": {"port": APP_PORT},
                "inbound": {"listen": f"0.0.0.0:{MESH_PORT}", "allow": allow},
                "outbound": {"transparent_listen": f"127.0.0.1:{TRANSPARENT_PORT}", "upstreams": {
                    "api": {"endpoints": [f"{PODS['api']}:{MESH_PORT}"], "spiffe_id": f"spiffe://{TD}/svc/api",
                            "match": [f"{PODS['api']}:{APP_PORT}"]}}},
                "admin": {"listen": f"127.0.0.1:{ADMIN_PORT}"},
            }
            path = d / f"{pod}.yaml"
            path.write_text(json.dumps(cfg))
            return path

        start("api", "api-sidecar", "sidecar", "--config", str(sidecar_cfg("api", [f"spiffe://{TD}/svc/web"])))
        start("web", "web-sidecar", "sidecar", "--config", str(sidecar_cfg("web", [])))
        start("rogue", "rogue-sidecar", "sidecar", "--config", str(sidecar_cfg("rogue", [])))
        deadline = time.monotonic() + 30
        for pod in ("api", "web", "rogue"):
            while True:
                r = in_ns(pod, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                          f"http://127.0.0.1:{ADMIN_PORT}/ready", check=False)
                if r.stdout == "200":
                    break
                if time.monotonic() > deadline:
                    logs = "\n".join((d / f"{n}.log").read_text()[-1500:] for n in ("ca", f"{pod}-sidecar"))
                    raise AssertionError(f"{pod} sidecar not ready:\n{logs}")
                time.sleep(0.1)
        while in_ns("api", "curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{APP_PORT}/healthz",
                    check=False).returncode != 0:
            assert time.monotonic() < deadline, "api app not up"
            time.sleep(0.1)
        yield d
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for pod in [*PODS, "br"]:
            sh("ip", "netns", "del", ns(pod), check=False)


def test_plain_http_from_an_unmodified_client_leaves_the_pod_as_mtls(pods: Path) -> None:
    out = pods / "capture.json"
    stop = pods / "capture.stop"
    web_port = f"v{list(PODS).index('web')}"  # web's veth, on the bridge side: its link to the world
    cap = subprocess.Popen(["ip", "netns", "exec", ns("br"), sys.executable, CAPTURE, web_port, str(out), str(stop)])
    try:
        deadline = time.monotonic() + 10
        while not Path(str(out) + ".ready").exists():
            assert time.monotonic() < deadline and cap.poll() is None, "capture did not start"
            time.sleep(0.02)
        # the "app" in the web pod: plain curl to api's pod IP and app port, no proxy settings
        r = in_ns("web", "curl", "-s", "--max-time", "10", "--noproxy", "*",
                  f"http://{PODS['api']}:{APP_PORT}/v1/hello")
        body = json.loads(r.stdout)
    finally:
        stop.touch()
        cap.wait(timeout=10)
    assert body["service"] == "api" and body["path"] == "/v1/hello"
    assert body["peer"] == f"spiffe://{TD}/svc/web"  # api's sidecar authenticated web's mTLS
    packets = json.loads(out.read_text())
    between = [p for p in packets if {p["src"], p["dst"]} == {PODS["web"], PODS["api"]}]
    assert between, "nothing captured between the pods"
    assert all(MESH_PORT in (p["sport"], p["dport"]) for p in between), "traffic not on the mesh port"
    payloads = b"".join(bytes.fromhex(p["payload"]) for p in between)
    assert any(bytes.fromhex(p["payload"]).startswith(b"\x16\x03") for p in between)  # TLS handshake
    assert b"GET /v1/hello" not in payloads and b"HTTP/1.1" not in payloads  # no plaintext on the wire


def test_a_pod_the_policy_does_not_allow_gets_403(pods: Path) -> None:
    r = in_ns("rogue", "curl", "-s", "--max-time", "10", "--noproxy", "*", "-w", "\n%{http_code}",
              f"http://{PODS['api']}:{APP_PORT}/v1/hello")
    assert r.stdout.endswith("\n403")
    assert f"spiffe://{TD}/svc/rogue is not allowed to call spiffe://{TD}/svc/api" in r.stdout


def test_plaintext_from_outside_the_mesh_never_reaches_the_app(pods: Path) -> None:
    r = in_ns("outside", "curl", "-s", "--max-time", "10", f"http://{PODS['api']}:{APP_PORT}/v1/hello",
              check=False)
    assert r.returncode != 0 and '"service"' not in r.stdout  # the mTLS listener got plaintext


def test_unknown_original_destination_is_refused(pods: Path) -> None:
    r = in_ns("web", "curl", "-s", "--max-time", "10", "--noproxy", "*", "-w", "\n%{http_code}",
              f"http://{PODS['outside']}:8080/")
    assert r.stdout.endswith("\n502") and "is not a configured upstream" in r.stdout
