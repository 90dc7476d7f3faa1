"""Hot reload of a real `meshcar edge` process (common/reload.py): SIGHUP reloads instead of
killing; a route added by a reload serves with no failed request under continuous load; an
invalid file is rejected with its reason (log, metric, GET /config/status) while the old
config keeps serving; a certificate swap is seen by new connections only; with `workers: 2`
the parent's SIGHUP reloads both workers."""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import trustme
from cryptography import x509

from tests.e2e.procs import Procs, free_port, wait_until

pytestmark = pytest.mark.e2e


class _Backend(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = f"{self.server.name} {self.path}".encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


Backend = Callable[[str], ThreadingHTTPServer]


@pytest.fixture
def backend() -> Iterator[Backend]:
    """Starts plain HTTP backends answering "<name> <path>"; all shut down at teardown."""
    started: list[ThreadingHTTPServer] = []

    def start(name: str) -> ThreadingHTTPServer:
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
        srv.name = name  # type: ignore[attr-defined]
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()


class EdgeProc:
    def __init__(
        self,
        tmp: Path,
        procs: Procs,
        backends: dict[str, int],
        workers: int = 1,
        settings: str = "",
    ):
        self.tmp, self.procs = tmp, procs
        self.ca = trustme.CA()
        self.ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
        self.https, self.admin = free_port(), free_port()
        self.cfg = tmp / "edge.yaml"
        self.workers, self.settings = workers, settings
        for host in backends:
            self.issue(host)
        self.write(backends)
        self.proc = procs.start("edge", "edge", "--config", str(self.cfg))
        procs.wait_http(f"http://127.0.0.1:{self.admin}/ready", name="edge")

    def issue(self, host: str) -> int:
        """A new certificate for `host` in its files; its serial."""
        cert = self.ca.issue_cert(host)
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.tmp / f"{host}.pem"))
        return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number

    def write(self, backends: dict[str, int], extra: str = "") -> None:
        routes = ",".join(
            f"{{host: {h}, mode: terminate, tls: {{cert: {h}.pem, key: {h}.pem}},"
            f" backend: {{endpoints: ['127.0.0.1:{p}']}}}}"
            for h, p in backends.items()
        )
        text = (
            f"listen: {{https: '127.0.0.1:{self.https}'}}\n"
            f"admin: {{listen: '127.0.0.1:{self.admin}'}}\nworkers: {self.workers}\n"
            f"routes: [{routes}]\n{self.settings}{extra}"
        )
        tmp = self.cfg.with_suffix(".new")
        tmp.write_text(text)
        tmp.replace(self.cfg)  # as a ConfigMap update: a rename into place

    def metric(self, result: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.admin}/metrics", timeout=5).text
        pat = rf'^meshcar_config_reloads_total\{{[^}}]*result="{result}"[^}}]*\}} (\S+)$'
        return sum(float(m) for m in re.findall(pat, text, re.M))

    def status(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.admin}/config/status", timeout=5).json()

    def client(self) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.tmp / "ca.pem"))
        return httpx.Client(verify=ctx, timeout=10)

    def connect(self, host: str) -> ssl.SSLSocket:
        """A new TLS connection to the edge with SNI `host`, verified with the test's CA."""
        ctx = ssl.create_default_context(cafile=str(self.tmp / "ca.pem"))
        return ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", self.https)), server_hostname=host
        )

    def url(self, host: str, path: str = "/") -> str:
        return f"https://{host}:{self.https}{path}"

    def hup_andwait_until(self, result: str, before: float) -> None:
        self.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: self.metric(result) >= before + self.workers, f"a reload {result}")


