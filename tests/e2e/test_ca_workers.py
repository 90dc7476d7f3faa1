"""`meshcar ca serve --workers N` as real processes: every process serves the one listening
socket (proved by stopping the others with SIGSTOP), a join token's uses hold across
processes under concurrent requests, the processes share ca.db, an intermediate renewal
reaches the workers' API certificate, and SIGTERM stops them all."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.e2e.test_ca_cli import TD, Served, ca, start_serve, stop

pytestmark = pytest.mark.e2e


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    ca("init", "--dir", str(d), "--trust-domain", TD)
    return d


def _csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _sign(served: Served, ca_dir: Path, body: dict) -> tuple[int, dict, bytes]:
    """POST /v1/sign on a new TLS connection: status, JSON answer, the server's certificate."""
    ctx = ssl.create_default_context(cafile=str(ca_dir / "bundle.pem"))
    conn = http.client.HTTPSConnection("127.0.0.1", served.port, context=ctx, timeout=20)
    try:
        conn.request("POST", "/v1/sign", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        der = conn.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        return resp.status, json.loads(resp.read()), der
    finally:
        conn.close()


def _workers(served: Served, n: int) -> list[int]:
    """The workers' pids from ca.ready (start_serve read it)."""
    assert len(served.ready["workers"]) == n
    return list(served.ready["workers"])


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.fixture
def workers(ca_dir: Path) -> Iterator[tuple[Served, list[int]]]:
    s = start_serve(ca_dir, "--workers", "3")
    try:
        pids = _workers(s, 2)
        yield s, pids
    finally:
        # the workers first: they hold the stdout pipe open, which stop() closes
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if s.proc.poll() is None:
            os.kill(s.proc.pid, signal.SIGCONT)
        stop(s)


def test_every_worker_serves_the_socket(ca_dir: Path, workers: tuple[Served, list[int]]) -> None:
    served, pids = workers
    assert all(_ppid(pid) == served.proc.pid for pid in pids)
    everyone = [served.proc.pid, *pids]
    for serving in everyone:  # the others stopped: only `serving` can accept
        stopped = [p for p in everyone if p != serving]
        for p in stopped:
            os.kill(p, signal.SIGSTOP)
        try:
            token = ca(
                "token", "--dir", str(ca_dir), "--spiffe-id", f"spiffe://{TD}/svc/w{serving}"
            ).stdout.strip()
            status, answer, _ = _sign(served, ca_dir, {"csr": _csr(), "token": token})
            assert status == 200, answer
            assert answer["spiffe_id"] == f"spiffe://{TD}/svc/w{serving}"
        finally:
            for p in stopped:
                os.kill(p, signal.SIGCONT)


def test_token_uses_hold_across_workers(ca_dir: Path, workers: tuple[Served, list[int]]) -> None:
    served, _ = workers
    token = ca(
        "token", "--dir", str(ca_dir), "--spiffe-id", f"spiffe://{TD}/svc/api", "--uses", "12"
    ).stdout.strip()
    bodies = [{"csr": _csr(), "token": token} for _ in range(30)]
    with ThreadPoolExecutor(15) as pool:
        results = list(pool.map(lambda b: _sign(served, ca_dir, b), bodies))
    ok = [a for s, a, _ in results if s == 200]
    refused = [a for s, a, _ in results if s != 200]
    assert len(ok) == 12
    # 18 failures from one source: a process's failed-authentication throttle may answer some
    assert "token_used_up" in {a["error"] for a in refused}
    assert {a["error"] for a in refused} <= {"token_used_up", "rate_limited"}
    serials = {a["serial"] for a in ok}
    assert len(serials) == 12
    with sqlite3.connect(ca_dir / "ca.db") as db:
        recorded = {r[0] for r in db.execute("SELECT serial FROM certificates")}
        (uses_left,) = db.execute("SELECT uses_left FROM tokens").fetchone()
    assert serials <= recorded
    assert uses_left == 0


def test_intermediate_renewal_reaches_the_workers(
    ca_dir: Path, workers: tuple[Served, list[int]]
) -> None:
    served, pids = workers

    def issuer_of(der: bytes) -> x509.Name:
        return x509.load_der_x509_certificate(der).issuer

    token = ca(
        "token", "--dir", str(ca_dir), "--spiffe-id", f"spiffe://{TD}/svc/api", "--uses", "9"
    )
    tok = token.stdout.strip()
    status, _, der = _sign(served, ca_dir, {"csr": _csr(), "token": tok})
    assert status == 200
    old_kid = (
        x509.load_der_x509_certificate(der)
        .extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        .value.key_identifier
    )
    ca("renew-intermediate", "--dir", str(ca_dir))
    # the parent re-issues the API certificate on its next connection ...
    os.kill(pids[0], signal.SIGSTOP)
    os.kill(pids[1], signal.SIGSTOP)
    try:
        status, answer, der = _sign(served, ca_dir, {"csr": _csr(), "token": tok})
    finally:
        os.kill(pids[0], signal.SIGCONT)
        os.kill(pids[1], signal.SIGCONT)
    assert status == 200, answer

    def aki(der: bytes) -> bytes | None:
        ext = x509.load_der_x509_certificate(der).extensions
        return ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier

    new_kid = aki(der)
    assert new_kid != old_kid
    # ... and each worker serves it (and signs with the new intermediate) once it changed
    for serving in pids:
        others = [p for p in (served.proc.pid, *pids) if p != serving]
        for p in others:
            os.kill(p, signal.SIGSTOP)
        try:
            status, answer, der = _sign(served, ca_dir, {"csr": _csr(), "token": tok})
        finally:
            for p in others:
                os.kill(p, signal.SIGCONT)
        assert status == 200, answer
        assert aki(der) == new_kid
        leaf = x509.load_pem_x509_certificate(answer["certificate"].encode())
        assert (
            leaf.extensions.get_extension_for_class(
                x509.AuthorityKeyIdentifier
            ).value.key_identifier
            == new_kid
        )
        assert issuer_of(der) == leaf.issuer


def test_sigterm_stops_every_worker(ca_dir: Path) -> None:
    served = start_serve(ca_dir, "--workers", "2")
    try:
        (pid,) = _workers(served, 1)
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=20) == 0
        events = [served.next_line()]
        while events[-1]["event"] != "ca.stopped":
            events.append(served.next_line())
        assert {"event": "ca.worker_exited", "pid": pid, "status": 0} in events
        assert {"worker": 1, "event": "ca.drained", "cut_off": 0} in events
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with (
            pytest.raises(OSError),
            socket.create_connection(("127.0.0.1", served.port), timeout=2),
        ):
            pass
    finally:
        stop(served)


