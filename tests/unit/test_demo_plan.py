"""`meshcar demo`'s plan: sidecar configs and the process list come from meshcar/demo/scenario.py."""

from __future__ import annotations

from pathlib import Path

import yaml

from meshcar.demo import scenario as sc
from meshcar.demo.plan import (
    CA_URL,
    DemoPaths,
    PublicCerts,
    all_ports,
    ca_process,
    edge_processes,
    mesh_processes,
    scenario_ports,
    sidecar_config,
)
from meshcar.sidecar.config import parse_config

PATHS = DemoPaths(Path("/demo"))
CERTS = PublicCerts(
    *(
        Path(f"/demo/{n}")
        for n in (
            "edge-ca.pem",
            "partner-ca.pem",
            "partner.pem",
            "partner.key",
            "pay.pem",
            "pay.key",
        )
    )
)


def test_api_sidecar_config_matches_the_scenario() -> None:
    api = sc.SCENARIO.service("api")
    cfg = sidecar_config(sc.SCENARIO, api, PATHS)
    assert cfg["identity"]["spiffe_id"] == "spiffe://meshcar.demo/svc/api"
    assert cfg["identity"]["ca_url"] == f"https://127.0.0.1:{sc.CA_PORT}" == CA_URL
    assert cfg["identity"]["ca_bundle"] == "/demo/ca/root.pem"
    assert cfg["identity"]["token_file"] == "/demo/sidecars/api/join.token"
    assert cfg["identity"]["ttl_seconds"] == sc.CERT_TTL_SECONDS
    assert cfg["app"] == {"host": "127.0.0.1", "port": api.app_port}
    assert cfg["inbound"] == {
        "listen": f"127.0.0.1:{api.inbound_port}",
        "allow": ["spiffe://meshcar.demo/svc/edge", "spiffe://meshcar.demo/svc/web"],
    }
    pay = sc.SCENARIO.service("payments")
    assert cfg["outbound"] == {
        "listen": f"127.0.0.1:{api.outbound_port}",
        "upstreams": {
            "payments": {
                "endpoints": [f"127.0.0.1:{pay.inbound_port}"],
                "spiffe_id": "spiffe://meshcar.demo/svc/payments",
            },
            "payments-db": {  # the ledger database, opaque TCP (issue 13)
                "protocol": "tcp",
                "endpoints": [f"127.0.0.1:{pay.inbound_port}"],
                "spiffe_id": "spiffe://meshcar.demo/svc/payments",
                "local_port": 7312,
                "target_port": pay.ledger_port,
            },
        },
    }
    assert cfg["admin"] == {"listen": f"127.0.0.1:{api.admin_port}"}


def test_payments_accepts_api_only_and_calls_nobody() -> None:
    cfg = sidecar_config(sc.SCENARIO, sc.SCENARIO.service("payments"), PATHS)
    assert cfg["inbound"]["allow"] == ["spiffe://meshcar.demo/svc/api"]
    assert cfg["outbound"]["upstreams"] == {}


def test_payments_serves_grpc_over_h2c_and_its_ledger_over_opaque_tcp() -> None:
    pay = sc.SCENARIO.service("payments")
    cfg = sidecar_config(sc.SCENARIO, pay, PATHS)
    assert cfg["app"]["protocol"] == "h2c"
    assert cfg["inbound"]["tcp"] == [{"port": pay.ledger_port}]
    parsed = parse_config(cfg, "payments.yaml", Path("/demo"))
    assert parsed.app_protocol == "h2c"
    argv = list({p.name: p for p in mesh_processes(sc.SCENARIO, PATHS, CERTS)}["app-payments"].argv)
    assert "--h2c" in argv and argv[argv.index("--ledger-port") + 1] == str(pay.ledger_port)
    for caller, port in (("api", 7312), ("web", 7311)):
        app = {p.name: p for p in mesh_processes(sc.SCENARIO, PATHS, CERTS)}[f"app-{caller}"]
        assert app.argv[app.argv.index("--db") + 1] == f"payments=127.0.0.1:{port}"


def test_every_upstream_points_at_the_peers_mesh_listener() -> None:
    for s in sc.SCENARIO.services:
        ups = sidecar_config(sc.SCENARIO, s, PATHS)["outbound"]["upstreams"]
        assert set(ups) == set(s.upstreams) | {sc.db_upstream(p) for p, _ in s.db_upstreams}
        for name, u in ups.items():
            peer = sc.SCENARIO.service(name.removesuffix("-db"))
            assert u["endpoints"] == [f"127.0.0.1:{peer.inbound_port}"]
            assert u["spiffe_id"] == peer.spiffe_id


