"""Fixtures: an in-process sidecar pair (real TLS on loopback) with a test PKI."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from meshcar.admin.metrics import Metrics
from meshcar.sidecar.config import HostPort, SidecarConfig, parse_config
from meshcar.sidecar.inbound import Inbound
from meshcar.sidecar.outbound import Outbound
from meshcar.tls.store import CredentialStore
from tests.support.echo_app import serve_echo
from tests.support.pki import ThrowawayCA

TD = "meshcar.test"
NODES: list = []


def sid(name: str) -> str:
    return f"spiffe://{TD}/svc/{name}"


@dataclass
class Node:
    name: str
    cfg: SidecarConfig
    store: CredentialStore
    metrics: Metrics
    inbound: Inbound
    outbound: Outbound
    inbound_port: int = 0
    outbound_port: int = 0


async def _port(nursery: trio.Nursery, handler) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


def make_cfg(
    tmp: Path, name: str, app_port: int, allow: list[str], upstreams: dict, **top: object
) -> SidecarConfig:
    return parse_config(
        {
            "identity": {
                "spiffe_id": sid(name),
                "ca_url": "https://127.0.0.1:1",
                "ca_bundle": "x",
                "state_dir": str(tmp / name),
            },
            "app": {"port": app_port},
            "inbound": {"listen": "127.0.0.1:1", "allow": allow},
            "outbound": {"listen": "127.0.0.1:1", "upstreams": upstreams},
            "admin": {"listen": "127.0.0.1:1"},
            **top,
        },
        "test.yaml",
        tmp,
    )


async def start_node(
    nursery: trio.Nursery,
    tmp: Path,
    ca: ThrowawayCA,
    name: str,
    app_port: int,
    allow: list[str],
    upstreams: dict,
    **top: object,
) -> Node:
    cfg = make_cfg(tmp, name, app_port, allow, upstreams, **top)
    store = CredentialStore(cfg.identity.state_dir)
    store.install(ca.credential(sid(name)))
    metrics = Metrics()
    node = Node(
        name, cfg, store, metrics, Inbound(cfg, store, metrics), Outbound(cfg, store, metrics)
    )
    NODES.append(node)
    node.inbound_port = await _port(nursery, node.inbound.handle_connection)
    node.outbound_port = await _port(nursery, node.outbound.handle_connection)
    return node


async def start_pair(
    nursery: trio.Nursery,
    tmp: Path,
    app_port: int,
    client_top: dict | None = None,
    server_top: dict | None = None,
    ca: ThrowawayCA | None = None,
) -> tuple[Node, Node]:
    """A sidecar pair in front of `app_port`: "web" (calls "api" as upstream `api`) and "api"
    (allows web), each with extra top-level config sections (timeouts, limits) if given."""
    ca = ca or ThrowawayCA.create()
    server = await start_node(
        nursery, tmp, ca, "api", app_port, [sid("web")], {}, **(server_top or {})
    )
    client = await start_node(
        nursery,
        tmp,
        ca,
        "web",
        app_port,
        [],
        {"api": {"endpoints": [f"127.0.0.1:{server.inbound_port}"], "spiffe_id": sid("api")}},
        **(client_top or {}),
    )
    return client, server


@dataclass
class Mesh:
    ca: ThrowawayCA
    app_port: int
    client: Node  # "web": may call "api"
    server: Node  # "api": allows web


@pytest.fixture
async def mesh(tmp_path: Path, nursery: trio.Nursery):
    ca = ThrowawayCA.create()
    app_port = await serve_echo(nursery)
    client, server = await start_pair(nursery, tmp_path, app_port, ca=ca)
    yield Mesh(ca, app_port, client, server)
    for node in NODES:
        await node.inbound.aclose()
        await node.outbound.aclose()
    NODES.clear()


__all__ = ["HostPort", "Mesh", "mesh", "sid", "start_node", "start_pair", "TD"]
