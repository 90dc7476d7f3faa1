"""The CA's SQLite store: group-committed certificate records (ca/store.py)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from ca.errors import Unauthenticated, Unavailable
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


def _uses_left(db: Path, token: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT uses_left FROM tokens WHERE token_sha256 = ?", (token,)
        ).fetchone()[0]


def test_concurrent_token_uses_share_one_commit_each_with_its_own_outcome(tmp_path: Path) -> None:
    """16 uses queued while another thread holds the store: one transaction checks and
    decrements them all; the used-up, expired and unknown ones fail alone, nothing else does."""
    db = tmp_path / "ca.db"
    store = Store.create(db)
    store.add_token("good", "spiffe://td/svc/a", 0, 1000, 10)
    store.add_token("few", "spiffe://td/svc/b", 0, 1000, 2)
    store.add_token("old", "spiffe://td/svc/c", 0, 50, 5)
    asked = ["good"] * 10 + ["few"] * 4 + ["old", "nope"]
    outcomes: dict[int, str] = {}

    def use(i: int) -> None:
        try:
            outcomes[i] = store.consume_token(asked[i], 100)
        except Unauthenticated as exc:
            outcomes[i] = exc.code

    before = store.transactions
    threads = [threading.Thread(target=use, args=(i,)) for i in range(len(asked))]
    with store._lock:  # as if a commit were in progress: every use queues behind it
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(store._uses) < len(asked):  # wait until all are queued (observable)
            assert time.monotonic() < deadline, "the uses did not queue"
            time.sleep(0.001)
    for t in threads:
        t.join()
    assert store.transactions - before == 1
    assert [outcomes[i] for i in range(10)] == ["spiffe://td/svc/a"] * 10
    assert sorted(outcomes[i] for i in range(10, 14)) == [
        "spiffe://td/svc/b",
        "spiffe://td/svc/b",
        "token_used_up",
        "token_used_up",
    ]
    assert (outcomes[14], outcomes[15]) == ("token_expired", "bad_token")
    assert (_uses_left(db, "good"), _uses_left(db, "few"), _uses_left(db, "old")) == (0, 0, 5)


def test_a_failed_token_commit_fails_every_use_of_the_batch(tmp_path: Path) -> None:
    db = tmp_path / "ca.db"
    store = Store.create(db)
    store.add_token("good", "spiffe://td/svc/a", 0, 1000, 3)
    store._connection().execute("PRAGMA busy_timeout = 50")
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(Unavailable):
        store.consume_token("good", 100)
    assert not store._uses
    other.execute("ROLLBACK")
    other.close()
    assert store.consume_token("good", 100) == "spiffe://td/svc/a"
    assert _uses_left(db, "good") == 2
