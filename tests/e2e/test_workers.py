"""`workers: N` in real processes (meshcar/net/workers.py): a sidecar pair and an edge with two
worker processes each serve requests and both workers accept connections (read from /proc:
which process holds each accepted socket), SIGTERM drains both workers and exits 0, a killed
worker is restarted, a worker failing at start stops the role with exit 1."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trustme

from tests.e2e.procs import (
    Procs,
    ca_init,
    ca_token,
    free_port,
    meshcar_cmd,
    sidecar_identity,
    wait_until,
)

pytestmark = pytest.mark.e2e
SUPPORT = Path(__file__).parent.parent / "support"
TD = "meshcar.demo"
CONNS = 16  # P(all on one of 2 workers) = 2**-15 with SO_REUSEPORT's hash


def sid(n: str) -> str:
    return f"spiffe://{TD}/svc/{n}"


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return sorted(out)


def worker_pid(log: str, index: int) -> int:
    """The pid of the latest start of worker `index`, from the parent's log lines."""
    pid = 0
    for line in log.splitlines():
        if '"event": "sidecar.worker_started"' in line or '"event": "edge.worker_started"' in line:
            ev = json.loads(line)
            if ev["worker"] == index:
                pid = ev["pid"]
    return pid


def _established_inodes(port: int) -> set[str]:
    """Inodes of ESTABLISHED loopback TCP sockets whose local port is `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "01":
                inodes.add(f[9])
    return inodes


def accepted_by(pids: list[int], port: int) -> dict[int, int]:
    """How many accepted connections on `port` each process holds."""
    inodes = _established_inodes(port)
    counts = {}
    for pid in pids:
        n = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                n += 1
        counts[pid] = n
    return counts


def assert_both_workers_accept(parent: int, port: int) -> None:
    workers = children(parent)
    assert len(workers) == 2, workers
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(CONNS)]
    try:
        counts = wait_until(
            lambda: (c := accepted_by(workers, port)) and sum(c.values()) >= CONNS and c,
            f"{CONNS} connections accepted on {port}",
        )
        assert all(n > 0 for n in counts.values()), counts
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory):  # noqa: ANN201
    d = tmp_path_factory.mktemp("workers")
    port = free_port()
    ca_init(d / "ca", TD)
    procs = Procs(d)
    try:
        procs.start_ca(d / "ca", port)
        yield d, port
    finally:
        procs.stop_all()


def sidecar_cfg(
    d: Path, ca_port: int, name: str, ports: dict[str, int], upstreams: dict, **extra: object
) -> Path:
    (d / f"{name}.token").write_text(ca_token(d / "ca", sid(name)))
    cfg = {
        "identity": sidecar_identity(d, name, sid(name), ca_port),
        "app": {"port": ports["app"]},
        "inbound": {"listen": f"127.0.0.1:{ports['in']}", "allow": [sid("web")]},
        "outbound": {"listen": f"127.0.0.1:{ports['out']}", "upstreams": upstreams},
        "admin": {"listen": f"127.0.0.1:{ports['admin']}"},
        **extra,
    }
    path = d / f"{name}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _ports() -> dict[str, int]:
    return {k: free_port() for k in ("app", "in", "out", "admin")}


def _get_through(out_port: int, n: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", out_port, timeout=10)
    try:
        for _ in range(n):
            conn.request("GET", "http://api/hello")
            r = conn.getresponse()
            body = r.read()
            assert r.status == 200, body
    finally:
        conn.close()


def per_worker(admin: int, name: str, **labels: str) -> dict[str, float]:
    """A counter's value per `worker` label in the role's merged /metrics."""
    text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            worker = line.split('worker="', 1)[1].split('"', 1)[0]
            out[worker] = out.get(worker, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def start_pair(
    procs: Procs, api: dict[str, int], api_cfg: Path, web: dict[str, int], web_cfg: Path
) -> tuple[subprocess.Popen, subprocess.Popen]:
    """The demo app as api's app, api's and web's sidecars (logs `api`, `web`), once both
    sidecars' /ready say 200; the two sidecar processes."""
    procs.start("api-app", "demo-app", "--name", "api", "--port", str(api["app"]))
    api_p = procs.start("api", "sidecar", "--config", str(api_cfg))
    web_p = procs.start("web", "sidecar", "--config", str(web_cfg))
    for n, p in (("api", api), ("web", web)):
        procs.wait_ready(p["admin"], n)
    return api_p, web_p


