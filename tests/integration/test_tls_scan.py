"""testssl.sh (Debian `testssl.sh`, installed by .ci/run) scans the real edge listener and the
real mesh inbound; the test fails on anything outside the profile (issue 10 item 9).

- edge (Mozilla "intermediate"): TLS 1.2 and 1.3 only, TLS 1.2 ciphers from Mozilla's list,
  the three TLS 1.3 AEAD suites, groups exactly X25519, P-256, P-384;
- mesh inbound (Mozilla "modern"): TLS 1.3 only, same suites and groups. testssl presents no
  client certificate: the server has chosen protocol, suite and group (ServerHello) before
  it asks for one, so the scanner still sees every handshake parameter.

testssl's "no server cipher order" finding is expected: both profiles let the client choose.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from meshcar.edge.listener import INTERMEDIATE_CIPHERS
from tests.integration.conftest import sid, start_node
from tests.integration.edge_fixtures import start_edge, terminate_route
from tests.support.echo_app import serve_echo
from tests.support.pki import ThrowawayCA

pytestmark = pytest.mark.skipif(
    shutil.which("testssl") is None, reason="testssl.sh is not installed"
)

TLS13_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
GROUPS = {"X25519", "prime256v1", "secp384r1"}


async def run_testssl(tmp: Path, target: str) -> dict[str, str]:
    """id -> finding for one scan: protocols, forward secrecy (groups), ciphers per protocol."""
    out = tmp / f"scan-{target.replace(':', '_')}.json"
    with trio.fail_after(300):
        r = await trio.run_process(
            [
                "testssl",
                "--quiet",
                "--warnings",
                "off",
                "--color",
                "0",
                "--ip",
                "127.0.0.1",
                "--jsonfile",
                str(out),
                "-p",
                "-f",
                "-E",
                target,
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert out.exists(), r.stdout.decode()[-2000:] + r.stderr.decode()[-2000:]
    findings: list[dict[str, Any]] = json.loads(out.read_text())
    return {f["id"]: f["finding"] for f in findings}


def offered(findings: dict[str, str], prefix: str) -> set[str]:
    """Cipher names (OpenSSL spelling) testssl found for one protocol (`cipher-tls1_2_`...)."""
    names = set()
    for key, finding in findings.items():
        if key.startswith(prefix):
            names.add(finding.split()[3])  # "TLS 1.2   xc02c   ECDHE-ECDSA-AES256-GCM-SHA384 ..."
    return names


def protocols(findings: dict[str, str]) -> dict[str, bool]:
    return {
        p: findings[p].startswith("offered")
        for p in ("SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3")
    }


async def test_edge_is_mozilla_intermediate(tmp_path: Path, nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    ca.issue_cert("www.test").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "site.pem")
    )
    echo = await serve_echo(nursery)
    edge = await start_edge(nursery, tmp_path, [terminate_route("www.test", echo)])
    f = await run_testssl(tmp_path, f"www.test:{edge.https}")
    assert protocols(f) == {
        "SSLv2": False,
        "SSLv3": False,
        "TLS1": False,
        "TLS1_1": False,
        "TLS1_2": True,
        "TLS1_3": True,
    }, f
    tls12 = offered(f, "cipher-tls1_2_")
    assert tls12 and tls12 <= set(INTERMEDIATE_CIPHERS.split(":")), tls12
    tls13 = offered(f, "cipher-tls1_3_")
    assert tls13 and tls13 <= TLS13_SUITES, tls13
    assert not offered(f, "cipher-tls1_") - tls12 - tls13  # nothing for TLS 1.0/1.1 either
    assert set(f["PFS_ECDHE_curves"].split()) == GROUPS, f["PFS_ECDHE_curves"]
    await edge.aclose()


async def test_mesh_inbound_is_mozilla_modern(tmp_path: Path, nursery: trio.Nursery) -> None:
    ca = ThrowawayCA.create()
    app = await serve_echo(nursery)
    node = await start_node(nursery, tmp_path, ca, "api", app, [sid("web")], {})
    f = await run_testssl(tmp_path, f"api.test:{node.inbound_port}")
    assert protocols(f) == {
        "SSLv2": False,
        "SSLv3": False,
        "TLS1": False,
        "TLS1_1": False,
        "TLS1_2": False,
        "TLS1_3": True,
    }, f
    assert not offered(f, "cipher-tls1_2_")
    tls13 = offered(f, "cipher-tls1_3_")
    assert tls13 and tls13 <= TLS13_SUITES, tls13
    assert set(f["PFS_ECDHE_curves"].split()) == GROUPS, f["PFS_ECDHE_curves"]
    await node.inbound.aclose()
