"""What the roles (sidecar, edge) serve the same way: a guarded plain TCP listener, the admin
listener with its `workers: N` part (admin/workers.py), and readiness across the workers."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import trio

from meshcar.admin.metrics import Metrics
from meshcar.admin.server import AdminHooks, AdminServer
from meshcar.admin.workers import merged_metrics
from meshcar.common.config import HostPort
from meshcar.net.guard import Handler, guarded
from meshcar.net.shell import Shell
from meshcar.net.workers import Worker, open_reuseport_listeners


async def serve_guarded(
    nursery: trio.Nursery,
    handler: Handler,
    where: HostPort,
    conns: trio.Nursery,
    name: str,
    metrics: Metrics,
    *,
    reuse_port: bool = False,
) -> list[trio.SocketListener]:
    """Serve `where`; every connection runs in `conns` inside its own fault boundary
    (net/guard.py). `reuse_port`: one of `workers: N`, sharing the port with the others."""
    if reuse_port:
        listeners = await open_reuseport_listeners(where.port, where.host)
    else:
        listeners = await trio.open_tcp_listeners(where.port, host=where.host)
    safe = guarded(handler, name, metrics.count_connection_error)
    return await nursery.start(
        partial(trio.serve_listeners, safe, listeners, handler_nursery=conns)
    )


async def start_admin(
    shell: Shell,
    worker: Worker | None,
    metrics: Metrics,
    hooks: AdminHooks,
    listen: HostPort,
    public_paths: frozenset[bytes],
    worker_ready: Callable[[], bool],
) -> HostPort:
    """The admin listener on `listen`; returns where it listens. With `workers: N` worker 0
    serves it, its /metrics merging every worker's; the others serve theirs on a loopback
    port for it, and each publishes its readiness (`worker_ready`) and that port."""
    where = listen
    if worker is not None and worker.leader:
        hooks.metrics = merged_metrics(metrics.render, worker.others_admin_ports)
        shell.linger = worker.others_gone
    elif worker is not None:
        where = HostPort("127.0.0.1", 0)
    admin = AdminServer(metrics, hooks, public_paths)
    listeners = await serve_guarded(
        shell.services, admin.handle_connection, where, shell.conns, "admin", metrics
    )
    if worker is not None:
        port = 0 if worker.leader else listeners[0].socket.getsockname()[1]
        shell.services.start_soon(worker.publish_loop, worker_ready, port)
    return where


def with_workers(own: tuple[bool, str], worker: Worker | None) -> tuple[bool, str]:
    """A process's readiness `own` (ready, why) and, on worker 0 of N, every other worker's."""
    ok, why = own
    if ok and worker is not None:
        problem = worker.others_not_ready()
        if problem:
            return False, problem
    return ok, why