def test_two_worker_sidecar_pair(ca, tmp_path: Path, procs: Procs) -> None:  # noqa: ANN001
    """Serves through both pairs of workers; every worker accepts; killing one restarts it;
    SIGTERM drains both workers of each sidecar and the parent exits 0."""
    d, ca_port = ca
    api, web = _ports(), _ports()
    api_cfg = sidecar_cfg(d, ca_port, "api", api, {}, workers=2)
    up = {"api": {"endpoints": [f"127.0.0.1:{api['in']}"], "spiffe_id": sid("api")}}
    web_cfg = sidecar_cfg(d, ca_port, "web", web, up, workers=2)
    api_p, web_p = start_pair(procs, api, api_cfg, web, web_cfg)
    _get_through(web["out"], 20)
    for _ in range(CONNS):  # a new connection each: spread over both workers
        _get_through(web["out"], 1)

    # worker 0's /metrics has every worker's samples, labelled
    def counted() -> dict[str, float] | None:  # a request is counted once it is done
        got = per_worker(web["admin"], "meshcar_requests_total", direction="outbound")
        return got if sum(got.values()) == 20 + CONNS else None

    got = wait_until(counted, "every request counted")
    assert set(got) == {"0", "1"} and all(v > 0 for v in got.values()), got
    text = httpx.get(f"http://127.0.0.1:{api['admin']}/metrics", timeout=10).text
    assert 'worker="0"' in text and 'worker="1"' in text
    assert_both_workers_accept(web_p.pid, web["out"])
    assert_both_workers_accept(api_p.pid, api["in"])
    # only worker 0 asked the CA: the other worker took worker 0's credential
    for name in ("api", "web"):
        log = procs.log(name)
        assert log.count('"how": "bootstrap"') == 1, log[-3000:]
        assert log.count('"how": "from worker 0"') == 1, log[-3000:]
    certs = httpx.get(f"http://127.0.0.1:{web['admin']}/certs", timeout=5).json()
    assert certs["spiffe_id"] == sid("web")
    # a renewal by worker 0 (one CA call) reaches the other worker through the state dir
    renewed = httpx.post(f"http://127.0.0.1:{web['admin']}/renew", timeout=30).json()
    assert renewed["renewed"] and renewed["serial"] != certs["serial"], renewed
    wait_until(
        lambda: (
            f'"how": "from worker 0", "spiffe_id": "{sid("web")}", '
            f'"serial": "{renewed["serial"]}"' in procs.log("web")
        ),
        "worker 1 to install worker 0's renewed certificate",
    )
    assert procs.log("web").count('"how": "renewed"') == 1
    _get_through(web["out"], 3)

    # a worker killed by SIGKILL is restarted (worker 1, then worker 0, which serves admin
    # and reuses the certificate in the state dir: no CA call)
    for index in (1, 0):
        victim = worker_pid(procs.log("web"), index)
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda v=victim: (c := children(web_p.pid)) and len(c) == 2 and v not in c,
            f"worker {index} to be replaced",
        )
        assert worker_pid(procs.log("web"), index) != victim
        procs.wait_ready(web["admin"], "web")
        _get_through(web["out"], 5)
        assert_both_workers_accept(web_p.pid, web["out"])
    log = procs.log("web")
    assert log.count('"event": "sidecar.worker_restarting"') == 2, log[-3000:]
    assert log.count('"how": "reused from state dir"') == 1, log[-3000:]
    assert log.count('"how": "bootstrap"') == 1

    # SIGTERM to the parent drains every worker; the parent exits 0 once they have
    for name, p in (("web", web_p), ("api", api_p)):
        workers = children(p.pid)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0, procs.log(name)
        assert not any(Path(f"/proc/{w}").exists() for w in workers)
        log = procs.log(name)
        assert log.count('"event": "sidecar.draining"') == 2, log[-3000:]
        assert log.count('"event": "sidecar.stopped"') == 2, log[-3000:]
        assert '"event": "sidecar.workers_stopped", "code": 0' in log


def test_worker_failing_at_start_stops_the_sidecar_with_1(ca, procs: Procs) -> None:  # noqa: ANN001
    """A worker that exits before it was ever ready (its port is taken) is not restarted in
    a loop: the parent stops the others and exits 1."""
    d, ca_port = ca
    p = _ports()
    taken = socket.create_server(("127.0.0.1", p["in"]))  # no SO_REUSEPORT: bind fails
    try:
        cfg = sidecar_cfg(d, ca_port, "lonely", p, {}, workers=2)
        proc = procs.start("lonely", "sidecar", "--config", str(cfg))
        assert proc.wait(timeout=60) == 1, procs.log("lonely")
        log = procs.log("lonely")
        assert '"event": "sidecar.workers_failed"' in log, log[-3000:]
        assert "Address already in use" in log
    finally:
        taken.close()


