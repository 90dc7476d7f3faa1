"""`meshcar sidecar --config FILE`: build the sidecar from its config and run it under trio.

Start order: admin listener first (so /live and /ready answer at once, /ready false), then
the identity (bootstrap; no mesh traffic is accepted before a certificate exists), then the
inbound and outbound listeners, all started with `nursery.start` so ports are bound before
anything reports ready. The process shell (net/shell.py) owns the root nursery, readiness
while draining, SIGTERM/SIGINT -> drain -> exit and the exit codes. SIGHUP reloads the config
file (common/reload.py): `inbound.allow`, `inbound.policies` and the outbound's upstreams
(endpoints, identity, traffic policy, an http upstream's `local_port` listener), splits and
egress apply live; any other changed key (and a `protocol: tcp` upstream) is named as
needing a restart and keeps its running value.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import sys
from functools import partial
from pathlib import Path

import trio

from meshcar.admin.metrics import Metrics
from meshcar.admin.server import AdminHooks
from meshcar.common import accesslog
from meshcar.common.accesslog import setup_logging
from meshcar.common.files import identity_files, startup_problems
from meshcar.common.issuer import credential_source
from meshcar.common.reload import Prepared, Reloader, restart_keys
from meshcar.common.serving import serve_guarded, start_admin, with_workers
from meshcar.errors import ConfigError
from meshcar.identity.caclient import CAError
from meshcar.identity.rotate import Rotator
from meshcar.net.shell import Shell, run_process
from meshcar.net.workers import Worker, run_workers
from meshcar.sidecar.config import (
    HostPort,
    SidecarConfig,
    Upstream,
    load_config,
    load_config_text,
)
from meshcar.sidecar.inbound import Inbound
from meshcar.sidecar.outbound import Outbound, live_upstreams
from meshcar.sidecar.transparent import Transparent

log = logging.getLogger("meshcar.sidecar")
_listen = serve_guarded  # its old name here, which tests/integration/test_fault_boundary.py uses


def _event(name: str, **fields: object) -> None:
    log.info(json.dumps({"event": name, **fields}, default=str))


# What a reload applies live (the inbound's allow list and policies; the outbound's upstreams,
# but for listeners, splits and egress); every other key that changed keeps its running value
# until a restart, and the reload says so (docs/CONFIG.md).
LIVE_KEYS = ("allow", "policies", "upstreams", "splits", "egress", "egress_proxy")


class Sidecar:
    def __init__(
        self, cfg: SidecarConfig, worker: Worker | None = None, source: Path | None = None
    ) -> None:
        """`worker`: this process is one of `workers: N` (net/workers.py); None: the only one.
        `source`: the config file, read again on SIGHUP (common/reload.py)."""
        self.cfg = cfg
        self.worker = worker
        self.metrics = Metrics()
        ident = cfg.identity
        self.metrics.identity = ident.spiffe_id  # meshcar_certificate_expiry_seconds{identity}
        self.store, self.rotator = credential_source(ident, worker, self.metrics)
        self.inbound = Inbound(cfg, self.store, self.metrics)
        self.outbound = Outbound(cfg, self.store, self.metrics)
        self.shell = Shell("sidecar", cfg.drain_seconds)
        self.reloader = Reloader(
            "sidecar", source, load_config, self.prepare_reload, self.metrics.registry
        )
        self.shell.on_reload = self.reloader.reload
        self._traffic: tuple[trio.Nursery, trio.Nursery] | None = None  # (listeners, conns)
        self._fixed: dict[str, trio.CancelScope] = {}  # upstream -> its local_port listener

    def prepare_reload(self, new: SidecarConfig) -> Prepared:
        """The reload of `new` (validated): the live keys' objects built; the rest named."""
        keys = [f.name for f in dataclasses.fields(SidecarConfig) if f.name not in LIVE_KEYS]
        restart = restart_keys(self.cfg, new, keys)
        ports = self._traffic is not None  # fixed ports opened and closed live
        upstreams, listeners = live_upstreams(self.cfg.upstreams, new.upstreams, ports)
        live = {k: getattr(new, k) for k in LIVE_KEYS}
        effective = dataclasses.replace(self.cfg, **{**live, "upstreams": upstreams})
        swap_inbound = self.inbound.reconfigure(effective)
        swap_outbound, after = self.outbound.reconfigure(effective)  # last: nothing raises after

        restart += listeners
        close, opens = self._fixed_changes(upstreams)

        def commit() -> None:
            self.cfg = effective
            swap_inbound()
            swap_outbound()
            for name in close:  # stops accepting; its connections go on in `conns`
                self._fixed.pop(name).cancel()

        async def cleanup() -> None:
            await after()
            for up in opens:  # a port that cannot be bound: named, the rest still applies
                try:
                    await self._open_fixed(up)
                except* OSError as group:  # raised in the listener's nursery: a group
                    restart.append(f"outbound.upstreams.{up.name}.local_port")
                    error = str(group.exceptions[0])
                    _event("sidecar.config.listen_failed", upstream=up.name, error=error)

        return Prepared(commit, restart, cleanup)

    def _fixed_changes(self, upstreams: tuple[Upstream, ...]) -> tuple[list[str], list[Upstream]]:
        """A reload's fixed-port listeners (http upstreams' `local_port`): those to close,
        those to open."""
        want = {u.name: u for u in upstreams if u.protocol == "http" and u.local_port}
        running = {  # a protocol: tcp upstream's listener stays (restart-only)
            u.name: u.local_port
            for u in self.cfg.upstreams
            if u.protocol == "http" and u.name in self._fixed
        }
        close = [n for n, port in running.items() if n not in want or want[n].local_port != port]
        opens = [u for n, u in want.items() if n in close or n not in running]
        return close, opens

    async def _open_fixed(self, up: Upstream) -> None:
        """Serve upstream `up`'s `local_port` in the traffic nursery, in a scope of its own
        (a reload that removes it cancels that scope)."""
        assert self._traffic is not None and up.local_port is not None
        ln, conns = self._traffic
        scope = trio.CancelScope()
        where = HostPort("127.0.0.1", up.local_port)
        handler = partial(self.outbound.handle_connection, fixed=up.name)
        reuse = self.worker is not None

        async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                async with trio.open_nursery() as n:
                    await serve_guarded(
                        n, handler, where, conns, "outbound", self.metrics, reuse_port=reuse
                    )
                    task_status.started()

        await ln.start(serve)
        self._fixed[up.name] = scope

    # -- admin hooks -----------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """This process's readiness and, on worker 0 of N, every other worker's."""
        return with_workers(self.worker_ready(), self.worker)

    def worker_ready(self) -> tuple[bool, str]:
        if self.store.credential is None:
            why = self.rotator.reason  # e.g. "bootstrap failed: CA unreachable: ..."
            return False, "no certificate yet" + ("" if why == "no certificate yet" else f": {why}")
        if not self.store.is_valid_now():
            return False, f"certificate expired and not yet renewed ({self.rotator.reason})"
        problem = self.shell.not_ready()
        return (False, problem) if problem else (True, "ok")

    def certs(self) -> dict:
        cred = self.store.credential
        if cred is None:
            return {"spiffe_id": self.cfg.identity.spiffe_id, "certificate": None}
        return {
            "spiffe_id": cred.spiffe_id,
            "serial": cred.serial_hex,
            "not_before": cred.not_before.isoformat(),
            "not_after": cred.not_after.isoformat(),
            "next_renewal": self.rotator.next_renewal.isoformat()
            if self.rotator.next_renewal
            else None,
            "bundle_version": cred.bundle_version,
            "state": self.rotator.state,
            "reason": self.rotator.reason,
            "expires_in_seconds": round((cred.not_after - dt.datetime.now(dt.UTC)).total_seconds()),
        }

    async def renew(self) -> dict:
        before = self.store.credential.serial_hex if self.store.credential else None
        if not isinstance(self.rotator, Rotator):  # not reached: only worker 0 serves admin
            return {"renewed": False, "error": "worker 0 renews", "serial": before}
        try:
            how = await self.rotator.renew_on_request()  # counted; reschedules the loop
        except CAError as exc:
            return {"renewed": False, "error": str(exc), "serial": before}
        return {"renewed": True, "how": how, "previous_serial": before, **self.certs()}

    def shutdown(self) -> None:
        if self.worker is not None:  # drain every worker: the parent forwards SIGTERM
            self.worker.ask_parent_to_stop()
        else:
            self.shell.stop_soon()

    # -- run ---------------------------------------------------------------------------------

    async def run(
        self,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
        *,
        handle_signals: bool = True,
    ) -> None:
        """Serve until cancelled, a signal (if `handle_signals`) or POST /shutdown drains us."""
        await self.shell.run(
            self._start, cleanup=self._close, handle_signals=handle_signals, task_status=task_status
        )

    async def _close(self) -> None:
        await self.inbound.aclose()
        await self.outbound.aclose()

    async def _start(self, shell: Shell) -> None:
        cfg = self.cfg
        services, conns = shell.services, shell.conns
        await self._start_admin(shell)
        services.start_soon(accesslog.flush_loop)
        if cfg.reload_watch_seconds:  # the config file polled (common/reload.py)
            services.start_soon(self.reloader.watch_loop, cfg.reload_watch_seconds)
        await services.start(self.rotator.run)  # returns once a certificate is installed
        if isinstance(self.rotator, Rotator):
            services.start_soon(self.rotator.bundle_loop, cfg.identity.bundle_refresh_seconds)
        await shell.serve_traffic(partial(self._serve_mesh, conns))
        _event(
            "sidecar.ready",
            spiffe_id=cfg.identity.spiffe_id,
            inbound=str(cfg.inbound_listen),
            outbound=str(cfg.outbound_listen) if cfg.outbound_listen else None,
        )

    async def _start_admin(self, shell: Shell) -> None:
        """The admin listener. With `workers: N` worker 0 serves it, its /metrics merging
        every worker's; the others serve theirs on a loopback port for it (admin/workers.py)."""
        cfg, worker = self.cfg, self.worker
        hooks = AdminHooks(self.ready, self.certs, self.renew, self.shutdown)
        hooks.explain = self.inbound.explain  # GET /authz/explain (loopback only)
        hooks.config_status = self.reloader.status  # GET /config/status (loopback only)
        where = await start_admin(
            shell,
            worker,
            self.metrics,
            hooks,
            cfg.admin_listen,
            cfg.admin_public_paths,
            lambda: self.worker_ready()[0],
        )
        if worker is None or worker.leader:
            _event("sidecar.admin_listening", listen=str(where))

    @property
    def listening(self) -> bool:
        return self.shell.listening

    async def _serve_mesh(self, conns: trio.Nursery, ln: trio.Nursery) -> None:
        """The traffic listeners (the shell runs them in the scope a drain cancels)."""
        cfg = self.cfg
        self.inbound.drain = self.outbound.drain = self.shell.drain
        listen = partial(serve_guarded, reuse_port=self.worker is not None)
        await listen(
            ln, self.inbound.handle_connection, cfg.inbound_listen, conns, "inbound", self.metrics
        )
        if cfg.outbound_listen is not None:
            await listen(
                ln,
                self.outbound.handle_connection,
                cfg.outbound_listen,
                conns,
                "outbound",
                self.metrics,
            )
        if cfg.transparent_listen is not None:
            await listen(
                ln,
                Transparent(cfg, self.outbound).handle_connection,
                cfg.transparent_listen,
                conns,
                "transparent",
                self.metrics,
            )
        self._traffic = (ln, conns)
        for up in cfg.upstreams:
            if up.local_port is not None:
                await self._open_fixed(up)

    async def drain(self, grace: float | None = None) -> None:
        """Stop accepting, let requests in flight finish (up to `grace` s, default
        drain_seconds), then stop."""
        await self.shell.stop(grace)


def first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meshcar sidecar", description="Run a meshcar sidecar.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="YAML config file (docs/CONFIG.md)")
    src.add_argument(
        "--config-env", metavar="VAR", help="read the YAML config from this env variable"
    )
    args = parser.parse_args(argv)
    try:
        if args.config is not None:
            cfg = load_config(args.config)
        else:
            text = os.environ.get(args.config_env)
            if text is None:
                raise ConfigError([f"${args.config_env}: environment variable is not set"])
            cfg = load_config_text(text, f"${args.config_env}")
        problems = startup_problems(identity_files(cfg.identity), cfg.identity)
        if problems:  # every missing file at once, not one per restart
            source = args.config if args.config is not None else f"${args.config_env}"
            raise ConfigError([f"{source}: {p}" for p in problems])
    except ConfigError as exc:
        print(f"meshcar sidecar: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    accesslog.configure(cfg.access_log_fields)
    source = args.config  # None with --config-env: a reload has nothing to read again
    if cfg.workers == 1:
        return run_process("sidecar", Sidecar(cfg, source=source).run)
    return run_workers(
        "sidecar", cfg.workers, lambda w: run_process("sidecar", Sidecar(cfg, w, source).run)
    )
