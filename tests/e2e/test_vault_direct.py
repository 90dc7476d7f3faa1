"""Sidecars issuing directly from OpenBao (`identity.vault`), no meshcar CA in between:
a real `bao server -dev` configured by deploy/vault/setup.sh, per-workload AppRoles."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import Procs, free_port
from tests.e2e.test_vault_e2e import TD, OpenBao, openbao  # noqa: F401 - the OpenBao fixture

pytestmark = pytest.mark.e2e


def sid(n: str) -> str:
    return f"spiffe://{TD}/svc/{n}"


def config(
    d: Path,
    bao: OpenBao,
    name: str,
    approle: str,
    ports: dict[str, int],
    allow: list[str],
    upstreams: dict,
) -> Path:
    cfg = {
        "identity": {
            "spiffe_id": sid(name),
            "state_dir": str(d / f"{name}-{approle}-state"),
            "ttl_seconds": 60,
            "vault": {
                "addr": bao.addr,
                "role": approle,
                "approle_role_id_file": str(bao.out / f"{approle}.role-id"),
                "approle_secret_id_file": str(bao.out / f"{approle}.secret-id"),
            },
        },
        "app": {"port": ports[f"{name}_app"]},
        "inbound": {"listen": f"127.0.0.1:{ports[f'{name}_in']}", "allow": allow},
        "outbound": {"listen": f"127.0.0.1:{ports[f'{name}_out']}", "upstreams": upstreams},
        "admin": {"listen": f"127.0.0.1:{ports[f'{name}_admin']}"},
    }
    path = d / f"{name}-{approle}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_sidecars_get_certificates_from_openbao_and_talk(openbao: OpenBao, tmp_path: Path) -> None:  # noqa: F811
    ports = {
        f"{n}_{k}": free_port()
        for n in ("web", "api", "evil")
        for k in ("app", "in", "out", "admin")
    }
    procs = Procs(tmp_path)
    try:
        procs.start("api-app", "demo-app", "--name", "api", "--port", str(ports["api_app"]))
        procs.start(
            "api",
            "sidecar",
            "--config",
            str(config(tmp_path, openbao, "api", "meshcar-svc-api", ports, [sid("web")], {})),
        )
        procs.start(
            "web",
            "sidecar",
            "--config",
            str(
                config(
                    tmp_path,
                    openbao,
                    "web",
                    "meshcar-svc-web",
                    ports,
                    [],
                    {
                        "api": {
                            "endpoints": [f"127.0.0.1:{ports['api_in']}"],
                            "spiffe_id": sid("api"),
                        }
                    },
                )
            ),
        )
        # web's AppRole asking for api's identity: OpenBao's role refuses, no certificate
        ports["evil_admin"] = free_port()
        evil = config(
            tmp_path,
            openbao,
            "api",
            "meshcar-svc-web",
            {**ports, "api_in": ports["evil_in"], "api_admin": ports["evil_admin"]},
            [],
            {},
        )
        procs.start("evil", "sidecar", "--config", str(evil))
        for n in ("api", "web"):
            procs.wait_http(f"http://127.0.0.1:{ports[f'{n}_admin']}/ready", name=n)
        certs = httpx.get(f"http://127.0.0.1:{ports['web_admin']}/certs").json()
        assert certs["spiffe_id"] == sid("web")
        r = httpx.get(
            "http://api/v1/hello", proxy=f"http://127.0.0.1:{ports['web_out']}", timeout=10
        )
        assert r.status_code == 200 and r.json()["peer"] == sid("web")
        from cryptography import x509

        bundle = x509.load_pem_x509_certificates(
            (tmp_path / "web-meshcar-svc-web-state" / "bundle.pem").read_bytes()
        )
        assert bundle == x509.load_pem_x509_certificates(
            (openbao.out / "vault-root.pem").read_bytes()
        )
        # renewal goes to OpenBao again (AppRole), not to a token
        renewed = httpx.post(f"http://127.0.0.1:{ports['web_admin']}/renew", timeout=30).json()
        assert renewed["renewed"] and renewed["serial"] != certs["serial"]
        deadline = time.monotonic() + 10
        while "Vault refused" not in procs.log("evil"):
            assert time.monotonic() < deadline, procs.log("evil")[-2000:]
            time.sleep(0.05)
        assert "not valid for this role" in procs.log("evil")
        assert httpx.get(f"http://127.0.0.1:{ports['evil_admin']}/ready").status_code == 503
    finally:
        procs.stop_all()
