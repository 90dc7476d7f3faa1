"""`workers: N`: N single-threaded worker processes of one role, each binding the traffic
listeners itself with SO_REUSEPORT, under a small parent that forwards signals and restarts.

Theory of operation: with `workers: 1` (the default) none of this runs; the role is the
process, as before. With N > 1 the role's `main` calls `run_workers(name, n, work)` after
the config was checked: the parent blocks SIGTERM, SIGINT and SIGCHLD, forks N workers and
then only waits for signals (`sigtimedwait`, no trio, no sockets). Each worker unblocks the
signals, puts itself in its own process group (a terminal's Ctrl-C reaches the parent only,
which forwards it once), asks the kernel for SIGTERM if the parent dies (PR_SET_PDEATHSIG)
and runs `work(worker)`: the role under its usual shell (net/shell.py), which exits with the
usual codes. The kernel spreads new connections over the workers' listening sockets
(SO_REUSEPORT, hashed by the connection's addresses): there is no extra hop; an accepted
connection belongs to one worker for its whole life.

Signals: SIGTERM/SIGINT to the parent are forwarded to every worker (each drains as a
single process does); a second one is forwarded too (each worker then stops at once). The
parent exits 0 when every worker exited 0 after the stop, else 1. SIGHUP is forwarded to every
worker: each reloads its config itself (common/reload.py); a worker ignores SIGHUP until its
shell listens for it. A worker restarted after a crash starts with the config the parent
loaded at start, not the last one reloaded (send SIGHUP again).

A worker that dies while the role was not stopping: if it had been ready once, it is
restarted after a back-off (0.5 s, doubling to 30 s; back to 0.5 s once a worker stayed up
60 s) and `<role>.worker_exited` / `<role>.worker_restarting` are logged. If it died
before it was ever ready (a port in use, a bug at start), restarting would only repeat the
failure: the parent stops the other workers and exits with that worker's code (1).

`Board`: a shared anonymous mapping made before the fork, one slot per worker (pid, ready,
ever ready, heartbeat on CLOCK_MONOTONIC, which all processes share). Every worker
publishes its own readiness twice a second; worker 0, the only one serving the admin
listener, reads the others' slots so its /ready is true only when every worker is ready.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

MAX_WORKERS = 64
STALE_SECONDS = 3.0  # a worker whose heartbeat is older than this is not ready
PUBLISH_SECONDS = 0.5
LINGER_POLL_SECONDS = 0.05
BACKOFF_FIRST, BACKOFF_CAP, BACKOFF_RESET_AFTER = 0.5, 30.0, 60.0
_SLOT = struct.Struct("<iBBHd")  # pid, ready, ever_ready, admin port, heartbeat (monotonic s)
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP}
_PR_SET_PDEATHSIG = 1


def cpu_count() -> int:
    """CPUs this process may run on (`workers: auto`)."""
    try:
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    except (AttributeError, OSError):
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


class Board:
    """Per-worker readiness shared between the processes of one role (module docstring)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._mem = mmap.mmap(-1, _SLOT.size * count)  # MAP_SHARED | MAP_ANONYMOUS

    def publish(self, index: int, ready: bool, admin_port: int = 0) -> None:
        _, _, ever, _, _ = self._read(index)
        _SLOT.pack_into(
            self._mem,
            index * _SLOT.size,
            os.getpid(),
            int(ready),
            int(ready or ever),
            admin_port,
            time.monotonic(),
        )

    def clear(self, index: int, keep_ever: bool = True) -> None:
        """The worker is gone (called by the parent)."""
        ever = self._read(index)[2] if keep_ever else 0
        _SLOT.pack_into(self._mem, index * _SLOT.size, 0, 0, ever, 0, 0.0)

    def _read(self, index: int) -> tuple[int, int, int, int, float]:
        return _SLOT.unpack_from(self._mem, index * _SLOT.size)

    def others_running(self, skip: int) -> bool:
        return any(self._read(i)[0] for i in range(self.count) if i != skip)

    def admin_ports(self, skip: int | None = None) -> dict[int, int]:
        """The loopback admin ports the running workers (but `skip`) published."""
        out = {}
        for i in range(self.count):
            pid, _, _, port, _ = self._read(i)
            if i != skip and pid and port:
                out[i] = port
        return out

    def pid(self, index: int) -> int:
        return self._read(index)[0]

    def ever_ready(self, index: int) -> bool:
        return bool(self._read(index)[2])

    def not_ready(self, skip: int | None = None) -> str | None:
        """Why not every worker (but `skip`) is ready, or None."""
        now = time.monotonic()
        for i in range(self.count):
            if i == skip:
                continue
            pid, ready, _, _, beat = self._read(i)
            if not pid:
                return f"worker {i} not running"
            if not ready:
                return f"worker {i} not ready"
            if now - beat > STALE_SECONDS:
                return f"worker {i} not responding"
        return None


@dataclass(frozen=True)
class Worker:
    """What a worker process knows of its place among the role's workers."""

    index: int
    count: int
    parent_pid: int
    board: Board

    @property
    def leader(self) -> bool:
        """Worker 0 serves the admin listener and owns the identity (CA calls)."""
        return self.index == 0

    def ask_parent_to_stop(self) -> None:
        """POST /shutdown on worker 0 drains every worker, through the parent."""
        os.kill(self.parent_pid, signal.SIGTERM)

    def others_not_ready(self) -> str | None:
        return self.board.not_ready(skip=self.index)

    def others_admin_ports(self) -> dict[int, int]:
        return self.board.admin_ports(skip=self.index)

    async def others_gone(self) -> None:
        """Return once every other worker has exited (the parent clears their slots): worker
        0 keeps the admin listener, /ready 503 `draining`, until the last worker stopped."""
        while self.board.others_running(self.index):
            await trio.sleep(LINGER_POLL_SECONDS)

    async def publish_loop(self, ready: Callable[[], bool], admin_port: int = 0) -> None:
        """Publish this worker's readiness (and its loopback admin port) until cancelled."""
        while True:
            self.board.publish(self.index, ready(), admin_port)
            await trio.sleep(PUBLISH_SECONDS)


