"""Helpers for the edge's integration tests: public test certificates, an edge assembled
in-process on 127.0.0.1 port 0 from a config dict, and a small HTTP backend that names
itself and whose health endpoint can be switched between healthy and failing."""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trustme

from meshcar.admin.metrics import Metrics
from meshcar.edge.config import EdgeConfig, parse_edge_config
from meshcar.edge.http import Backends, Redirector, TerminatingProxy
from meshcar.edge.listener import TLSListener
from meshcar.tls.store import CredentialStore


@dataclass
class PublicPKI:
    ca: trustme.CA
    ca_file: Path  # verifies the edge's certificate (and passthrough backends')
    site: Path  # key + chain for www.test, api.test, secure.test, opt.test
    partner_ca_file: Path
    partner: Path  # a client certificate signed by partner_ca
    stranger: Path  # a client certificate from another CA

    def backend_context(self, host: str, *, require_partner: bool = False) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ca.issue_cert(host).configure_cert(ctx)
        if require_partner:
            ctx.load_verify_locations(cafile=str(self.partner_ca_file))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def public_pki(tmp: Path) -> PublicPKI:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "public-ca.pem"))
    ca.issue_cert(
        "www.test", "api.test", "secure.test", "opt.test"
    ).private_key_and_cert_chain_pem.write_to_path(str(tmp / "site.pem"))
    partner_ca = trustme.CA()
    partner_ca.cert_pem.write_to_path(str(tmp / "partner-ca.pem"))
    partner_ca.issue_cert(
        "partner@example.com", common_name="partner"
    ).private_key_and_cert_chain_pem.write_to_path(str(tmp / "partner.pem"))
    trustme.CA().issue_cert(
        "stranger@example.com", common_name="stranger"
    ).private_key_and_cert_chain_pem.write_to_path(str(tmp / "stranger.pem"))
    return PublicPKI(
        ca,
        tmp / "public-ca.pem",
        tmp / "site.pem",
        tmp / "partner-ca.pem",
        tmp / "partner.pem",
        tmp / "stranger.pem",
    )


@dataclass
class RunningEdge:
    cfg: EdgeConfig
    https: int
    http: int
    metrics: Metrics
    backends: Backends
    tls: TLSListener | None = None

    async def aclose(self) -> None:
        await self.backends.pool.retire()  # busy connections too, once their request ends


async def _serve(nursery: trio.Nursery, handler) -> int:  # noqa: ANN001
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def serve_tls_listener(nursery: trio.Nursery, listener: TLSListener) -> int:
    """The edge's public listener on a free loopback port, accepting as `meshcar edge` does."""
    sockets = await nursery.start(partial(listener.serve, "127.0.0.1", 0))
    return sockets[0].getsockname()[1]


def terminate_route(host: str, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "host": host,
        "mode": "terminate",
        "tls": {"cert": "site.pem", "key": "site.pem"},
        "backend": {"endpoints": [f"127.0.0.1:{port}"]},
        **extra,
    }


async def start_edge(
    nursery: trio.Nursery,
    tmp: Path,
    routes: list[dict[str, Any]],
    store: CredentialStore | None = None,
    **top: Any,
) -> RunningEdge:
    """The edge's TLS and redirect listeners on port 0, as `meshcar edge` assembles them."""
    raw: dict[str, Any] = {
        "listen": {"https": "127.0.0.1:1", "http": "127.0.0.1:1"},
        "admin": {"listen": "127.0.0.1:1"},
        "routes": routes,
        **top,
    }
    cfg = parse_edge_config(raw, "edge.yaml", tmp)
    metrics = Metrics()
    backends = Backends(cfg, store, metrics)
    proxy = TerminatingProxy(cfg, backends, metrics)
    tls = TLSListener(cfg, proxy, backends.balancers, metrics)
    https = await serve_tls_listener(nursery, tls)
    http = await _serve(nursery, Redirector(cfg, metrics).handle_connection)
    return RunningEdge(cfg, https, http, metrics, backends, tls)


@dataclass
class NamedBackend:
    """An HTTP/1.1 backend answering `{"backend": name, "target": ...}`; `/healthz` answers
    `health_status` (switch it to fail the edge's health checks)."""

    name: str
    health_status: int = 200
    port: int = 0
    requests: list[str] = field(default_factory=list)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            try:
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        buf += data
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    target = head.split(b" ", 2)[1].decode()
                    if target == "/healthz":
                        status = self.health_status
                    else:
                        status = 200
                        self.requests.append(target)
                    body = json.dumps({"backend": self.name, "target": target}).encode()
                    await stream.send_all(
                        b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%b" % (status, len(body), body)
                    )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def start(self, nursery: trio.Nursery) -> NamedBackend:
        self.port = await _serve(nursery, self._handle)
        return self


async def curl(*args: str) -> tuple[int, str, str]:
    r = await trio.run_process(
        ["curl", "-sS", "--max-time", "10", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return r.returncode, r.stdout.decode(), r.stderr.decode()


def resolve(ca_file: Path, host: str, port: int) -> list[str]:
    return ["--cacert", str(ca_file), "--resolve", f"{host}:{port}:127.0.0.1"]


def headers_of(body: str) -> dict[str, list[str]]:
    """The request headers an echo app (tests/support/echo_app.py) reports, by lowercase name."""
    out: dict[str, list[str]] = {}
    for k, v in json.loads(body)["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


async def wait_until(predicate, timeout: float = 5.0) -> None:  # noqa: ANN001
    """Wait for a condition the edge reaches on its own (a health check's verdict)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
