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
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from meshcar.net.httpconn import HttpConn


@dataclass
class Pooled:
    conn: HttpConn
    key: str
    endpoint: Any  # what was dialed (host:port value)
    peer: Any = None  # the verified peer identity, for TLS connections
    idle_since: float = 0.0
    requests: int = 0


@dataclass
class _Stack:
    idle: list[Pooled] = field(default_factory=list)


class Pool:
    """Generic keyed pool; `dial(key)` makes a new connection."""

    def __init__(self, dial: Callable[[str], Awaitable[Pooled]], *, max_idle: int = 64,
                 idle_timeout: float = 30.0) -> None:
        self._dial = dial
        self._stacks: dict[str, _Stack] = {}
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.retired = False  # once set, connections are closed after use, never kept

    async def acquire(self, key: str) -> tuple[Pooled, bool]:
        stack = self._stacks.setdefault(key, _Stack())
        now = time.monotonic()
        while stack.idle:
            p = stack.idle.pop()
            # Bytes or EOF that arrived while it sat idle are nobody's response: close it.
            if now - p.idle_since < self.idle_timeout and p.conn.clean_idle():
                return p, True
            await p.conn.aclose()
        return await self._dial(key), False

    def idle_count(self, key: str | None = None) -> int:
        """Idle connections held, for one key or all."""
        stacks = [self._stacks.get(key, _Stack())] if key is not None else list(self._stacks.values())
        return sum(len(s.idle) for s in stacks)

    async def release(self, p: Pooled, reusable: bool) -> None:
        stack = self._stacks.setdefault(p.key, _Stack())
        if (reusable and not self.retired and len(stack.idle) < self.max_idle
                and p.conn.clean_idle()):
            p.idle_since = time.monotonic()
            p.requests += 1
            stack.idle.append(p)
        else:
            await p.conn.aclose()

    async def retire(self) -> None:
        """Close idle connections now and every busy one when its request is done."""
        self.retired = True
        await self.close_all()

    async def close_all(self) -> None:
        for stack in self._stacks.values():
            while stack.idle:
                await stack.idle.pop().conn.aclose()
        self._stacks.clear()


