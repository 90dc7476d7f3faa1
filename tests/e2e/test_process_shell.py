"""The process shell (meshcar/net/shell.py) in real processes: SIGTERM drains the edge as it
drains the sidecar -- the request in flight completes, new connections are refused, /ready
says draining, and the process exits 0 within drain_seconds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h11
import httpx
import pytest
import trustme

from meshcar.demo.plan import meshcar_argv
from tests.e2e.procs import Procs, free_port

pytestmark = pytest.mark.e2e

SUPPORT = Path(__file__).parent.parent / "support"
DRAIN_SECONDS = 30  # generous: the slow request takes 1.5 s


def _wait(cond, what: str, timeout: float = 20.0):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)  # polling interval, not synchronisation
    raise AssertionError(f"timed out waiting for {what}")


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _slow_backend(tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    port, state = free_port(), tmp_path / "slow.state"
    app = subprocess.Popen(
        [sys.executable, str(SUPPORT / "slow_app.py"), str(port), "http://127.0.0.1:1/", str(state)]
    )

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    _wait(up, "the slow backend")
    return app, port, state


def _slow_started(state: Path) -> bool:
    return state.exists() and any(
        json.loads(line)["event"] == "slow_started" for line in state.read_text().splitlines()
    )


@dataclass
class Edge:
    """`meshcar edge` with one terminate route (www.test, a trustme certificate)."""

    proc: subprocess.Popen
    https: int
    admin: int
    ca_file: Path

    def curl(self, path: str, *args: str) -> subprocess.Popen:
        """curl to https://www.test{path} through the edge, in the background."""
        url = f"https://www.test:{self.https}{path}"
        return subprocess.Popen(
            ["curl", "-sS", "--resolve", f"www.test:{self.https}:127.0.0.1"]
            + ["--cacert", str(self.ca_file), *args, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def _start_edge(procs: Procs, tmp_path: Path, backend_port: int, settings: str) -> Edge:
    """The edge in front of 127.0.0.1:`backend_port`, with `settings` (top-level YAML lines),
    started by `procs` (which stops it) and ready."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("www.test").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "site.pem")
    )
    https, admin = free_port(), free_port()
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(
        f"listen: {{https: '127.0.0.1:{https}'}}\nadmin: {{listen: '127.0.0.1:{admin}'}}\n"
        + settings
        + "routes: [{host: www.test, mode: terminate, tls: {cert: site.pem, key: site.pem},"
        f" backend: {{endpoints: ['127.0.0.1:{backend_port}']}}}}]\n"
    )
    proc = procs.start("edge", "edge", "--config", str(cfg))
    procs.wait_http(f"http://127.0.0.1:{admin}/ready", name="edge")
    return Edge(proc, https, admin, tmp_path / "ca.pem")


def test_edge_drains_a_request_in_flight_on_sigterm(tmp_path: Path) -> None:
    app, app_port, state = _slow_backend(tmp_path)
    procs = Procs(tmp_path)
    try:
        e = _start_edge(procs, tmp_path, app_port, f"drain_seconds: {DRAIN_SECONDS}\n")
        edge, https, admin = e.proc, e.https, e.admin
        curl = e.curl("/slow", "-w", "\n%{http_code}")
        _wait(lambda: _slow_started(state), "the request to reach the backend")
        edge.send_signal(signal.SIGTERM)
        _wait(lambda: '"event": "edge.draining"' in procs.log("edge"), "edge.draining")
        # the admin listener stays up while draining and says so; the public listener is closed
        r = httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=5)
        assert r.status_code == 503 and "draining" in r.text
        _wait(lambda: _refused(https), "new connections to be refused")
        out, err = curl.communicate(timeout=60)
        assert curl.returncode == 0, err
        body, code = out.rsplit("\n", 1)
        assert code == "200" and json.loads(body) == {"path": "/slow"}
        assert edge.wait(timeout=DRAIN_SECONDS) == 0, procs.log("edge")
        log = procs.log("edge")
        assert '"event": "edge.drained", "cut_off": 0' in log and '"event": "edge.stopped"' in log
    finally:
        procs.stop_all()
        app.terminate()
        app.wait(timeout=10)


def test_edge_second_signal_exits_at_once(tmp_path: Path) -> None:
    """While draining, a second SIGTERM cuts the request in flight off and exits 0."""
    # a backend that accepts and never answers: the request stays in flight
    hold = socket.create_server(("127.0.0.1", 0))
    procs = Procs(tmp_path)
    try:
        settings = "drain_seconds: 3600\ntimeouts: {response_head_seconds: 3600}\n"
        e = _start_edge(procs, tmp_path, hold.getsockname()[1], settings)
        edge = e.proc
        curl = e.curl("/hang")
        hold.settimeout(20)
        upstream, _ = hold.accept()  # the edge forwarded the request
        with upstream:
            os.kill(edge.pid, signal.SIGTERM)
            _wait(
                lambda: '"event": "edge.draining", "in_flight": 1' in procs.log("edge"),
                "edge.draining",
            )
            os.kill(edge.pid, signal.SIGTERM)
            assert edge.wait(timeout=30) == 0, procs.log("edge")
        assert '"event": "edge.exiting"' in procs.log("edge")
        curl.communicate(timeout=30)
        assert curl.returncode != 0  # cut off: no complete response
    finally:
        procs.stop_all()
        hold.close()


def _all_read_by_server(port: int, client_port: int) -> bool:
    """Every byte the client sent on its connection to `port` was delivered (acknowledged:
    nothing left in the client's send queue) and read (the server's receive queue is empty)."""
    queues = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, (tx, rx) = fields[1], fields[2], fields[3], fields[4].split(":")
        if state == "01":  # ESTABLISHED
            queues[(int(local.split(":")[1], 16), int(remote.split(":")[1], 16))] = (
                int(tx, 16),
                int(rx, 16),
            )
    client, server = queues.get((client_port, port)), queues.get((port, client_port))
    return client is not None and server is not None and client[0] == 0 and server[1] == 0


def _webhook_events(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        message = json.loads(line)["message"]  # every line is JSON (the webhook's formatter)
        if message.startswith("{"):
            out.append(json.loads(message))
    return out


def _half_sent_request(port: int, ctx, body: bytes, target: bytes):  # noqa: ANN001, ANN201
    """A TLS connection whose request head and part of its body are in flight: the server has
    read every byte sent, and a whole exchange on another connection since then gave its
    connection task the turns to parse the head and count the request."""
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1")
    s.sendall(
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (target, len(body)) + body[:10]
    )
    client_port = s.getsockname()[1]
    _wait(lambda: _all_read_by_server(port, client_port), "the server to read the request head")
    assert httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ctx, timeout=10).status_code == 200
    return s


def _read_response(s) -> tuple[int, bytes]:  # noqa: ANN001
    s.settimeout(30)
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="POST", target="/", headers=[("Host", "x")]))
    events: list = []
    while not any(isinstance(e, h11.EndOfMessage) for e in events):
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(s.recv(65536))
        else:
            events.append(event)
    return events[0].status_code, b"".join(e.data for e in events if isinstance(e, h11.Data))


def test_webhook_drains_a_request_in_flight_on_sigterm(tmp_path: Path) -> None:
    import ssl

    from tests.integration.test_webhook import pod, review

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    port, err = free_port(), tmp_path / "webhook.log"
    with open(err, "wb") as log:
        proc = subprocess.Popen(
            meshcar_argv(
                "webhook",
                "--listen",
                f"127.0.0.1:{port}",
                "--tls-cert",
                str(tmp_path / "tls.crt"),
                "--tls-key",
                str(tmp_path / "tls.key"),
                "--drain-seconds",
                str(DRAIN_SECONDS),
            ),
            stderr=log,
        )
    try:
        _wait(lambda: "webhook listening on" in err.read_text(), "the webhook to listen")
        body = json.dumps(review(pod())).encode()
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        with _half_sent_request(port, ctx, body, b"/inject") as s:
            proc.send_signal(signal.SIGTERM)
            _wait(
                lambda: any(e.get("event") == "webhook.draining" for e in _webhook_events(err)),
                "webhook.draining",
            )
            assert {
                "event": "webhook.draining",
                "in_flight": 1,
                "grace_seconds": DRAIN_SECONDS,
            } in _webhook_events(err)
            _wait(lambda: _refused(port), "new connections to be refused")
            s.sendall(body[10:])
            status, payload = _read_response(s)
        assert status == 200
        assert "patch" in json.loads(payload)["response"]
        assert proc.wait(timeout=DRAIN_SECONDS) == 0, err.read_text()
        drained = [e for e in _webhook_events(err) if e.get("event") == "webhook.drained"]
        assert drained == [{"event": "webhook.drained", "cut_off": 0}]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_ca_drains_a_request_in_flight_on_sigterm(tmp_path: Path) -> None:
    """The CA cannot import the shell (meshcar_ca never imports meshcar); ca/cli.py keeps the
    same contract."""
    import ssl

    ca_dir = tmp_path / "ca"
    subprocess.run(
        meshcar_argv("ca", "init", "--dir", str(ca_dir), "--trust-domain", "td.test"),
        check=True,
        capture_output=True,
    )
    out = tmp_path / "ca.log"
    with open(out, "wb") as log:
        proc = subprocess.Popen(
            meshcar_argv(
                "ca",
                "serve",
                "--dir",
                str(ca_dir),
                "--listen",
                "127.0.0.1:0",
                "--drain-seconds",
                str(DRAIN_SECONDS),
            ),
            stdout=log,
        )

    def events() -> list[dict]:
        return [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]

    try:
        ready = _wait(lambda: [e for e in events() if e["event"] == "ca.ready"], "ca.ready")
        port = int(ready[0]["listen"].rsplit(":", 1)[1])
        ctx = ssl.create_default_context(cafile=str(ca_dir / "root.pem"))
        body = json.dumps({"csr": "not a csr", "token": "not a token"}).encode()
        with _half_sent_request(port, ctx, body, b"/v1/sign") as s:
            proc.send_signal(signal.SIGTERM)
            _wait(lambda: any(e["event"] == "ca.draining" for e in events()), "ca.draining")
            assert [e["in_flight"] for e in events() if e["event"] == "ca.draining"] == [1]
            _wait(lambda: _refused(port), "new connections to be refused")
            s.sendall(body[10:])
            status, payload = _read_response(s)
        assert 400 <= status < 500 and json.loads(payload)["error"]  # a complete answer
        assert proc.wait(timeout=DRAIN_SECONDS) == 0, out.read_text()
        assert [e for e in events() if e["event"] == "ca.drained"] == [
            {"event": "ca.drained", "cut_off": 0}
        ]
        assert events()[-1] == {"event": "ca.stopped", "signal": "SIGTERM"}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
