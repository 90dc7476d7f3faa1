"""Graceful draining: count requests in flight and let a process wait for them to finish."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


class Drain:
    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self._idle = trio.Event()
        self._idle.set()

    @contextmanager
    def track(self) -> Iterator[None]:
        self.in_flight += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        while self.in_flight:
            await self._idle.wait()