def _resolving(edge: EdgeProc) -> httpx.HTTPTransport:
    """A transport that sends every host name to the edge on 127.0.0.1 (SNI stays the name)."""

    class _T(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            request.extensions["sni_hostname"] = request.url.host
            request.url = request.url.copy_with(host="127.0.0.1")
            request.headers["Host"] = f"{request.extensions['sni_hostname']}:{edge.https}"
            return super().handle_request(request)

    ctx = ssl.create_default_context(cafile=str(edge.tmp / "ca.pem"))
    return _T(verify=ctx)


def test_route_added_by_sighup_under_load_and_bad_config_rejected(
    tmp_path: Path, backend: Backend, procs: Procs
) -> None:
    a, b = backend("a"), backend("b")
    edge = EdgeProc(tmp_path, procs, {"a.test": a.server_port})
    failures: list[str] = []
    served = [0]
    stop = threading.Event()

    def load() -> None:  # continuous keep-alive and new-connection requests to a.test
        with httpx.Client(transport=_resolving(edge), timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.get(edge.url("a.test", "/load"))
                    if r.status_code != 200 or r.text != "a /load":
                        failures.append(f"{r.status_code} {r.text[:100]}")
                    served[0] += 1
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: served[0] >= 50, "load to run")
    hash0 = edge.status()["hash"]

    # a valid change: route b.test added
    edge.issue("b.test")
    edge.write({"a.test": a.server_port, "b.test": b.server_port})
    edge.hup_andwait_until("success", 0)
    assert edge.proc.poll() is None  # SIGHUP no longer stops the process
    with httpx.Client(transport=_resolving(edge), timeout=10) as c:
        assert c.get(edge.url("b.test", "/new")).text == "b /new"
    st = edge.status()
    assert st["hash"] != hash0 and st["last_reload"]["result"] == "success"

    # an invalid change: rejected with the reason, the running config still serves
    edge.write({"a.test": a.server_port}, "bogus_key: 1\n")
    edge.hup_andwait_until("failure", 0)
    st = edge.status()
    assert st["last_reload"]["result"] == "failure" and "bogus_key" in st["last_reload"]["error"]
    assert st["hash"] != hash0  # still the config with b.test
    log = procs.log("edge")
    assert '"event": "edge.config.reload_failed"' in log and "bogus_key" in log
    with httpx.Client(transport=_resolving(edge), timeout=10) as c:
        assert c.get(edge.url("b.test", "/still")).text == "b /still"

    # restart-only keys are named, not applied
    edge.write({"a.test": a.server_port}, "drain_seconds: 3\n")
    edge.hup_andwait_until("success", 1)
    assert edge.status()["restart_required"] == ["drain_seconds"]
    served_at_end = served[0]
    wait_until(lambda: served[0] >= served_at_end + 20, "load to go on after the reloads")
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert failures == [], failures[:5]
    assert edge.metric("failure") == 1


def _peer_serial(s: ssl.SSLSocket) -> int:
    der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _get(s: ssl.SSLSocket, path: str) -> bytes:
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head, _, body = buf.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += s.recv(65536)
    return head.split(b"\r\n", 1)[0] + b" " + body


def test_certificate_swap_seen_by_new_connections_only(
    tmp_path: Path, backend: Backend, procs: Procs
) -> None:
    a = backend("a")
    edge = EdgeProc(tmp_path, procs, {"a.test": a.server_port})
    old = edge.connect("a.test")
    assert _get(old, "/1") == b"HTTP/1.1 200 OK a /1"
    old_serial = _peer_serial(old)
    new_serial = edge.issue("a.test")  # the same files, a new certificate
    assert new_serial != old_serial
    edge.hup_andwait_until("success", 0)
    # the established keep-alive connection keeps working, with the certificate it had
    assert _get(old, "/2") == b"HTTP/1.1 200 OK a /2"
    assert _peer_serial(old) == old_serial
    fresh = edge.connect("a.test")
    assert _peer_serial(fresh) == new_serial
    assert _get(fresh, "/3") == b"HTTP/1.1 200 OK a /3"
    old.close()
    fresh.close()


def test_unreadable_certificate_rejects_the_reload(
    tmp_path: Path, backend: Backend, procs: Procs
) -> None:
    a = backend("a")
    edge = EdgeProc(tmp_path, procs, {"a.test": a.server_port})
    with edge.connect("a.test") as s:
        serial = _peer_serial(s)
    (tmp_path / "a.test.pem").write_text("not a certificate\n")
    edge.hup_andwait_until("failure", 0)
    error = edge.status()["last_reload"]["error"]
    assert "a.test" in error and "a.test.pem" in error, error
    with edge.connect("a.test") as s:
        assert _peer_serial(s) == serial  # the running certificate still serves
        assert _get(s, "/x") == b"HTTP/1.1 200 OK a /x"


def test_sighup_to_a_workers_2_parent_reloads_both(
    tmp_path: Path, backend: Backend, procs: Procs
) -> None:
    a, b = backend("a"), backend("b")
    edge = EdgeProc(tmp_path, procs, {"a.test": a.server_port}, workers=2)
    edge.issue("b.test")
    edge.write({"a.test": a.server_port, "b.test": b.server_port})
    edge.hup_andwait_until("success", 0)  # waits for one success per worker
    log = procs.log("edge")
    lines = [json.loads(x) for x in log.splitlines() if '"edge.config.reloaded"' in x]
    assert len(lines) == 2, log[-2000:]
    assert edge.proc.poll() is None
    # every connection lands on one worker or the other: each must know b.test
    for _ in range(20):
        with httpx.Client(transport=_resolving(edge), timeout=10) as c:
            assert c.get(edge.url("b.test", "/w")).text == "b /w"


def test_file_watch_reloads_a_changed_certificate_without_a_signal(
    tmp_path: Path, backend: Backend, procs: Procs
) -> None:
    a = backend("a")
    edge = EdgeProc(
        tmp_path, procs, {"a.test": a.server_port}, settings="reload: {watch_seconds: 0.2}\n"
    )
    new_serial = edge.issue("a.test")  # only the certificate file changes
    wait_until(lambda: edge.metric("success") >= 1, "the watch to reload")
    assert edge.status()["last_reload"]["trigger"] == "file_changed"
    with edge.connect("a.test") as s:
        assert _peer_serial(s) == new_serial
