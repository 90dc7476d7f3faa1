"""The mesh checks of `meshcar demo --check` fail when the mesh is absent or leaky.

A check that cannot fail is not a check: here the scenario's ports point at nothing, or at a
plain demo app standing in for a sidecar that forwards everything untouched.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshcar.demo import grpcwire
from meshcar.demo import scenario as sc
from meshcar.demo.app import AppConfig, DemoServer, quote
from meshcar.demo.checks import (
    CheckFailed,
    DemoEnv,
    Status,
    check_db,
    check_grpc,
    check_xfcc_replaced,
    mesh_checks,
    run_checks,
)
from meshcar.demo.ledgerdb import LedgerServer
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
            ledger_port=next(it) if s.ledger_port else None,
            db_upstreams=tuple((peer, next(it)) for peer, _ in s.db_upstreams),
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
    return DemoEnv(relocated(free_ports(16)), DemoPaths(tmp_path), certs)


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


@pytest.fixture
def leaky_ledger_tunnels(env: DemoEnv) -> Iterator[DemoEnv]:
    """Both 'sidecars'' ledger tunnels reach a ledger: no allow list in between (issue 13)."""
    api, web = env.scenario.service("api"), env.scenario.service("web")
    api_port, web_port = dict(api.db_upstreams)["payments"], dict(web.db_upstreams)["payments"]
    ledgers = [LedgerServer("127.0.0.1", port) for port in (api_port, web_port)]
    http = [
        DemoServer(
            AppConfig(
                "api",
                "127.0.0.1",
                api.app_port,
                None,
                None,
                dbs=(("payments", "127.0.0.1", api_port),),
            )
        ),
        # payments' "sidecar admin": answers /metrics with no TCP denial counted
        DemoServer(
            AppConfig("x", "127.0.0.1", env.scenario.service("payments").admin_port, None, None)
        ),
    ]
    threads = [
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05})
        for s in (*ledgers, *http)
    ]
    for t in threads:
        t.start()
    try:
        yield env
    finally:
        for s in (*ledgers, *http):
            s.shutdown()
            s.server_close()
        for t in threads:
            t.join()


def test_a_ledger_reachable_by_web_is_caught(leaky_ledger_tunnels: DemoEnv) -> None:
    with pytest.raises(CheckFailed, match="web reached payments' ledger"):
        check_db(leaky_ledger_tunnels)


def _as_api(path: str, headers: dict[str, str], message: bytes) -> tuple[int, str, object]:
    """payments' Quote, but it always says it saw api (a transparent 'sidecar' adds none)."""
    return quote(path, {"x-forwarded-client-cert": f"URI={sc.spiffe_id('api')}"}, message)


@pytest.fixture
def grpc_without_allow_list(env: DemoEnv) -> Iterator[DemoEnv]:
    """api's and web's 'sidecar outbounds' are plain h2c Quote servers: no allow list."""
    api, web = env.scenario.service("api"), env.scenario.service("web")
    listeners = [socket.create_server(("127.0.0.1", s.outbound_port)) for s in (api, web)]

    def serve(lsock: socket.socket) -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            with conn:
                grpcwire.serve_h2c(conn, _as_api)

    app = DemoServer(
        AppConfig("api", "127.0.0.1", api.app_port, f"http://127.0.0.1:{api.outbound_port}", None)
    )
    threads = [threading.Thread(target=serve, args=(ls,), daemon=True) for ls in listeners]
    threads.append(threading.Thread(target=app.serve_forever, kwargs={"poll_interval": 0.05}))
    for t in threads:
        t.start()
    try:
        yield env
    finally:
        app.shutdown()
        app.server_close()
        for ls in listeners:
            ls.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone would not)
            ls.close()
        for t in threads:
            t.join()


def test_grpc_that_web_may_call_is_caught(grpc_without_allow_list: DemoEnv) -> None:
    with pytest.raises(CheckFailed, match="web -> payments gRPC: grpc-status 0"):
        check_grpc(grpc_without_allow_list)
