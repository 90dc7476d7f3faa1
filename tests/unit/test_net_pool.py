"""Pool (net/pool.py) over real socket pairs (so `clean_idle` can poll them), no TLS, on
trio's mock clock: LIFO reuse per key, idle_timeout expiry, max_idle, retire, the
per-group connection limit, and hygiene (a byte or EOF while idle closes the connection)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from meshcar.errors import UpstreamError
from meshcar.net.httpconn import HttpConn
from meshcar.net.pool import Pool, Pooled


class Dialer:
    """Dials a socketpair per connection; the test holds the far ends (`peers`)."""

    def __init__(self) -> None:
        self.peers: list[trio.SocketStream] = []
        self.mine: list[trio.SocketStream] = []
        self.fail = False

    async def __call__(self, key: str) -> Pooled:
        await trio.lowlevel.checkpoint()
        if self.fail:
            raise UpstreamError("connect refused", 502)
        a, b = trio.socket.socketpair()
        self.peers.append(trio.SocketStream(b))
        self.mine.append(trio.SocketStream(a))
        return Pooled(HttpConn(self.mine[-1], "response"), key, endpoint=key)

    async def peer_closed(self, i: int) -> bool:
        """Did the pool close connection `i`? (its far end reads EOF at once)"""
        with trio.move_on_after(0.001) as scope:  # virtual time under the mock clock
            data = await self.peers[i].receive_some(10)
        return not scope.cancelled_caught and data == b""


@pytest.fixture
async def dialer() -> AsyncIterator[Dialer]:
    d = Dialer()
    yield d
    for s in d.peers + d.mine:  # whatever a test still holds (closing twice is fine)
        await s.aclose()


async def acquire_new(pool: Pool, key: str = "k") -> Pooled:
    p, reused = await pool.acquire(key)
    assert not reused
    return p


async def test_lifo_reuse_per_key(dialer: Dialer, autojump_clock: trio.testing.MockClock) -> None:
    pool = Pool(dialer)
    a, b, c = [await acquire_new(pool) for _ in range(3)]
    other = await acquire_new(pool, "other")
    for p in (a, b, c, other):
        await pool.release(p, True)
    assert pool.idle_count("k") == 3 and pool.idle_count() == 4
    got = [await pool.acquire("k") for _ in range(3)]
    assert [p for p, _ in got] == [c, b, a] and all(
        reused for _, reused in got
    )  # most recent first
    assert (await pool.acquire("other")) == (other, True)
    assert len(dialer.peers) == 4  # nothing dialed again
    assert (await pool.acquire("k"))[1] is False  # the stack is empty: a new dial
    assert a.requests == 1


async def test_idle_timeout_expires_on_trio_clock(
    dialer: Dialer, autojump_clock: trio.testing.MockClock
) -> None:
    pool = Pool(dialer, idle_timeout=30)
    old, young = await acquire_new(pool), await acquire_new(pool)
    await pool.release(old, True)
    autojump_clock.jump(20)
    await pool.release(young, True)
    autojump_clock.jump(10.5)  # old: idle 30.5 s, young: 10.5 s
    p, reused = await pool.acquire("k")
    assert p is young and reused
    p2, reused = await pool.acquire("k")
    assert p2 is not old and not reused  # expired: closed, a new one dialed
    assert await dialer.peer_closed(0) and len(dialer.peers) == 3


async def test_max_idle_closes_the_extra(
    dialer: Dialer, autojump_clock: trio.testing.MockClock
) -> None:
    pool = Pool(dialer, max_idle=2)
    ps = [await acquire_new(pool) for _ in range(3)]
    for p in ps:
        await pool.release(p, True)
    assert pool.idle_count("k") == 2
    assert await dialer.peer_closed(2) and not await dialer.peer_closed(0)
    assert pool.open_count("k") == 2


async def test_not_reusable_is_closed(
    dialer: Dialer, autojump_clock: trio.testing.MockClock
) -> None:
    pool = Pool(dialer)
    p = await acquire_new(pool)
    await pool.release(p, False)
    assert pool.idle_count() == 0 and pool.open_count("k") == 0
    assert await dialer.peer_closed(0)


async def test_retire_closes_idle_now_and_busy_after_use(
    dialer: Dialer, autojump_clock: trio.testing.MockClock
) -> None:
    pool = Pool(dialer)
    idle, busy = await acquire_new(pool), await acquire_new(pool)
    await pool.release(idle, True)
    await pool.retire()
    assert pool.idle_count() == 0 and await dialer.peer_closed(0)
    assert not await dialer.peer_closed(1)  # the busy one finishes its request
    await pool.release(busy, True)
    assert pool.idle_count() == 0 and await dialer.peer_closed(1)
    assert pool.open_count("k") == 0


async def test_retire_keys_closes_their_idle_and_busy_after_use_and_keeps_the_rest(
    dialer: Dialer, autojump_clock: trio.testing.MockClock
) -> None:
    """A reload's retire_keys (a removed upstream's keys): its idle connection closes at
    close_retired, its busy one after its request, another key's is kept; a connection
    dialed for the retired key afterwards is kept as usual."""
    pool = Pool(dialer)
    idle, busy, other = (
        await acquire_new(pool),
        await acquire_new(pool),
        await acquire_new(pool, "o"),
    )
    await pool.release(idle, True)
    await pool.release(other, True)
    pool.retire_keys(["k"])
    await pool.close_retired()
    assert pool.idle_count("k") == 0 and await dialer.peer_closed(0)
    assert not await dialer.peer_closed(1)  # the busy one finishes its request
    await pool.release(busy, True)
    assert pool.idle_count("k") == 0 and await dialer.peer_closed(1)
    assert pool.open_count("k") == 0
    assert (await pool.acquire("o")) == (other, True) and not await dialer.peer_closed(2)
    new = await acquire_new(pool)
    await pool.release(new, True)
    assert (await pool.acquire("k")) == (new, True)


@pytest.mark.parametrize("late", [b"X", b""], ids=["byte", "eof"])
async def test_anything_arriving_while_idle_closes_it(
    dialer: Dialer, late: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    pool = Pool(dialer)
    p = await acquire_new(pool)
    await pool.release(p, True)
    if late:
        await dialer.peers[0].send_all(late)
    else:
        await dialer.peers[0].send_eof()
    p2, reused = await pool.acquire("k")
    assert p2 is not p and not reused
    assert pool.open_count("k") == 1


async def test_connection_limit_per_group(
    dialer: Dialer, autojump_clock: trio.testing.MockClock
) -> None:
    refused: list[str] = []
    pool = Pool(
        dialer, max_connections=2, group=lambda key: key.split("/")[0], on_refused=refused.append
    )
    a = await acquire_new(pool, "up/1")
    b = await acquire_new(pool, "up/2")
    with pytest.raises(UpstreamError) as info:
        await pool.acquire("up/3")
    assert info.value.status == 503 and refused == ["up"]
    await acquire_new(pool, "other/1")  # another group has its own limit
    await pool.release(a, True)
    c = await acquire_new(pool, "up/3")  # room made: the idle one of up/1 is closed
    assert await dialer.peer_closed(0) and pool.open_count("up") == 2
    await pool.discard(b)
    await pool.discard(c)
    assert pool.open_count("up") == 0


async def test_failed_dial_frees_its_slot(
    dialer: Dialer, autojump_clock: trio.testing.MockClock
) -> None:
    pool = Pool(dialer, max_connections=1)
    dialer.fail = True
    for _ in range(3):
        with pytest.raises(UpstreamError):
            await pool.acquire("k")
    assert pool.open_count("k") == 0
    dialer.fail = False
    await acquire_new(pool)


async def test_discard_twice_counts_once(
    dialer: Dialer, autojump_clock: trio.testing.MockClock
) -> None:
    pool = Pool(dialer)
    p = await acquire_new(pool)
    await pool.discard(p)
    await pool.discard(p)
    assert pool.open_count("k") == 0


async def test_a_group_may_have_its_own_idle_timeout_and_connection_limit(
    dialer: Dialer, autojump_clock: trio.testing.MockClock
) -> None:
    """An upstream's traffic policy (timeouts.idle_seconds, circuit.max_connections)."""
    pool = Pool(dialer, idle_timeout=30, max_connections=5, group=lambda k: k.split("@")[0])
    pool.idle_timeouts["short"] = 5
    pool.group_limits["short"] = 1
    s, long_ = await acquire_new(pool, "short@a"), await acquire_new(pool, "long@a")
    with pytest.raises(UpstreamError) as info:
        await pool.acquire("short@b")
    assert info.value.status == 503 and "limit (1)" in str(info.value)
    await pool.release(s, True)
    await pool.release(long_, True)
    autojump_clock.jump(6)
    p, reused = await pool.acquire("long@a")
    assert p is long_ and reused  # 6 s idle: within the default 30
    p2, reused = await pool.acquire("short@a")
    assert p2 is not s and not reused  # past the group's 5 s: closed, a new one dialed