def test_generated_configs_pass_the_sidecars_own_validation() -> None:
    """The contract test: what the demo writes is what `meshcar sidecar --config` accepts."""
    for s in sc.SCENARIO.services:
        text = yaml.safe_dump(sidecar_config(sc.SCENARIO, s, PATHS), sort_keys=False)
        parsed = parse_config(yaml.safe_load(text), f"{s.name}.yaml", Path("/demo"))
        assert parsed.identity.spiffe_id == s.spiffe_id
        assert parsed.app.port == s.app_port
        assert set(parsed.allow) == {sc.spiffe_id(c) for c in s.allowed_callers}
        assert {u.name for u in parsed.upstreams if u.protocol == "http"} == set(s.upstreams)
        assert {u.name for u in parsed.upstreams if u.protocol == "tcp"} == {
            sc.db_upstream(p) for p, _ in s.db_upstreams
        }


def test_process_list_covers_every_part_with_a_probe_and_no_port_twice() -> None:
    procs = [ca_process(PATHS)] + mesh_processes(sc.SCENARIO, PATHS, CERTS, python="/py")
    names = [p.name for p in procs]
    assert names == [
        "ca",
        "sidecar-web",
        "sidecar-api",
        "sidecar-payments",
        "app-web",
        "app-api",
        "app-payments",
        "payments-public",
    ]
    ports = [port for port, _ in all_ports(procs)]
    assert len(ports) == len(set(ports))
    expected = {sc.CA_PORT, sc.PAYMENTS_PUBLIC_PORT}
    for s in sc.SCENARIO.services:
        expected |= {s.app_port, s.inbound_port, s.outbound_port, s.admin_port}
        expected |= {lp for _, lp in s.db_upstreams} | ({s.ledger_port} - {None})
    assert set(ports) == expected
    for p in procs[1:]:
        assert p.argv[:3] == ("/py", "-m", "meshcar.cli")


def test_apps_reach_peers_only_through_their_own_sidecar() -> None:
    procs = {p.name: p for p in mesh_processes(sc.SCENARIO, PATHS, CERTS)}
    for s in sc.SCENARIO.services:
        env = dict(procs[f"app-{s.name}"].env)
        assert env["HTTP_PROXY"] == f"http://127.0.0.1:{s.outbound_port}"
        assert procs[f"sidecar-{s.name}"].probe.url == f"http://127.0.0.1:{s.admin_port}/ready"


def test_payments_public_endpoint_requires_partner_certificates() -> None:
    public = {p.name: p for p in mesh_processes(sc.SCENARIO, PATHS, CERTS)}["payments-public"]
    argv = list(public.argv)
    assert argv[argv.index("--port") + 1] == str(sc.PAYMENTS_PUBLIC_PORT)
    assert argv[argv.index("--tls-client-ca") + 1] == str(CERTS.partner_ca)
    assert "--proxy-protocol" in argv
    assert (
        argv[argv.index("--proxy-trusted") + 1] == "127.0.0.2/32"
    )  # the edge's passthrough source
    assert public.probe.client_cert == CERTS.partner_cert
    assert public.probe.server_hostname == sc.PAYMENTS_PUBLIC_HOST


def test_ports_known_up_front_are_the_ports_of_the_plan() -> None:
    planned = all_ports(
        [ca_process(PATHS)]
        + mesh_processes(sc.SCENARIO, PATHS, CERTS)
        + edge_processes(sc.SCENARIO, PATHS)
    )
    assert scenario_ports(sc.SCENARIO, PATHS) == planned


def test_edge_config_is_built_from_the_scenario_and_loads() -> None:
    from meshcar.demo.plan import edge_config
    from meshcar.edge.config import parse_edge_config

    cfg = parse_edge_config(edge_config(sc.SCENARIO, PATHS), "edge.yaml", PATHS.root)
    by_host = {r.host: r for r in cfg.routes}
    assert set(by_host) == {r.host for r in sc.SCENARIO.edge_routes}
    for r in sc.SCENARIO.edge_routes:
        route, svc = by_host[r.host], sc.SCENARIO.service(r.backend)
        assert route.mode == r.mode
        port = {
            "terminate": svc.app_port,
            "bridge": svc.inbound_port,
            "passthrough": svc.public_tls_port,
        }[r.mode]
        assert [e.port for e in route.backend.endpoints] == [port]
    assert by_host["api.demo.test"].backend.spiffe_id == sc.spiffe_id("api")
    assert by_host["api.demo.test"].path_prefix == "/v1/" and by_host["api.demo.test"].hsts
    assert by_host["payments.demo.test"].proxy_protocol == "v2"
    assert by_host["payments.demo.test"].source_address == "127.0.0.2"
    assert cfg.https_listen.port == sc.EDGE_HTTPS_PORT and cfg.identity is not None