async def open_reuseport_listeners(
    port: int, host: str | None, backlog: int = 0xFFFF
) -> list[trio.SocketListener]:
    """`trio.open_tcp_listeners`, with SO_REUSEPORT set before bind on every socket."""
    infos = await trio.socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, type_, proto, _, addr in infos:
            sock = trio.socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(addr)
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for ln in listeners:
            await ln.aclose()
        raise
    return listeners


# -- the parent ------------------------------------------------------------------------------


class _Parent:
    def __init__(self, name: str, count: int, work: Callable[[Worker], int]) -> None:
        self.name = name
        self.count = count
        self.work = work
        self.board = Board(count)
        self.log = logging.getLogger(f"meshcar.{name}")
        self.pids: dict[int, int] = {}  # pid -> worker index
        self.started: dict[int, float] = {}  # index -> monotonic start
        self.backoff = dict.fromkeys(range(count), BACKOFF_FIRST)
        self.restart_at: dict[int, float] = {}
        self.stopping = False
        self.code = 0
        self.mask: set[int] = set()

    def event(self, name: str, level: int = logging.INFO, **fields: object) -> None:
        self.log.log(level, json.dumps({"event": f"{self.name}.{name}", **fields}, default=str))

    def spawn(self, index: int) -> None:
        _flush()
        pid = os.fork()
        if pid == 0:
            self._child(index)  # never returns
        self.pids[pid] = index
        self.started[index] = time.monotonic()
        self.event("worker_started", worker=index, pid=pid)

    def _child(self, index: int) -> None:
        code = 1
        try:
            parent = os.getppid()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            # a SIGHUP before the worker's shell listens for it must not kill it (the default
            # action): ignored until then (net/shell.py opens its receiver first thing)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
            os.setpgid(0, 0)
            _parent_death_signal(signal.SIGTERM)
            if os.getppid() != parent:  # the parent died before the line above
                os._exit(1)
            code = self.work(Worker(index, self.count, parent, self.board))
        except BaseException as exc:  # noqa: BLE001 - a worker never returns into the parent
            print(f"meshcar {self.name} worker {index}: {exc!r}", file=sys.stderr)
        finally:
            _flush()
            os._exit(code)

    def forward(self, sig: int) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def reload(self) -> None:
        """SIGHUP: forwarded to every worker; each reloads its config itself (a worker still
        starting, before its shell listens, ignores it)."""
        self.event("workers_reloading", workers=len(self.pids))
        self.forward(signal.SIGHUP)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if not self.stopping:
            self.stopping = True
            self.restart_at.clear()
            self.event("workers_stopping", signal=signal.Signals(sig).name, workers=len(self.pids))
        self.forward(sig)

    def reap(self) -> None:
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.pids.pop(pid, None)
            if index is not None:
                self.exited(index, pid, os.waitstatus_to_exitcode(status))

    def exited(self, index: int, pid: int, code: int) -> None:
        ever = self.board.ever_ready(index)
        self.board.clear(index)
        level = logging.INFO if self.stopping and code == 0 else logging.WARNING
        self.event("worker_exited", level, worker=index, pid=pid, code=code)
        if self.stopping:
            if code != 0:
                self.code = 1
            return
        if not ever:  # failed at start: restarting would repeat it
            self.event(
                "workers_failed",
                logging.ERROR,
                worker=index,
                code=code,
                reason="a worker exited before it was ever ready",
            )
            self.code = code if code > 0 else 1
            self.stop()
            return
        now = time.monotonic()
        if now - self.started.get(index, now) >= BACKOFF_RESET_AFTER:
            self.backoff[index] = BACKOFF_FIRST
        delay = self.backoff[index]
        self.backoff[index] = min(BACKOFF_CAP, delay * 2)
        self.restart_at[index] = now + delay
        self.event("worker_restarting", logging.WARNING, worker=index, in_seconds=delay)

    def restart_due(self) -> None:
        now = time.monotonic()
        for index, when in sorted(self.restart_at.items()):
            if when <= now:
                del self.restart_at[index]
                self.spawn(index)

    def run(self) -> int:
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # queued while blocked, never ignored
        self.event("workers_starting", workers=self.count, pid=os.getpid())
        for index in range(self.count):
            self.spawn(index)
        while self.pids or self.restart_at:
            timeout = None
            if self.restart_at:
                timeout = max(0.0, min(self.restart_at.values()) - time.monotonic())
            info = (
                signal.sigtimedwait(_SIGNALS, timeout)
                if timeout is not None
                else signal.sigwaitinfo(_SIGNALS)
            )
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                self.stop(info.si_signo)
            elif info is not None and info.si_signo == signal.SIGHUP and not self.stopping:
                self.reload()
            self.reap()
            if not self.stopping:
                self.restart_due()
        self.event("workers_stopped", code=self.code)
        return self.code


def run_workers(name: str, count: int, work: Callable[[Worker], int]) -> int:
    """Run `work(worker)` in `count` forked processes until stopped; the exit code."""
    return _Parent(name, count, work).run()


def _parent_death_signal(sig: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: orphans drain when stopped by hand
        pass


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
