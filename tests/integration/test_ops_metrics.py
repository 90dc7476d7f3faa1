"""Operations metrics (issue 15): process metrics, requests by upstream and by calling peer
with bounded label values, certificate expiry and issuance outcomes by identity."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import httpx
import trio

from meshcar.admin.metrics import MAX_LABEL_VALUES, Metrics
from meshcar.sidecar.main import Sidecar
from meshcar.tls.store import CredentialStore
from tests.integration.conftest import Mesh, make_cfg, sid
from tests.support.pki import ThrowawayCA
from tests.support.ports import free_ports


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_process_and_peer_metrics_of_a_sidecar_pair(mesh: Mesh) -> None:
    proxy = f"http://127.0.0.1:{mesh.client.outbound_port}"
    async with httpx.AsyncClient(proxy=proxy, timeout=10) as c:
        assert (await c.get("http://api/a")).status_code == 200
        assert (await c.get("http://api/status/503")).status_code == 503
    client = mesh.client.metrics.render().decode()
    server = mesh.server.metrics.render().decode()
    for text in (client, server):
        assert (_sample(text, "process_resident_memory_bytes") or 0) > 1e6
        assert _sample(text, "process_open_fds") is not None
        assert _sample(text, "process_cpu_seconds_total") is not None
        assert _sample(text, "python_info") == 1
    labels = {"direction": "outbound", "peer": "api"}
    assert _sample(client, "meshcar_peer_requests_total", code="2xx", **labels) == 1
    assert _sample(client, "meshcar_peer_requests_total", code="5xx", **labels) == 1
    inbound = {"direction": "inbound", "peer": sid("web")}
    assert _sample(server, "meshcar_peer_requests_total", code="2xx", **inbound) == 1


def test_peer_labels_are_bounded() -> None:
    m = Metrics()
    for i in range(MAX_LABEL_VALUES + 50):
        m.observe_peer("outbound", f"host-{i}", 200)
    text = m.render().decode()
    peers = set(re.findall(r'meshcar_peer_requests_total\{[^}]*peer="([^"]+)"', text))
    assert len(peers) == MAX_LABEL_VALUES + 1 and "other" in peers
    assert _sample(text, "meshcar_peer_requests_total", peer="other") == 50
    m.observe_peer("outbound", "host-3", 200)  # one seen before keeps its own label
    assert _sample(m.render().decode(), "meshcar_peer_requests_total", peer="host-3") == 2


async def test_certificate_expiry_and_outcomes_by_identity(tmp_path: Path) -> None:
    ca = ThrowawayCA.create()
    cfg = make_cfg(tmp_path, "web", 1, [], {})
    CredentialStore(cfg.identity.state_dir).install(ca.credential(sid("web")))
    sidecar = Sidecar(cfg)
    assert _sample(sidecar.metrics.render().decode(), "meshcar_certificate_expiry_seconds") is None
    await sidecar.rotator.bootstrap()  # the certificate held in the state dir
    left = _sample(
        sidecar.metrics.render().decode(),
        "meshcar_certificate_expiry_seconds",
        identity=sid("web"),
    )
    assert left is not None and 3500 < left <= 3600  # a one-hour leaf, just issued


async def test_failed_bootstrap_is_counted_for_the_identity(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    (closed,) = free_ports(1)
    token, bundle = tmp_path / "token", tmp_path / "ca.pem"
    token.write_text("t")
    bundle.write_text(ThrowawayCA.create().bundle_pem)
    cfg = make_cfg(tmp_path, "web", 1, [], {})
    ident = dataclasses.replace(
        cfg.identity, ca_url=f"https://127.0.0.1:{closed}", token_file=token, ca_bundle=bundle
    )
    sidecar = Sidecar(dataclasses.replace(cfg, identity=ident))
    nursery.start_soon(sidecar.rotator.bootstrap)
    name = "meshcar_identity_renewals_total"
    with trio.fail_after(10):
        while _sample(sidecar.metrics.render().decode(), name) is None:
            await trio.sleep(0.01)  # until the first attempt has failed
    text = sidecar.metrics.render().decode()
    assert _sample(text, name, identity=sid("web"), outcome="bootstrap_failure") == 1
    nursery.cancel_scope.cancel()
