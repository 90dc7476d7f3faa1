"""What `meshcar demo` runs, derived from meshcar/demo/scenario.py (pure: no processes, no I/O).

- `DemoPaths`: where every file of the demo lives under its directory;
- `sidecar_config`: one sidecar's configuration (docs/CONFIG.md) for a scenario service;
- `plan_processes`: the ordered list of child processes (command line, environment, readiness
  probe, ports).  The edge plugs in here later as one more `ProcSpec` built from
  `scenario.edge_routes`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshcar.demo import scenario as sc


@dataclass(frozen=True)
class DemoPaths:
    """The layout of the demo directory (default `.meshcar-demo/`)."""

    root: Path

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_root(self) -> Path:
        return self.ca_dir / "root.pem"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def mesh_bundle(self) -> Path:
        return self.root / "mesh-bundle.pem"

    def log(self, process: str) -> Path:
        return self.logs_dir / f"{process}.log"

    def sidecar_dir(self, service: str) -> Path:
        return self.root / "sidecars" / service

    def sidecar_config(self, service: str) -> Path:
        return self.sidecar_dir(service) / "sidecar.yaml"

    def token_file(self, service: str) -> Path:
        return self.sidecar_dir(service) / "join.token"

    def state_dir(self, service: str) -> Path:
        return self.sidecar_dir(service) / "state"


@dataclass(frozen=True)
class Probe:
    """How to tell that a process is ready: an HTTP(S) GET answering `expect_status`."""

    url: str
    expect_status: int = 200
    cafile: Path | None = None  # https: the root to verify the server against
    client_cert: Path | None = None  # https: a client certificate to present
    client_key: Path | None = None
    server_hostname: str | None = None  # https: the name to verify (SNI)


@dataclass(frozen=True)
class ProcSpec:
    """One child process of the demo."""

    name: str
    argv: tuple[str, ...]
    probe: Probe
    ports: tuple[tuple[int, str], ...] = ()  # (port, what listens there) for clear errors
    env: tuple[tuple[str, str], ...] = field(default=())  # added to the inherited environment


LOOPBACK = "127.0.0.1"
# The edge's passthrough connections come from this address, the only one payments' partner
# endpoint accepts a PROXY header from (a direct client on 127.0.0.1 cannot forge one).
EDGE_PASSTHROUGH_SOURCE = "127.0.0.2"
CA_URL = f"https://{LOOPBACK}:{sc.CA_PORT}"


def meshcar_argv(*args: str, python: str | None = None) -> tuple[str, ...]:
    """`meshcar ARGS` as a command that works without PATH (this interpreter, -m)."""
    return (python or sys.executable, "-m", "meshcar.cli", *args)


def hostport(port: int) -> str:
    return f"{LOOPBACK}:{port}"


def app_args(s: sc.Service, host: str = LOOPBACK) -> tuple[str, ...]:
    """`meshcar demo-app` arguments for a service's app (compose and k8s run the same)."""
    args = ["--name", s.name, "--port", str(s.app_port), "--host", host]
    if s.app_protocol == "h2c":
        args.append("--h2c")  # gRPC over h2c on the same port (HTTP/1.1 goes on as before)
    if s.ledger_port is not None:
        args += ["--ledger-port", str(s.ledger_port)]
    for peer, local_port in s.db_upstreams:
        args += ["--db", f"{peer}={LOOPBACK}:{local_port}"]  # via its sidecar's tunnel
    return tuple(args)


def sidecar_config(scenario: sc.Scenario, service: sc.Service, paths: DemoPaths) -> dict[str, Any]:
    """One sidecar's config (docs/CONFIG.md), entirely from the scenario."""
    upstreams: dict[str, dict[str, Any]] = {}
    for name in service.upstreams:
        peer = scenario.service(name)
        upstreams[name] = {
            "endpoints": [hostport(peer.inbound_port)],
            "spiffe_id": peer.spiffe_id,
        }
    for name, local_port in service.db_upstreams:
        peer = scenario.service(name)
        assert peer.ledger_port is not None, f"{name} has no ledger database"
        upstreams[sc.db_upstream(name)] = {
            "protocol": "tcp",
            "endpoints": [hostport(peer.inbound_port)],
            "spiffe_id": peer.spiffe_id,
            "local_port": local_port,
            "target_port": peer.ledger_port,
        }
    app: dict[str, Any] = {"host": LOOPBACK, "port": service.app_port}
    if service.app_protocol != "http1":
        app["protocol"] = service.app_protocol
    inbound: dict[str, Any] = {
        "listen": hostport(service.inbound_port),
        "allow": [sc.spiffe_id(caller) for caller in service.allowed_callers],
    }
    if service.ledger_port is not None:
        inbound["tcp"] = [{"port": service.ledger_port}]
    return {
        "identity": {
            "spiffe_id": service.spiffe_id,
            "ca_url": CA_URL,
            "ca_bundle": str(paths.ca_root),
            "token_file": str(paths.token_file(service.name)),
            "state_dir": str(paths.state_dir(service.name)),
            "ttl_seconds": sc.CERT_TTL_SECONDS,
        },
        "app": app,
        "inbound": inbound,
        "outbound": {"listen": hostport(service.outbound_port), "upstreams": upstreams},
        "admin": {"listen": hostport(service.admin_port)},
        "log_level": "info",
    }


@dataclass(frozen=True)
class PublicCerts:
    """The public (non-mesh) certificate files the processes need (see pki.py)."""

    edge_ca: Path
    partner_ca: Path
    partner_cert: Path
    partner_key: Path
    payments_cert: Path
    payments_key: Path