def test_workers_config_errors(ca_dir: Path) -> None:
    for args, message in (
        (("--workers", "0"), "--workers must be between 1 and 64"),
        (
            ("--workers", "2", "--backend", "vault", "--vault-addr", "https://127.0.0.1:1"),
            "needs --backend builtin",
        ),
    ):
        out = ca("serve", "--dir", str(ca_dir), "--listen", "127.0.0.1:0", *args, check=False)
        assert out.returncode == 1
        assert message in out.stderr, out.stderr


def _gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return True  # exited, not yet reaped by its parent
        time.sleep(0.05)
    return False


def test_a_signal_sent_to_every_process_drains_once(
    ca_dir: Path, workers: tuple[Served, list[int]]
) -> None:
    """As a terminal's ^C or systemd's SIGTERM do: every process gets the signal. The workers
    ignore it (they stop when the parent says), so it counts once: a drain, not an exit."""
    served, pids = workers
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    token = ca("token", "--dir", str(ca_dir), "--spiffe-id", f"spiffe://{TD}/svc/api")
    os.kill(served.proc.pid, signal.SIGSTOP)
    try:  # only the workers can accept: they are still serving
        status, _, _ = _sign(served, ca_dir, {"csr": _csr(), "token": token.stdout.strip()})
    finally:
        os.kill(served.proc.pid, signal.SIGCONT)
    assert status == 200
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=20) == 0
    events = [served.next_line()]
    while events[-1]["event"] != "ca.stopped":
        events.append(served.next_line())
    names = [e["event"] for e in events]
    assert "ca.exiting" not in names
    assert names.count("ca.drained") == 3


def test_workers_end_when_the_parent_is_killed(
    ca_dir: Path, workers: tuple[Served, list[int]]
) -> None:
    served, pids = workers
    served.proc.kill()
    served.proc.wait(timeout=10)
    assert all(_gone(pid) for pid in pids)
