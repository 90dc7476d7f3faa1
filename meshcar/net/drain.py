"""Graceful draining: count requests in flight and let a process wait for them to finish."""

from __future__ import annotations

import trio


class Drain:
    """`with drain:` around each request; `await wait_idle()` when stopping."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self._idle: trio.Event | None = None

    def __enter__(self) -> Drain:
        self.in_flight += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def wait_idle(self) -> None:
        while self.in_flight:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()
