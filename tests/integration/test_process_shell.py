"""The process shell (meshcar/net/shell.py) in-process: real signals to this process, a real
listener; and `run_process`'s exit codes."""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from meshcar.net.shell import Shell, run_process


async def _idle(stream: trio.SocketStream) -> None:
    await trio.sleep_forever()


async def _held_request(shell: Shell, release: trio.Event, outcome: list[str]) -> None:
    with shell.drain:
        try:
            await release.wait()
            outcome.append("completed")
        except trio.Cancelled:
            outcome.append("cancelled")
            raise


@dataclass
class Held:
    """A shell serving one idle traffic listener (`ports[0]`) and one request in flight that
    ends when `release` is set; `outcome` says how it ended."""

    shell: Shell
    release: trio.Event = field(default_factory=trio.Event)
    outcome: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)

    async def _start(self, shell: Shell) -> None:
        async def listeners(ln: trio.Nursery) -> None:
            bound = await ln.start(
                partial(trio.serve_tcp, _idle, 0, host="127.0.0.1", handler_nursery=shell.conns)
            )
            self.ports.append(bound[0].socket.getsockname()[1])

        await shell.serve_traffic(listeners)
        shell.conns.start_soon(_held_request, shell, self.release, self.outcome)

    async def run(self, nursery: trio.Nursery, **kwargs: Any) -> None:
        """`Shell.run` in `nursery` (with `kwargs`), returning once it has started."""
        await nursery.start(partial(self.shell.run, self._start, **kwargs))


async def test_first_signal_drains_then_exits() -> None:
    held = Held(Shell("test", drain_seconds=3600))
    shell, release, outcome, ports = held.shell, held.release, held.outcome, held.ports
    async with trio.open_nursery() as nursery:
        await held.run(nursery)
        assert shell.not_ready() is None
        os.kill(os.getpid(), signal.SIGTERM)
        while not shell.drain.draining:
            await trio.testing.wait_all_tasks_blocked()
        await trio.testing.wait_all_tasks_blocked()
        assert shell.not_ready() == "draining" and outcome == []  # the request is still running
        with pytest.raises(OSError):  # the traffic listener is closed
            await trio.open_tcp_stream("127.0.0.1", ports[0])
        release.set()
    assert outcome == ["completed"]


async def test_second_signal_exits_at_once() -> None:
    held = Held(Shell("test", drain_seconds=3600))
    shell, outcome = held.shell, held.outcome
    async with trio.open_nursery() as nursery:
        await held.run(nursery)
        os.kill(os.getpid(), signal.SIGTERM)
        while not shell.drain.draining:
            await trio.testing.wait_all_tasks_blocked()
        os.kill(os.getpid(), signal.SIGINT)
    assert outcome == ["cancelled"]


async def test_drain_deadline_cuts_off_and_cleanup_runs() -> None:
    held = Held(Shell("test", drain_seconds=0))
    cleaned = []

    async def cleanup() -> None:
        await trio.sleep(0)  # shielded: runs despite the cancellation
        cleaned.append(True)

    async with trio.open_nursery() as nursery:
        await held.run(nursery, cleanup=cleanup, handle_signals=False)
        held.shell.stop_soon()  # as POST /shutdown does
    assert held.outcome == ["cancelled"] and cleaned == [True]


def test_run_process_exit_codes(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    async def clean() -> None:
        await trio.sleep(0)

    async def port_in_use() -> None:
        raise OSError(98, "Address already in use")

    async def bug() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(trio.sleep_forever)
            raise KeyError("boom")

    caplog.set_level(logging.INFO)
    assert run_process("test", clean) == 0
    assert run_process("test", port_in_use) == 1
    assert "meshcar test: [Errno 98] Address already in use" in capsys.readouterr().err
    assert run_process("test", bug) == 1
    err = capsys.readouterr().err
    assert err.startswith("meshcar test: fatal error: KeyError: 'boom'") and "Traceback" not in err
    fatal = [json.loads(r.getMessage()) for r in caplog.records if "test.fatal" in r.getMessage()]
    assert (
        len(fatal) == 1
        and "Traceback" in fatal[0]["traceback"]
        and "raise KeyError" in fatal[0]["traceback"]
    )
