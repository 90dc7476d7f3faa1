"""A sidecar configured as `meshcar inject` renders it (projected token, inline CA bundle)
bootstraps from a real CA that verifies Kubernetes service-account tokens."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.e2e.procs import Procs, free_port, meshcar_cmd

pytestmark = pytest.mark.e2e
ISSUER = "https://kubernetes.default.svc"


def test_projected_token_bootstrap_and_bad_token(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    (tmp_path / "jwks.json").write_text(
        json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256"}]})
    )
    subprocess.run(
        meshcar_cmd("ca", "init", "--dir", str(tmp_path / "ca"), "--trust-domain", "meshcar.demo"),
        check=True,
        capture_output=True,
    )
    ports = {n: free_port() for n in ("ca", "in", "admin", "admin2")}
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": ["meshcar-ca"],
        "exp": now + 600,
        "iat": now,
        "nbf": now,
        "sub": "system:serviceaccount:shop:api",
        "kubernetes.io": {
            "namespace": "shop",
            "serviceaccount": {"name": "api", "uid": "u1"},
            "pod": {"name": "api-0", "uid": "u2"},
        },
    }
    (tmp_path / "token").write_text(
        jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1"})
    )
    other = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "forged").write_text(
        jwt.encode(claims, other, algorithm="ES256", headers={"kid": "k1"})
    )
    root_pem = (tmp_path / "ca" / "root.pem").read_text()

    def config(name: str, token: str, admin: int) -> str:
        return json.dumps(
            {
                "identity": {
                    "spiffe_id": "spiffe://meshcar.demo/ns/shop/sa/api",
                    "ca_url": f"https://127.0.0.1:{ports['ca']}",
                    "ca_bundle_pem": root_pem,
                    "k8s_token_file": str(tmp_path / token),
                    "state_dir": str(tmp_path / f"{name}-state"),
                },
                "app": {"port": 1},
                "inbound": {
                    "listen": f"127.0.0.1:{ports['in'] if name == 'good' else free_port()}"
                },
                "admin": {"listen": f"127.0.0.1:{admin}"},
            }
        )

    procs = Procs(tmp_path)
    try:
        procs.start(
            "ca",
            "ca",
            "serve",
            "--dir",
            str(tmp_path / "ca"),
            "--listen",
            f"127.0.0.1:{ports['ca']}",
            "--k8s-issuer",
            ISSUER,
            "--k8s-jwks",
            str(tmp_path / "jwks.json"),
        )
        procs.wait_http(
            f"https://127.0.0.1:{ports['ca']}/healthz", verify=str(tmp_path / "ca" / "root.pem")
        )
        procs.start(
            "good",
            "sidecar",
            "--config-env",
            "MESHCAR_CONFIG",
            env={"MESHCAR_CONFIG": config("good", "token", ports["admin"])},
        )
        procs.start(
            "forged",
            "sidecar",
            "--config-env",
            "MESHCAR_CONFIG",
            env={"MESHCAR_CONFIG": config("forged", "forged", ports["admin2"])},
        )
        procs.wait_http(f"http://127.0.0.1:{ports['admin']}/ready", name="good")
        certs = httpx.get(f"http://127.0.0.1:{ports['admin']}/certs").json()
        assert certs["spiffe_id"] == "spiffe://meshcar.demo/ns/shop/sa/api"
        # the forged token never yields a certificate: not ready, and the CA said why
        procs.wait_http(f"http://127.0.0.1:{ports['admin2']}/ready", status=503)
        deadline = time.monotonic() + 10
        while "bootstrap_failed" not in procs.log("forged") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "bad_k8s_token" in procs.log("forged") or "401" in procs.log("forged")
        assert httpx.get(f"http://127.0.0.1:{ports['admin2']}/ready").status_code == 503
    finally:
        procs.stop_all()


def test_config_needs_one_bundle_and_one_token(tmp_path: Path) -> None:
    from meshcar.errors import ConfigError
    from meshcar.sidecar.config import parse_config

    base = {
        "identity": {
            "spiffe_id": "spiffe://td/x",
            "ca_url": "https://ca:1",
            "state_dir": "s",
            "ca_bundle": "a.pem",
            "ca_bundle_pem": "-----BEGIN CERTIFICATE-----\n",
            "token_file": "t",
            "k8s_token_file": "k",
        },
        "app": {"port": 1},
        "inbound": {"listen": "127.0.0.1:2"},
        "admin": {"listen": "127.0.0.1:3"},
    }
    with pytest.raises(ConfigError) as err:
        parse_config(base, "c.yaml", tmp_path)
    text = str(err.value)
    assert "not both" in text and "identity.ca_bundle:" in text and "identity.token_file:" in text
    base["identity"].pop("ca_bundle")
    base["identity"].pop("token_file")
    base["identity"]["ca_bundle_pem"] = "not pem"
    with pytest.raises(ConfigError, match="identity.ca_bundle_pem: must contain a PEM certificate"):
        parse_config(base, "c.yaml", tmp_path)
