"""A keyed keep-alive connection pool, independent of how connections are dialed.

Bookkeeping is deliberately small: per key, a LIFO stack of idle connections with the time
they went idle. `acquire` hands out the most recently used idle connection younger than
`idle_timeout`, else dials a new one; `release` puts a reusable connection back (up to
`max_idle` per key) or closes it.

Hygiene: a connection goes back only when its exchange is provably complete and nothing
unread waits on it (`HttpConn.clean_idle`: parser leftovers, buffered events, bytes in the
TLS object or the socket), and it is checked again, without blocking, when handed out: a
byte or EOF that arrived while it was idle closes it. Otherwise a backend that writes
after its response would have those bytes read as the next client's response.

Limits: at most `max_connections` open connections (idle and busy) per group of keys
(`group(key)`: an upstream, a route's backend cluster). At the limit an idle connection of
the group under another key is closed to make room; if there is none, `acquire` raises
UpstreamError 503 "upstream connection limit" and calls `on_refused(group)`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from meshcar.errors import CircuitOpen
from meshcar.net.httpconn import HttpConn


@dataclass
class Pooled:
    conn: HttpConn
    key: str
    endpoint: Any  # what was dialed (host:port value)
    peer: Any = None  # the verified peer identity, for TLS connections
    idle_since: float = 0.0
    requests: int = 0
    group: str | None = None  # counted against this group's limit while open
    gen: int = 0  # the key's generation when dialed; a retired generation is never kept


@dataclass
class _Stack:
    idle: list[Pooled] = field(default_factory=list)


class Pool:
    """Generic keyed pool; `dial(key)` makes a new connection."""

    def __init__(
        self,
        dial: Callable[[str], Awaitable[Pooled]],
        *,
        max_idle: int = 64,
        idle_timeout: float = 30.0,
        max_connections: int = 1024,
        group: Callable[[str], str] = lambda key: key,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._dial = dial
        self._stacks: dict[str, _Stack] = {}
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._group = group
        self._on_refused = on_refused
        self._open: dict[str, int] = {}  # open connections per group
        self.retired = False  # once set, connections are closed after use, never kept
        self.group_limits: dict[str, int] = {}  # max_connections of some groups
        self.idle_timeouts: dict[str, float] = {}  # idle_timeout of some groups
        self._gens: dict[str, int] = {}  # key -> generation, raised by retire_keys

    async def acquire(self, key: str, *, fresh: bool = False) -> tuple[Pooled, bool]:
        """An idle connection for `key` (True) or a new one (False); `fresh`: always new."""
        stack = self._stacks.setdefault(key, _Stack())
        now = trio.current_time()  # trio's clock, like every other timeout (mock clock in tests)
        group = self._group(key)
        idle_timeout = self.idle_timeouts.get(group, self.idle_timeout)
        while stack.idle and not fresh:
            p = stack.idle.pop()
            # Bytes or EOF that arrived while it sat idle are nobody's response: close it.
            if (
                now - p.idle_since < idle_timeout
                and p.gen == self._gens.get(key, 0)
                and p.conn.clean_idle()
            ):
                return p, True
            await self.discard(p)
        limit = self.group_limits.get(group, self.max_connections)
        if self._open.get(group, 0) >= limit and not await self._make_room(group):
            if self._on_refused is not None:
                self._on_refused(group)
            raise CircuitOpen(f"upstream connection limit ({limit}) reached")
        self._open[group] = self._open.get(group, 0) + 1
        try:
            p = await self._dial(key)
        except BaseException:
            self._open[group] -= 1
            raise
        p.group = group
        p.gen = self._gens.get(key, 0)
        return p, False

    def open_count(self, group: str) -> int:
        return self._open.get(group, 0)

    async def _make_room(self, group: str) -> bool:
        """Close the longest-idle connection of `group` (under any key), if there is one."""
        oldest: _Stack | None = None
        for key, stack in self._stacks.items():
            if (
                stack.idle
                and self._group(key) == group
                and (oldest is None or stack.idle[0].idle_since < oldest.idle[0].idle_since)
            ):
                oldest = stack
        if oldest is None:
            return False
        await self.discard(oldest.idle.pop(0))
        return True

    async def discard(self, p: Pooled) -> None:
        """Close a connection taken from this pool (once; its slot is freed)."""
        if p.group is not None:
            self._open[p.group] -= 1
            p.group = None
        await p.conn.aclose()

    def idle_count(self, key: str | None = None) -> int:
        """Idle connections held, for one key or all."""
        stacks = (
            [self._stacks.get(key, _Stack())] if key is not None else list(self._stacks.values())
        )
        return sum(len(s.idle) for s in stacks)

    async def release(self, p: Pooled, reusable: bool) -> None:
        stack = self._stacks.setdefault(p.key, _Stack())
        if (
            reusable
            and not self.retired
            and p.gen == self._gens.get(p.key, 0)
            and len(stack.idle) < self.max_idle
            and p.conn.clean_idle()
        ):
            p.idle_since = trio.current_time()
            p.requests += 1
            stack.idle.append(p)
        else:
            await self.discard(p)

    def retire_keys(self, keys: Iterable[str]) -> None:
        """Connections of `keys` (a removed or changed upstream's, on a reload) are never
        handed out or kept again: idle ones close at `close_retired`, busy ones when their
        request is done. A connection dialed for the same key afterwards is new and kept."""
        for key in keys:
            self._gens[key] = self._gens.get(key, 0) + 1

    async def close_retired(self) -> None:
        """Close the idle connections whose key was retired."""
        for key, stack in list(self._stacks.items()):
            keep = [p for p in stack.idle if p.gen == self._gens.get(key, 0)]
            gone = [p for p in stack.idle if p.gen != self._gens.get(key, 0)]
            stack.idle = keep
            for p in gone:
                await self.discard(p)

    def keys(self) -> list[str]:
        """Every key a connection was ever asked for."""
        return list(self._stacks)

    async def retire(self) -> None:
        """Close idle connections now and every busy one when its request is done."""
        self.retired = True
        await self.close_all()

    async def close_all(self) -> None:
        for stack in self._stacks.values():
            while stack.idle:
                await self.discard(stack.idle.pop())
        self._stacks.clear()
