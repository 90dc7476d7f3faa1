"""The CA's SQLite store: group-committed certificate records (ca/store.py)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from ca.errors import Unavailable
from ca.store import CertificateRecord, Store


def _rec(i: int) -> CertificateRecord:
    return CertificateRecord(
        serial=f"{i:x}",
        spiffe_id=f"spiffe://td/svc/{i}",
        not_before="2026-01-01T00:00:00Z",
        not_after="2026-01-01T01:00:00Z",
        issued_at=1,
        auth="renewal",
    )


def _serials_on_disk(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:  # another connection: sees only what was committed
        return {row[0] for row in conn.execute("SELECT serial FROM certificates")}


def test_concurrent_records_are_all_committed_before_each_call_returns(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "ca.db")
    seen_after_return: dict[int, bool] = {}
    start = threading.Barrier(24)

    def worker(i: int) -> None:
        start.wait()
        store.record_certificate(_rec(i))
        seen_after_return[i] = f"{i:x}" in _serials_on_disk(tmp_path / "ca.db")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen_after_return == {i: True for i in range(24)}
    assert {r.serial for r in store.certificates()} == {f"{i:x}" for i in range(24)}


def test_a_failed_commit_raises_unavailable_and_the_store_recovers(tmp_path: Path) -> None:
    db = tmp_path / "ca.db"
    store = Store.create(db)
    store.record_certificate(_rec(1))
    store._connection().execute("PRAGMA busy_timeout = 50")  # not 10 s: the test waits for it
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process holds the database
    with pytest.raises(Unavailable):
        store.record_certificate(_rec(2))
    assert not store._queue  # the failed record is not left behind for the next batch
    other.execute("ROLLBACK")
    other.close()
    store.record_certificate(_rec(3))  # the same connection works again
    assert _serials_on_disk(db) == {"1", "3"}
