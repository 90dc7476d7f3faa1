"""The mesh checks of `meshcar demo --check` fail when the mesh is absent or leaky.

A check that cannot fail is not a check: here the scenario's ports point at nothing, or at a
plain demo app standing in for a sidecar that forwards everything untouched.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshcar.demo import scenario as sc
from meshcar.demo.app import AppConfig, DemoServer
from meshcar.demo.checks import (
    CheckFailed,
    DemoEnv,
    Status,
    check_xfcc_replaced,
    mesh_checks,
    run_checks,
)
from meshcar.demo.pki import ensure_public_pki
from meshcar.demo.plan import DemoPaths, PublicCerts
from tests.support.ports import free_ports


def relocated(ports: list[int]) -> sc.Scenario:
    """The demo scenario on other (free) ports, so nothing of a running demo is touched."""
    it = iter(ports)
    services = tuple(
        dataclasses.replace(
            s,
            app_port=next(it),
            inbound_port=next(it),
            outbound_port=next(it),
            admin_port=next(it),
            public_tls_port=next(it) if s.public_tls_port else None,
        )
        for s in sc.SCENARIO.services
    )
    return sc.Scenario(services, sc.SCENARIO.edge_routes)


@pytest.fixture
def env(tmp_path: Path) -> DemoEnv:
    pki = ensure_public_pki(tmp_path, payments_host=sc.PAYMENTS_PUBLIC_HOST, edge_hosts=("w",))
    (tmp_path / "mesh-bundle.pem").write_bytes(pki.edge_ca.read_bytes())
    certs = PublicCerts(
        pki.edge_ca,
        pki.partner_ca,
        pki.partner_cert,
        pki.partner_key,
        pki.payments_cert,
        pki.payments_key,
    )
    return DemoEnv(relocated(free_ports(13)), DemoPaths(tmp_path), certs)


def test_with_nothing_running_every_mesh_check_fails(env: DemoEnv) -> None:
    results = run_checks(mesh_checks(), env)
    assert [r.status for r in results] == [Status.FAIL] * len(mesh_checks()), results


@pytest.fixture
def transparent_web_sidecar(env: DemoEnv) -> Iterator[DemoEnv]:
    """web's 'sidecar' outbound is a plain app: it passes the forged XFCC straight through."""
    web = env.scenario.service("web")
    server = DemoServer(AppConfig("api", "127.0.0.1", web.outbound_port, None, None))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield env
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_forwarded_client_xfcc_is_caught(transparent_web_sidecar: DemoEnv) -> None:
    with pytest.raises(CheckFailed, match="the client-sent XFCC reached api"):
        check_xfcc_replaced(transparent_web_sidecar)