def test_two_worker_edge(tmp_path: Path, procs: Procs) -> None:
    """The edge's public listener is shared by two workers; SIGTERM drains both, exit 0."""
    app_port, https, admin = free_port(), free_port(), free_port()
    cfg = _edge_cfg(tmp_path, app_port, https, admin, "")
    procs.start("app", "demo-app", "--name", "www", "--port", str(app_port))
    edge = procs.start("edge", "edge", "--config", str(cfg))
    procs.wait_ready(admin, "edge")
    out = subprocess.run(
        ["curl", "-sS", "--resolve", f"www.test:{https}:127.0.0.1", "--cacert"]
        + [str(tmp_path / "ca.pem"), "-o", "/dev/null", "-w", "%{http_code}"]
        + [f"https://www.test:{https}/"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout == "200", out.stderr
    assert_both_workers_accept(edge.pid, https)
    edge.send_signal(signal.SIGTERM)
    assert edge.wait(timeout=30) == 0, procs.log("edge")
    assert procs.log("edge").count('"event": "edge.draining"') == 2


def _edge_cfg(tmp_path: Path, backend_port: int, https: int, admin: int, extra: str) -> Path:
    site = trustme.CA()
    site.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    site.issue_cert("www.test").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "site.pem")
    )
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(
        f"listen: {{https: '127.0.0.1:{https}'}}\nadmin: {{listen: '127.0.0.1:{admin}'}}\n"
        f"workers: 2\n{extra}"
        "routes: [{host: www.test, mode: terminate, tls: {cert: site.pem, key: site.pem},"
        f" backend: {{endpoints: ['127.0.0.1:{backend_port}']}}}}]\n"
    )
    return cfg


def _curl(tmp_path: Path, https: int, path: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["curl", "-sS", "--resolve", f"www.test:{https}:127.0.0.1", "--cacert"]
        + [str(tmp_path / "ca.pem"), "-w", "\n%{http_code}", f"https://www.test:{https}{path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigterm_lets_a_request_in_flight_in_a_worker_finish(tmp_path: Path, procs: Procs) -> None:
    """SIGTERM to the parent: every worker drains (/ready 503 draining, listener closed), the
    request in flight in one of them is answered, then the parent exits 0."""
    app_port, https, admin = free_port(), free_port(), free_port()
    state = tmp_path / "slow.state"
    app = subprocess.Popen(
        [sys.executable, str(SUPPORT / "slow_app.py"), str(app_port), "http://127.0.0.1:1/"]
        + [str(state)]
    )
    try:
        cfg = _edge_cfg(tmp_path, app_port, https, admin, "drain_seconds: 30\n")
        edge = procs.start("edge", "edge", "--config", str(cfg))
        procs.wait_ready(admin, "edge")
        curl = _curl(tmp_path, https, "/slow")
        wait_until(lambda: state.exists() and "slow_started" in state.read_text(), "slow request")
        edge.send_signal(signal.SIGTERM)
        wait_until(lambda: procs.log("edge").count('"event": "edge.draining"') == 2, "2 drains")
        # worker 0 answers (draining) until the last worker is done, wherever the request is
        r = httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=5)
        assert r.status_code == 503 and "draining" in r.text, r.text
        out, err = curl.communicate(timeout=60)
        assert curl.returncode == 0, err
        body, code = out.rsplit("\n", 1)
        assert code == "200" and json.loads(body) == {"path": "/slow"}
        assert edge.wait(timeout=30) == 0, procs.log("edge")
        log = procs.log("edge")
        assert log.count('"event": "edge.drained", "cut_off": 0') == 2, log[-3000:]
    finally:
        app.terminate()
        app.wait(timeout=10)


def test_second_sigterm_is_forwarded_and_stops_at_once(tmp_path: Path, procs: Procs) -> None:
    hold = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    https, admin = free_port(), free_port()
    try:
        extra = "drain_seconds: 3600\ntimeouts: {response_head_seconds: 3600}\n"
        cfg = _edge_cfg(tmp_path, hold.getsockname()[1], https, admin, extra)
        edge = procs.start("edge", "edge", "--config", str(cfg))
        procs.wait_ready(admin, "edge")
        curl = _curl(tmp_path, https, "/hang")
        hold.settimeout(20)
        upstream, _ = hold.accept()
        with upstream:
            edge.send_signal(signal.SIGTERM)
            wait_until(
                lambda: '"event": "edge.draining", "in_flight": 1' in procs.log("edge"), "drain"
            )
            edge.send_signal(signal.SIGTERM)
            assert edge.wait(timeout=30) == 0, procs.log("edge")
        assert '"event": "edge.exiting"' in procs.log("edge")
        curl.communicate(timeout=30)
        assert curl.returncode != 0
    finally:
        hold.close()


@pytest.mark.parametrize("value", ["0", "-1", "x", "true", "65", "1.5"])
def test_bad_workers_is_a_config_error_with_file_and_key(tmp_path: Path, value: str) -> None:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(
        "listen: {https: '127.0.0.1:1'}\nadmin: {listen: '127.0.0.1:2'}\n"
        f"workers: {value}\n"
        "routes: [{host: a.test, mode: passthrough, backend: {endpoints: ['127.0.0.1:3']}}]\n"
    )
    out = subprocess.run(meshcar_cmd("edge", "--config", str(cfg)), capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert f"{cfg}: workers: must be a whole number from 1 to 64, or auto" in out.stderr
