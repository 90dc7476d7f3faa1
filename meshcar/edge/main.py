"""`meshcar edge --config FILE`: the public entry point, assembled and run under trio.

Start order: admin listener (/ready false), the mesh identity if any bridge route needs it
(no bridged traffic before a certificate exists), health checks, then the HTTPS and HTTP
listeners via `nursery.start`, so ports are bound before /ready says true. A WARNING is
logged at start for every terminate route: that leg to the backend is plaintext. The process
shell (net/shell.py) owns the root nursery and SIGTERM/SIGINT: the edge drains like the
sidecar (listeners closed, /ready false, requests in flight finish within drain_seconds).
SIGHUP reloads the config file (common/reload.py): routes, their certificate files (read
again: new handshakes get the new certificate), policies and timeouts apply live; the keys in
RESTART_KEYS keep their running value and the reload names them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from functools import partial
from pathlib import Path

import trio
from prometheus_client import Gauge

from meshcar.admin.metrics import Metrics
from meshcar.admin.server import AdminHooks
from meshcar.common import accesslog
from meshcar.common.accesslog import setup_logging
from meshcar.common.issuer import credential_source
from meshcar.common.reload import Prepared, Reloader, restart_keys
from meshcar.common.serving import serve_guarded, start_admin, with_workers
from meshcar.edge.config import EdgeConfig, Mode, load_edge_config
from meshcar.edge.files import edge_start_problems
from meshcar.edge.health import health_loop
from meshcar.edge.http import Backends, Redirector, TerminatingProxy
from meshcar.edge.listener import TLSListener
from meshcar.errors import ConfigError
from meshcar.identity.follow import Follower
from meshcar.identity.rotate import Rotator
from meshcar.net.shell import Shell, run_process
from meshcar.net.workers import Worker, run_workers
from meshcar.tls.store import CredentialStore

log = logging.getLogger("meshcar.edge")


def _event(name: str, level: int = logging.INFO, **fields: object) -> None:
    log.log(level, json.dumps({"event": name, **fields}, default=str))


# Keys a reload cannot change in a running process: they keep their running value and the
# reload names them (docs/CONFIG.md); every other key (routes, their certificates, policies,
# timeouts, http, default_route, trusted_hops) applies live.
RESTART_KEYS = (
    "https_listen",
    "http_listen",
    "admin_listen",
    "identity",
    "workers",
    "admin_public_paths",
    "drain_seconds",
    "log_level",
    "pool_idle_seconds",
    "limits",
    "reload_watch_seconds",
)


def _cert_files(cfg: EdgeConfig) -> list[Path]:
    """The files a watching edge reloads on: every route's certificate, key and client CA."""
    out: list[Path] = []
    for r in cfg.routes:
        out += [p for p in (r.cert_file, r.key_file) if p is not None]
        if r.client_auth is not None:
            out.append(r.client_auth.ca_file)
    return out


