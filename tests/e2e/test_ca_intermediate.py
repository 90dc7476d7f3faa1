"""A real CA process renews its intermediate (`meshcar ca renew-intermediate`) while a real
sidecar pair talks: no restart, no bundle change; leaves from the old and the new
intermediate verify against the same bundle and talk to each other; the CA's /metrics
reports the intermediate's remaining life."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.e2e.procs import Procs, meshcar_cmd
from tests.e2e.test_sidecar_e2e import _sidecar_cfg, curl, init_pair_dir, sid

pytestmark = pytest.mark.e2e


def _issuer_kid(chain: Path) -> str:
    certs = x509.load_pem_x509_certificates(chain.read_bytes())
    return certs[1].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def _openssl_verify(bundle: Path, chain: Path, tmp: Path) -> None:
    leaf, inter = x509.load_pem_x509_certificates(chain.read_bytes())[:2]
    from cryptography.hazmat.primitives.serialization import Encoding

    (tmp / "v-leaf.pem").write_bytes(leaf.public_bytes(Encoding.PEM))
    (tmp / "v-inter.pem").write_bytes(inter.public_bytes(Encoding.PEM))
    r = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(bundle),
            "-untrusted",
            str(tmp / "v-inter.pem"),
            "-purpose",
            "any",
            str(tmp / "v-leaf.pem"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_renew_intermediate_under_a_running_ca_and_pair(tmp_path: Path) -> None:
    d = tmp_path
    ports = init_pair_dir(d)
    ca_dir = d / "ca"
    procs = Procs(d)
    try:
        procs.start(
            "ca", "ca", "serve", "--dir", str(ca_dir), "--listen", f"127.0.0.1:{ports['ca']}"
        )
        ca_url = f"https://127.0.0.1:{ports['ca']}"
        root_ctx = ssl.create_default_context(cafile=str(ca_dir / "root.pem"))
        procs.wait_http(f"{ca_url}/healthz", verify=str(ca_dir / "root.pem"))
        api_cfg = _sidecar_cfg(d, "api", ports, [sid("web")], {})
        web_cfg = _sidecar_cfg(
            d,
            "web",
            ports,
            [],
            {"api": {"endpoints": [f"127.0.0.1:{ports['api_in']}"], "spiffe_id": sid("api")}},
        )
        procs.start("api-app", "demo-app", "--name", "api", "--port", str(ports["api_app"]))
        procs.start("api-sidecar", "sidecar", "--config", str(api_cfg))
        procs.start("web-sidecar", "sidecar", "--config", str(web_cfg))
        for n in ("api", "web"):
            procs.wait_http(f"http://127.0.0.1:{ports[f'{n}_admin']}/ready", name=f"{n}-sidecar")
        proxy = f"http://127.0.0.1:{ports['web_out']}"

        def get(path: str) -> str:
            return curl(
                "-x", proxy, "-o", "/dev/null", "-w", "%{http_code}", f"http://api{path}"
            ).stdout

        def renew(who: str) -> None:
            r = subprocess.run(
                meshcar_cmd("cert", "renew", "--admin", f"127.0.0.1:{ports[f'{who}_admin']}"),
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert r.returncode == 0 and json.loads(r.stdout)["renewed"], r.stdout + r.stderr

        assert get("/before") == "200"
        bundle_before = (ca_dir / "bundle.pem").read_bytes()
        old_kid = _issuer_kid(d / "web-state" / "chain.pem")
        metrics = httpx.get(f"{ca_url}/metrics", verify=root_ctx, timeout=5)
        assert metrics.status_code == 200
        assert re.search(
            r'^meshcar_ca_cert_expiry_seconds\{cert="intermediate",serial="[0-9a-f]+"\} \d+$',
            metrics.text,
            re.M,
        ), metrics.text

        r = subprocess.run(
            meshcar_cmd("ca", "renew-intermediate", "--dir", str(ca_dir)),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        new = json.loads(r.stdout)["intermediate"]
        assert new["key_id"] != old_kid
        assert (ca_dir / "bundle.pem").read_bytes() == bundle_before  # same roots, same version

        renew("web")  # web now holds a leaf of the new intermediate, api one of the old
        assert _issuer_kid(d / "web-state" / "chain.pem") == new["key_id"]
        assert _issuer_kid(d / "api-state" / "chain.pem") == old_kid
        assert get("/mixed") == "200"
        for n in ("web", "api"):
            _openssl_verify(ca_dir / "bundle.pem", d / f"{n}-state" / "chain.pem", tmp_path)
        renew("api")  # a leaf of the old intermediate renews over mTLS
        assert _issuer_kid(d / "api-state" / "chain.pem") == new["key_id"]
        assert get("/after") == "200"
        # the running CA picked it up: its API certificate and /metrics follow the new intermediate
        text = httpx.get(f"{ca_url}/metrics", verify=root_ctx, timeout=5).text
        assert f'cert="intermediate",serial="{new["serial"]}"' in text
        assert 'cert="accepted_intermediate"' in text
        api_chain = x509.load_pem_x509_certificates((ca_dir / "server.pem").read_bytes())
        assert api_chain[1].serial_number == int(new["serial"], 16)
        st = json.loads(
            subprocess.run(
                meshcar_cmd("ca", "status", "--dir", str(ca_dir)),
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert st["issuing_intermediate"]["key_id"] == new["key_id"] and st["bundle_version"] == 1
        assert all(p.poll() is None for _, p in procs.procs)
        for name in ("web-sidecar", "api-sidecar", "ca"):
            assert "Traceback" not in procs.log(name)
    finally:
        procs.stop_all()
