"""The process shell: root nursery, readiness, signals -> drain -> exit code, for every role.

Theory of operation: `Shell.run(start)` opens the root cancel scope and two nurseries, the
connection handlers' (`conns`) outside the services' (`services`: listeners, loops), and
awaits `start(shell)`, which starts the role's admin listener, loops and, last, its traffic
listeners through `serve_traffic`. Those run in a cancel scope of their own, with their
connections in `conns`, so stopping them closes the listening sockets (new connections are
refused) while accepted connections go on.

Stopping (`stop`): the first SIGTERM or SIGINT (or the role's /shutdown, or `meshcar run`
when its app exits) marks the process draining (`not_ready` says so: /ready turns false),
closes the traffic listeners, waits up to `drain_seconds` for the requests in flight
(counted by `drain`, a `net.drain.Drain` the role's HTTP loops enter per request; a
keep-alive connection is closed after the request it is serving) and then cancels
everything left. A second signal while draining cancels everything at once.

SIGHUP never stops the process: it calls the role's `on_reload` (common/reload.py: the config
file read again, validated whole, swapped in or rejected with the reason).

Exit codes (`run_process`): 0 after a signal or a drain, whether or not requests had to be
cut off at the deadline (the `<role>.drained` line counts them); 1 on a fatal error: an
`OSError` (a port in use, an unreadable file) as one line on stderr, anything else (a bug)
logged as one JSON line with its traceback. The roles exit 2 on configuration errors before
the shell starts.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable

import trio

from meshcar.net.drain import Drain

Start = Callable[["Shell"], Awaitable[None]]


class Shell:
    def __init__(self, name: str, drain_seconds: float = 10.0) -> None:
        self.name = name
        self.drain_seconds = drain_seconds
        self.drain = Drain()  # requests in flight; `draining` once stopping began
        self.listening = False  # the traffic listeners are bound
        self.log = logging.getLogger(f"meshcar.{name}")
        self._services: trio.Nursery | None = None
        self._conns: trio.Nursery | None = None
        self._root: trio.CancelScope | None = None
        self._traffic: trio.CancelScope | None = None
        # awaited after the requests in flight, within the same grace: with `workers: N`,
        # worker 0 (the admin listener) waits there for the other workers to be gone
        self.linger: Callable[[], Awaitable[None]] | None = None
        # SIGHUP: the role's config reload (common/reload.py); None: logged and ignored
        self.on_reload: Callable[[str], Awaitable[object]] | None = None

    def event(self, name: str, level: int = logging.INFO, **fields: object) -> None:
        self.log.log(level, json.dumps({"event": f"{self.name}.{name}", **fields}, default=str))

    @property
    def services(self) -> trio.Nursery:
        assert self._services is not None, "the shell is not running"
        return self._services

    @property
    def conns(self) -> trio.Nursery:
        """The nursery connection handlers run in (outside the listeners' cancel scope)."""
        assert self._conns is not None, "the shell is not running"
        return self._conns

    def not_ready(self) -> str | None:
        """Why /ready must say false as far as the shell knows, or None."""
        if self.drain.draining:
            return "draining"
        if not self.listening:
            return "listeners not started"
        return None

    # -- run ---------------------------------------------------------------------------------

    async def run(
        self,
        start: Start,
        *,
        cleanup: Callable[[], Awaitable[None]] | None = None,
        handle_signals: bool = True,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until stopped or cancelled; started once `start` returned. `cleanup` runs
        last, shielded (close pools)."""
        with trio.CancelScope() as self._root:
            try:
                async with trio.open_nursery() as conns:
                    async with trio.open_nursery() as services:
                        self._conns, self._services = conns, services
                        if handle_signals:
                            await services.start(self._on_signals)
                        await start(self)
                        task_status.started()
            finally:
                if cleanup is not None:
                    with trio.CancelScope(shield=True):
                        await cleanup()

    async def serve_traffic(
        self, open_listeners: Callable[[trio.Nursery], Awaitable[object]]
    ) -> None:
        """`await open_listeners(nursery)` binds the traffic listeners (each started in
        `nursery`, handlers in `conns`); `stop` cancels them alone."""
        await self.services.start(self._serve_traffic, open_listeners)
        self.listening = True

    async def _serve_traffic(
        self,
        open_listeners: Callable[[trio.Nursery], Awaitable[object]],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as self._traffic:
            if self.drain.draining:  # stopped while starting
                self._traffic.cancel()
            async with trio.open_nursery() as listeners:
                await open_listeners(listeners)
                task_status.started()

    # -- stop --------------------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let requests in flight finish (up to `grace`, default
        `drain_seconds`), then cancel everything."""
        if self.drain.draining:
            return
        grace = self.drain_seconds if grace is None else grace
        self.drain.draining = True
        self.event("draining", in_flight=self.drain.in_flight, grace_seconds=grace)
        if self._traffic is not None:
            self._traffic.cancel()
        with trio.move_on_after(grace):
            await self.drain.wait_idle()
            if self.linger is not None:
                await self.linger()
        self.event("drained", cut_off=self.drain.in_flight)
        self.exit_now()

    def stop_soon(self, grace: float | None = None) -> None:
        """`stop` from synchronous code (an admin /shutdown hook)."""
        if self._services is not None:
            self._services.start_soon(self.stop, grace)

    def exit_now(self) -> None:
        if self._root is not None:
            self._root.cancel()

    async def _on_signals(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for sig in signals:
                name = signal.Signals(sig).name
                if sig == signal.SIGHUP:
                    self._reload_soon()
                elif not self.drain.draining:
                    self.event("stopping", signal=name)
                    self.services.start_soon(self.stop)
                else:
                    self.event(
                        "exiting",
                        signal=name,
                        in_flight=self.drain.in_flight,
                        reason="second signal while draining",
                    )
                    self.exit_now()
                    return

    def _reload_soon(self) -> None:
        """SIGHUP: reload the config (never stops the process); one reload at a time is the
        reloader's business."""
        if self.drain.draining:
            self.event("reload_ignored", reason="draining")
        elif self.on_reload is None:
            self.event("reload_ignored", logging.WARNING, reason="this process cannot reload")
        else:
            self.services.start_soon(self.on_reload, "SIGHUP")


def first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def run_process(name: str, main: Callable[[], Awaitable[None]]) -> int:
    """`trio.run(main)` as a process: its exit code (module docstring)."""
    log = logging.getLogger(f"meshcar.{name}")
    try:
        trio.run(main)
    except (Exception, BaseExceptionGroup, KeyboardInterrupt) as exc:
        err = first_leaf(exc)
        if isinstance(err, KeyboardInterrupt):  # SIGINT before the shell's handler was set
            pass
        elif isinstance(err, OSError):
            print(f"meshcar {name}: {err}", file=sys.stderr)
            return 1
        else:
            log.critical(
                json.dumps(
                    {
                        "event": f"{name}.fatal",
                        "error": f"{type(err).__name__}: {err}",
                        "traceback": "".join(traceback.format_exception(err)),
                    }
                )
            )
            print(
                f"meshcar {name}: fatal error: {type(err).__name__}: {err} (traceback in the log)",
                file=sys.stderr,
            )
            return 1
    log.info(json.dumps({"event": f"{name}.stopped"}))
    return 0