class Edge:
    def __init__(
        self, cfg: EdgeConfig, worker: Worker | None = None, source: Path | None = None
    ) -> None:
        """`worker`: this process is one of `workers: N` (net/workers.py); None: the only one.
        `source`: the config file, read again on SIGHUP (common/reload.py)."""
        self.cfg = cfg
        self.worker = worker
        self.metrics = Metrics()
        self.backend_up = Gauge(
            "meshcar_edge_backend_up",
            "1 if the endpoint passes its health check",
            ["route", "endpoint", "check"],
            registry=self.metrics.registry,
        )
        self.store: CredentialStore | None = None
        self.rotator: Rotator | Follower | None = None
        if cfg.identity is not None:  # bridge routes' mesh identity: its certificate's expiry
            self.metrics.identity = cfg.identity.spiffe_id
            self.store, self.rotator = credential_source(cfg.identity, worker, self.metrics)
        self.backends = Backends(cfg, self.store, self.metrics)
        self.proxy = TerminatingProxy(cfg, self.backends, self.metrics)
        self.tls = TLSListener(cfg, self.proxy, self.backends.balancers, self.metrics)
        self.redirector = Redirector(cfg, self.metrics)
        self.shell = Shell("edge", cfg.drain_seconds)
        self.proxy.drain = self.shell.drain
        self.reloader = Reloader(
            "edge",
            source,
            load_edge_config,
            self.prepare_reload,
            self.metrics.registry,
            watch_files=lambda: _cert_files(self.cfg),
        )
        self.shell.on_reload = self.reloader.reload
        self._health: trio.CancelScope | None = None

    def prepare_reload(self, new: EdgeConfig) -> Prepared:
        """The reload of `new` (validated): routes, balancers, limiters and SSLContexts
        (certificate files read again) built; the keys needing a restart named."""
        restart = restart_keys(self.cfg, new, RESTART_KEYS)
        effective = dataclasses.replace(new, **{k: getattr(self.cfg, k) for k in RESTART_KEYS})
        if self.backends.mtls is None and any(r.mode is Mode.BRIDGE for r in effective.routes):
            raise ConfigError(
                ["bridge routes need the mesh identity, which this edge started without: restart"]
            )
        swap_backends = self.backends.reconfigure(effective)
        swap_proxy = self.proxy.reconfigure(effective)
        swap_tls = self.tls.reconfigure(effective)  # certificate files read here

        def commit() -> None:  # no checkpoint: no connection sees half of it
            swap_backends()
            swap_proxy()
            swap_tls(self.backends.balancers)
            self.redirector.cfg = self.cfg = effective
            if self._health is not None:  # the health loops of the new routes
                self._health.cancel()
                self.shell.services.start_soon(self._health_loops)

        return Prepared(commit, restart)

    def ready(self) -> tuple[bool, str]:
        """This process's readiness and, on worker 0 of N, every other worker's."""
        return with_workers(self.worker_ready(), self.worker)

    def worker_ready(self) -> tuple[bool, str]:
        if self.store is not None and not self.store.is_valid_now():
            reason = self.rotator.reason if self.rotator is not None else "no rotator"
            return False, f"no valid mesh certificate ({reason})"
        problem = self.shell.not_ready()
        return (False, problem) if problem else (True, "ok")

    @property
    def listening(self) -> bool:
        return self.shell.listening

    def status(self) -> dict:
        out: dict = {"routes": {}}
        for host, bal in self.backends.balancers.items():
            out["routes"][host] = [
                {"endpoint": str(s.endpoint), "healthy": s.healthy, "active": s.active}
                for s in bal.states
            ]
        if self.store is not None and self.store.credential is not None:
            cred = self.store.credential
            out.update(
                spiffe_id=cred.spiffe_id,
                serial=cred.serial_hex,
                not_after=cred.not_after.isoformat(),
            )
        return out

    def routes(self) -> list[dict]:
        """The routes served now, with mode, paths and backend endpoints (admin GET /routes)."""
        return [
            {
                "host": r.host,
                "mode": str(r.mode.value),
                "path_prefix": r.path_prefix,
                "endpoints": [str(e) for e in r.backend.endpoints],
                "spiffe_id": r.backend.spiffe_id,
            }
            for r in self.cfg.routes
        ]

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled or a signal drains us (net/shell.py)."""
        await self.shell.run(
            self._start, cleanup=self.backends.pool.close_all, task_status=task_status
        )

    async def _start(self, shell: Shell) -> None:
        cfg = self.cfg
        nursery = shell.services
        await self._start_admin(shell)
        nursery.start_soon(accesslog.flush_loop)
        if self.rotator is not None:
            await nursery.start(self.rotator.run)
            assert cfg.identity is not None
            if isinstance(self.rotator, Rotator):
                nursery.start_soon(self.rotator.bundle_loop, cfg.identity.bundle_refresh_seconds)
        for route in cfg.routes:
            if route.mode is Mode.TERMINATE:
                _event(
                    "edge.plaintext_backend",
                    logging.WARNING,
                    route=route.host,
                    message="TLS ends at the edge; the leg to the backend is unencrypted HTTP",
                )
        await nursery.start(self._health_loops)
        if cfg.reload_watch_seconds:  # config and certificate files polled (common/reload.py)
            nursery.start_soon(self.reloader.watch_loop, cfg.reload_watch_seconds)
        await shell.serve_traffic(self._serve_traffic)
        _event(
            "edge.ready",
            https=str(cfg.https_listen),
            http=str(cfg.http_listen) if cfg.http_listen else None,
            routes={r.host: r.mode for r in cfg.routes},
        )

    async def _health_loops(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The health checks of the running routes, until a reload replaces them."""
        with trio.CancelScope() as self._health:
            async with trio.open_nursery() as loops:
                for route in self.cfg.routes:
                    for target, backend in route.targets():  # each backend of a split
                        if backend.health is not None:
                            loops.start_soon(
                                health_loop, route, self.backends, self.backend_up, target
                            )
                task_status.started()

    async def _start_admin(self, shell: Shell) -> None:
        """The admin listener. With `workers: N` worker 0 serves it, its /metrics merging
        every worker's; the others serve theirs on a loopback port for it (admin/workers.py)."""
        cfg, worker = self.cfg, self.worker
        hooks = AdminHooks(self.ready, self.status)
        hooks.routes = self.routes  # GET /routes (loopback only): the dashboard's view
        hooks.config_status = self.reloader.status  # GET /config/status (loopback only)
        await start_admin(
            shell,
            worker,
            self.metrics,
            hooks,
            cfg.admin_listen,
            cfg.admin_public_paths,
            lambda: self.worker_ready()[0],
        )

    async def _serve_traffic(self, ln: trio.Nursery) -> None:
        """The public listeners (the shell runs them in the scope a drain cancels)."""
        cfg = self.cfg
        await ln.start(
            partial(
                self.tls.serve,
                cfg.https_listen.host,
                cfg.https_listen.port,
                handler_nursery=self.shell.conns,
                reuse_port=self.worker is not None,
            )
        )
        if cfg.http_listen is not None:
            await serve_guarded(
                ln,
                self.redirector.handle_connection,
                cfg.http_listen,
                self.shell.conns,
                "http",
                self.metrics,
                reuse_port=self.worker is not None,
            )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meshcar edge", description="Run the meshcar edge.")
    parser.add_argument("--config", type=Path, required=True, help="YAML config (docs/EDGE.md)")
    args = parser.parse_args(argv)
    try:
        cfg = load_edge_config(args.config)
        problems = edge_start_problems(cfg)  # every missing file at once, by key and path
        if problems:
            raise ConfigError([f"{args.config}: {p}" for p in problems])
        edge = Edge(cfg, source=args.config)
    except ConfigError as exc:
        print(f"meshcar edge: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # unreadable certificate/key files
        print(f"meshcar edge: {args.config}: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    accesslog.configure(cfg.access_log_fields)
    if cfg.workers == 1:
        return run_process("edge", edge.run)
    return run_workers(
        "edge", cfg.workers, lambda w: run_process("edge", Edge(cfg, w, args.config).run)
    )
