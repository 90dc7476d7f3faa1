"""common/reload.py without a role: a bug while preparing a reload is a failed reload, not a
dead process; a config that came from no file says so; the file watch reloads on a change
(trio's MockClock: the poll interval passes without waiting)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry

from meshcar.common.reload import Prepared, Reloader
from meshcar.errors import ConfigError


def _load(path: Path) -> str:
    text = path.read_text()
    if "bad" in text:
        raise ConfigError([f"{path}: key: bad"])
    return text


def _reloader(path: Path | None, applied: list[str], prepare=None) -> Reloader:  # noqa: ANN001
    def default(new: str) -> Prepared:
        return Prepared(lambda: applied.append(new))

    return Reloader("test", path, _load, prepare or default, CollectorRegistry())


def _count(r: Reloader, result: str) -> float:
    return r.reloads.labels(result)._value.get()


@pytest.mark.trio
async def test_a_bug_in_prepare_is_a_failed_reload(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("one")

    def broken(new: str) -> Prepared:
        raise KeyError("oops")

    r = _reloader(path, [], broken)
    assert not await r.reload()
    assert _count(r, "failure") == 1
    assert r.status()["last_reload"]["error"] == "internal error: KeyError: 'oops'"


@pytest.mark.trio
async def test_no_file_to_read_again() -> None:
    r = _reloader(None, [])
    assert not await r.reload()
    assert "did not come from a file" in r.status()["last_reload"]["error"]


@pytest.mark.trio
async def test_invalid_then_valid(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("one")
    applied: list[str] = []
    r = _reloader(path, applied)
    first = r.status()["hash"]
    path.write_text("bad")
    assert not await r.reload()
    assert applied == [] and r.status()["hash"] == first
    assert "key: bad" in r.status()["last_reload"]["error"]
    path.write_text("two")
    assert await r.reload()
    assert applied == ["two"] and r.status()["hash"] != first
    assert (_count(r, "success"), _count(r, "failure")) == (1, 1)


async def test_watch_reloads_on_change(tmp_path: Path, autojump_clock) -> None:  # noqa: ANN001
    path = tmp_path / "c.yaml"
    path.write_text("one")
    applied: list[str] = []
    r = _reloader(path, applied)
    async with trio.open_nursery() as n:
        n.start_soon(r.watch_loop, 2.0)
        await trio.sleep(10)  # virtual time: five polls, nothing changed
        assert applied == []
        new = tmp_path / "c.new"
        new.write_text("two")
        new.replace(path)  # a rename into place: a new inode
        while not applied:
            await trio.sleep(1)
        assert applied == ["two"] and r.status()["last_reload"]["trigger"] == "file_changed"
        n.cancel_scope.cancel()