def ca_process(paths: DemoPaths, python: str | None = None) -> ProcSpec:
    return ProcSpec(
        name="ca",
        argv=meshcar_argv(
            "ca",
            "serve",
            "--dir",
            str(paths.ca_dir),
            "--listen",
            hostport(sc.CA_PORT),
            python=python,
        ),
        probe=Probe(f"{CA_URL}/healthz", cafile=paths.ca_root),
        ports=((sc.CA_PORT, "CA API"),),
    )


def mesh_processes(
    scenario: sc.Scenario, paths: DemoPaths, certs: PublicCerts, python: str | None = None
) -> list[ProcSpec]:
    """Every sidecar, every app, and payments' public TLS endpoint."""
    procs: list[ProcSpec] = []
    for s in scenario.services:
        procs.append(
            ProcSpec(
                name=f"sidecar-{s.name}",
                argv=meshcar_argv(
                    "sidecar", "--config", str(paths.sidecar_config(s.name)), python=python
                ),
                probe=Probe(f"http://{hostport(s.admin_port)}/ready"),
                ports=(
                    (s.inbound_port, f"{s.name} sidecar inbound (mesh)"),
                    (s.outbound_port, f"{s.name} sidecar outbound"),
                    (s.admin_port, f"{s.name} sidecar admin"),
                    *(
                        (lp, f"{s.name} sidecar {sc.db_upstream(p)} tunnel")
                        for p, lp in s.db_upstreams
                    ),
                ),
            )
        )
    for s in scenario.services:
        procs.append(
            ProcSpec(
                name=f"app-{s.name}",
                argv=meshcar_argv("demo-app", *app_args(s), python=python),
                probe=Probe(f"http://{hostport(s.app_port)}/healthz"),
                ports=((s.app_port, f"{s.name} app"),)
                + (((s.ledger_port, f"{s.name} ledger database"),) if s.ledger_port else ()),
                env=(("HTTP_PROXY", f"http://{hostport(s.outbound_port)}"),),
            )
        )
    for s in scenario.services:
        if s.public_tls_port is None:
            continue
        procs.append(
            ProcSpec(
                name=f"{s.name}-public",
                argv=meshcar_argv(
                    "demo-app",
                    "--name",
                    s.name,
                    "--port",
                    str(s.public_tls_port),
                    "--host",
                    LOOPBACK,
                    "--tls-cert",
                    str(certs.payments_cert),
                    "--tls-key",
                    str(certs.payments_key),
                    "--tls-client-ca",
                    str(certs.partner_ca),
                    "--proxy-protocol",  # the edge's passthrough route sends PROXY v2 ...
                    "--proxy-trusted",
                    f"{EDGE_PASSTHROUGH_SOURCE}/32",  # ... from this address only
                    python=python,
                ),
                probe=Probe(
                    f"https://{hostport(s.public_tls_port)}/healthz",
                    cafile=certs.edge_ca,
                    client_cert=certs.partner_cert,
                    client_key=certs.partner_key,
                    server_hostname=sc.PAYMENTS_PUBLIC_HOST,
                ),
                ports=((s.public_tls_port, f"{s.name} public TLS endpoint"),),
                env=(("HTTP_PROXY", f"http://{hostport(s.outbound_port)}"),),
            )
        )
    return procs


EDGE_NAME = "edge"


def edge_config(scenario: sc.Scenario, paths: DemoPaths) -> dict[str, Any]:
    """The edge's config (docs/EDGE.md), from `scenario.edge_routes`, on loopback."""
    from meshcar.demo.edge_config import edge_config_for

    ports = {
        "app": lambda s: s.app_port,
        "mesh": lambda s: s.inbound_port,
        "public": lambda s: s.public_tls_port,
    }
    return edge_config_for(
        scenario,
        https=hostport(sc.EDGE_HTTPS_PORT),
        http=hostport(sc.EDGE_HTTP_PORT),
        admin=hostport(sc.EDGE_ADMIN_PORT),
        identity={
            "spiffe_id": sc.spiffe_id(EDGE_NAME),
            "ca_url": CA_URL,
            "ca_bundle": str(paths.ca_root),
            "token_file": str(paths.token_file(EDGE_NAME)),
            "state_dir": str(paths.state_dir(EDGE_NAME)),
            "ttl_seconds": sc.CERT_TTL_SECONDS,
        },
        cert=str(paths.root / "pki" / "edge.pem"),
        key=str(paths.root / "pki" / "edge.key"),
        endpoint=lambda svc, kind: hostport(ports[kind](svc)),
        passthrough_source=EDGE_PASSTHROUGH_SOURCE,
    )


def edge_processes(scenario: sc.Scenario, paths: DemoPaths) -> list[ProcSpec]:
    """The edge: one process, its config from `scenario.edge_routes`."""
    if not scenario.edge_routes:
        return []
    return [
        ProcSpec(
            name=EDGE_NAME,
            argv=meshcar_argv("edge", "--config", str(paths.sidecar_dir(EDGE_NAME) / "edge.yaml")),
            probe=Probe(f"http://{hostport(sc.EDGE_ADMIN_PORT)}/ready"),
            ports=(
                (sc.EDGE_HTTPS_PORT, "edge HTTPS"),
                (sc.EDGE_HTTP_PORT, "edge HTTP"),
                (sc.EDGE_ADMIN_PORT, "edge admin"),
            ),
        )
    ]


def all_ports(procs: list[ProcSpec]) -> list[tuple[int, str]]:
    return [p for spec in procs for p in spec.ports]


def scenario_ports(scenario: sc.Scenario, paths: DemoPaths) -> list[tuple[int, str]]:
    """Every port the demo will bind, known before any file exists (for a fast check)."""
    placeholder = PublicCerts(*(paths.root / "-",) * 6)
    return all_ports(
        [ca_process(paths)]
        + mesh_processes(scenario, paths, placeholder)
        + edge_processes(scenario, paths)
    )
