"""End-to-end tests of `meshcar ca init|token|serve` as real processes, driven with curl and
openssl exactly as an operator would."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509

pytestmark = pytest.mark.e2e

MESHCAR = str(Path(sys.executable).parent / "meshcar")
TD = "meshcar.test"
API = f"spiffe://{TD}/svc/api"


def run(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=30, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    return proc


def ca(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(MESHCAR, "ca", *args, check=check)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    out = ca("init", "--dir", str(d), "--trust-domain", TD)
    assert json.loads(out.stdout)["event"] == "ca.init"
    return d


@dataclass
class Served:
    proc: subprocess.Popen[str]
    port: int
    lines: queue.Queue[str]
    ready: dict = field(default_factory=dict)  # the ca.ready line

    def next_line(self, timeout: float = 10) -> dict:
        return json.loads(self.lines.get(timeout=timeout))


def start_serve(ca_dir: Path, *extra: str) -> Served:
    proc = subprocess.Popen(
        [MESHCAR, "ca", "serve", "--dir", str(ca_dir), "--listen", "127.0.0.1:0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lines.put(line)
        except ValueError:  # stop() closed the pipe while this read it
            pass

    threading.Thread(target=pump, daemon=True).start()
    try:
        ready = json.loads(lines.get(timeout=15))
    except queue.Empty:
        proc.kill()
        raise AssertionError(f"no ready line; stderr: {proc.communicate()[1]}") from None
    assert ready["event"] == "ca.ready"
    host, _, port = ready["listen"].rpartition(":")
    assert host == "127.0.0.1"
    return Served(proc, int(port), lines, ready)


def stop(served: Served) -> None:
    if served.proc.poll() is None:
        served.proc.kill()
    served.proc.wait(timeout=10)
    for f in (served.proc.stdout, served.proc.stderr):
        if f:
            f.close()


@pytest.fixture
def served(ca_dir: Path) -> Iterator[Served]:
    s = start_serve(ca_dir, "--san", "ca.meshcar.test")
    try:
        yield s
    finally:
        stop(s)


def curl(
    served: Served, ca_dir: Path, path: str, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return run(
        "curl",
        "-sS",
        "--max-time",
        "10",
        "--cacert",
        str(ca_dir / "root.pem"),
        *args,
        f"https://127.0.0.1:{served.port}{path}",
        check=check,
    )


def test_init_files_and_modes(ca_dir: Path) -> None:
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in ca_dir.iterdir()}
    assert modes == {
        "root.pem": 0o644,
        "root.key": 0o600,
        "intermediate.pem": 0o644,
        "intermediate.key": 0o600,
        "bundle.pem": 0o644,
        "server.pem": 0o644,
        "server.key": 0o600,
        "ca.db": 0o600,
        "config.json": 0o644,
    }
    assert json.loads((ca_dir / "config.json").read_text()) == {
        "trust_domain": TD,
        "max_ttl_seconds": 86400,
        "bundle_version": 1,
    }
    run("openssl", "verify", "-CAfile", str(ca_dir / "root.pem"), str(ca_dir / "intermediate.pem"))


def test_init_refuses_to_overwrite_without_force(ca_dir: Path) -> None:
    before = {p.name: p.read_bytes() for p in ca_dir.iterdir()}
    out = ca("init", "--dir", str(ca_dir), "--trust-domain", TD, check=False)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "--force" in out.stderr
    assert {p.name: p.read_bytes() for p in ca_dir.iterdir()} == before
    ca("init", "--dir", str(ca_dir), "--trust-domain", TD, "--force", "--max-ttl", "2h")
    assert (ca_dir / "root.pem").read_bytes() != before["root.pem"]
    assert json.loads((ca_dir / "config.json").read_text())["max_ttl_seconds"] == 7200


@pytest.mark.parametrize(
    "args",
    [("--trust-domain", "Bad Domain"), ("--trust-domain", TD, "--max-ttl", "forever")],
)
def test_init_config_errors_are_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    out = ca("init", "--dir", str(tmp_path / "x"), *args, check=False)
    assert (
        out.returncode == 1
        and out.stderr.startswith("meshcar ca init: ")
        and out.stderr.count("\n") == 1
    )
    assert not (tmp_path / "x").exists()


def test_token_cli(ca_dir: Path) -> None:
    out = ca("token", "--dir", str(ca_dir), "--spiffe-id", API, "--ttl", "1h", "--uses", "3")
    token = out.stdout.strip()
    assert out.stdout == token + "\n" and len(token) >= 43
    assert token.encode() not in (ca_dir / "ca.db").read_bytes()
    for args in (
        ("--spiffe-id", "spiffe://other.test/svc/api"),
        ("--spiffe-id", API, "--ttl", "x"),
        ("--spiffe-id", API, "--uses", "0"),
    ):
        bad = ca("token", "--dir", str(ca_dir), *args, check=False)
        assert bad.returncode == 1 and bad.stdout == "" and bad.stderr.count("\n") == 1
    missing = ca("token", "--dir", str(ca_dir.parent / "nope"), "--spiffe-id", API, check=False)
    assert missing.returncode == 1 and "meshcar ca init" in missing.stderr


def test_serve_config_errors(ca_dir: Path, tmp_path: Path) -> None:
    out = ca("serve", "--dir", str(tmp_path / "nope"), "--listen", "127.0.0.1:0", check=False)
    assert out.returncode == 1 and "not a CA directory" in out.stderr
    out = ca("serve", "--dir", str(ca_dir), "--listen", "nonsense", check=False)
    assert out.returncode == 1 and "HOST:PORT" in out.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = ca("serve", "--dir", str(ca_dir), "--listen", f"127.0.0.1:{port}", check=False)
    assert out.returncode == 1 and "cannot listen" in out.stderr and out.stderr.count("\n") == 1


def test_serve_sign_renew_with_curl_and_openssl(
    served: Served, ca_dir: Path, tmp_path: Path
) -> None:
    assert json.loads(curl(served, ca_dir, "/healthz").stdout) == {"status": "ok"}
    bundle = curl(served, ca_dir, "/v1/bundle", "-i").stdout
    assert "x-meshcar-bundle-version: 1" in bundle.lower()

    # the API certificate: chain of two, verified against the root, with the --san name
    s_client = run(
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{served.port}",
        "-CAfile",
        str(ca_dir / "root.pem"),
        "-showcerts",
        "-verify_return_error",
        input="",
    )
    assert s_client.stdout.count("-----BEGIN CERTIFICATE-----") == 2
    assert "Verify return code: 0 (ok)" in s_client.stdout
    server = x509.load_pem_x509_certificate((ca_dir / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "ca.meshcar.test" in names.get_values_for_type(x509.DNSName)

    # a workload: key + CSR that asks for another identity; the token decides
    key, csr = tmp_path / "w.key", tmp_path / "w.csr"
    run(
        "openssl",
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        str(key),
    )
    run(
        "openssl",
        "req",
        "-new",
        "-key",
        str(key),
        "-subj",
        "/CN=svc-admin",
        "-addext",
        f"subjectAltName=URI:spiffe://{TD}/svc/admin",
        "-out",
        str(csr),
    )
    token = ca("token", "--dir", str(ca_dir), "--spiffe-id", API).stdout.strip()
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"csr": csr.read_text(), "token": token}))
    out = curl(
        served,
        ca_dir,
        "/v1/sign",
        "--fail-with-body",
        "-H",
        "content-type: application/json",
        "--data-binary",
        f"@{body}",
    )
    issued = json.loads(out.stdout)
    assert issued["spiffe_id"] == API
    chain = tmp_path / "chain.pem"
    chain.write_text(issued["chain"])
    (tmp_path / "leaf.pem").write_text(issued["certificate"])
    run(
        "openssl",
        "verify",
        "-CAfile",
        str(ca_dir / "root.pem"),
        "-untrusted",
        str(chain),
        str(tmp_path / "leaf.pem"),
    )
    text = run("openssl", "x509", "-in", str(tmp_path / "leaf.pem"), "-noout", "-text").stdout
    assert f"URI:{API}" in text and "svc/admin" not in text and "CA:FALSE" in text

    # the same token again: used up
    again = curl(
        served,
        ca_dir,
        "/v1/sign",
        "-H",
        "content-type: application/json",
        "--data-binary",
        f"@{body}",
        "-w",
        "\n%{http_code}",
    )
    assert again.stdout.endswith("\n401") and '"token_used_up"' in again.stdout

    # renewal over mTLS with the issued certificate, no token
    body.write_text(json.dumps({"csr": csr.read_text()}))
    out = curl(
        served,
        ca_dir,
        "/v1/sign",
        "--fail-with-body",
        "--cert",
        str(chain),
        "--key",
        str(key),
        "-H",
        "content-type: application/json",
        "--data-binary",
        f"@{body}",
    )
    renewed = json.loads(out.stdout)
    assert renewed["spiffe_id"] == API and renewed["serial"] != issued["serial"]

    # garbage on the socket does not hurt the process
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as s:
        s.sendall(b"\x00" * 100 + b"GET / HTTP/1.1\r\n\r\n")
        try:
            s.recv(100)
        except OSError:
            pass
    assert json.loads(curl(served, ca_dir, "/healthz").stdout) == {"status": "ok"}

    # one JSON line per request, never the token; SIGTERM stops cleanly
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=10) == 0
    records = []
    while not served.lines.empty():
        records.append(served.next_line())
    assert records[-1]["event"] == "ca.stopped"
    requests = [r for r in records if r["event"] == "ca.request"]
    assert [r["status"] for r in requests if r["path"] == "/v1/sign"] == [200, 401, 200]
    assert [r.get("auth") for r in requests if r["path"] == "/v1/sign"] == [
        "token",
        None,
        "renewal",
    ]
    assert token not in json.dumps(records)
    assert os.path.exists(ca_dir / "ca.db")


def test_serve_with_k8s_jwks(ca_dir: Path, tmp_path: Path) -> None:
    import time

    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    signing_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(signing_key.public_key()))
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256"}]}))
    issuer = "https://kubernetes.default.svc"

    bad = ca(
        "serve",
        "--dir",
        str(ca_dir),
        "--listen",
        "127.0.0.1:0",
        "--k8s-issuer",
        issuer,
        check=False,
    )
    assert bad.returncode == 1 and "--k8s-jwks" in bad.stderr and bad.stderr.count("\n") == 1

    served = start_serve(ca_dir, "--k8s-issuer", issuer, "--k8s-jwks", str(jwks_file))
    try:
        now = int(time.time())
        token = jwt.encode(
            {
                "iss": issuer,
                "aud": ["meshcar-ca"],
                "exp": now + 600,
                "iat": now,
                "sub": "system:serviceaccount:shop:api",
                "kubernetes.io": {
                    "namespace": "shop",
                    "serviceaccount": {"name": "api", "uid": "u"},
                },
            },
            signing_key,
            algorithm="ES256",
            headers={"kid": "k1"},
        )
        key, csr = tmp_path / "w.key", tmp_path / "w.csr"
        run(
            "openssl",
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            str(key),
        )
        run("openssl", "req", "-new", "-key", str(key), "-subj", "/CN=x", "-out", str(csr))
        body = tmp_path / "body.json"
        body.write_text(json.dumps({"csr": csr.read_text(), "k8s_token": token}))
        out = curl(served, ca_dir, "/v1/sign", "--fail-with-body", "--data-binary", f"@{body}")
        assert json.loads(out.stdout)["spiffe_id"] == f"spiffe://{TD}/ns/shop/sa/api"
    finally:
        stop(served)
