"""SQLite records of the CA (ca.db): join tokens (sha256 only) and issued certificates.

A `Store` keeps one connection, opened on first use and shared by the worker threads that
call it (`trio.to_thread.run_sync`) under a process-wide lock, which makes this process a
single writer; the database is in WAL mode with `synchronous = FULL` (each commit is
fsynced before it returns); `BEGIN IMMEDIATE` with a busy timeout serialises it against other processes
(for example `meshcar ca token` while `meshcar ca serve` runs, or the processes of
`ca serve --workers N`). A token use is checked (expiry, remaining uses) and decremented
inside one transaction, which concurrent uses share (group commit, as below).

Issued-certificate records are group-committed: `record_certificate` queues its record and
returns only once a transaction holding it has committed, but the thread that gets the lock
writes every record queued by then in one transaction. A commit costs several fsyncs
(milliseconds); one per certificate capped the API at a few hundred signatures/s under
concurrency, one per batch does not, and no answer leaves before its record is durable.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import Unauthenticated, Unavailable

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    token_sha256 TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    uses_left INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    not_before TEXT NOT NULL,
    not_after TEXT NOT NULL,
    issued_at INTEGER NOT NULL,
    auth TEXT NOT NULL,
    client_bundle_version INTEGER,
    issuer TEXT,
    renewed_from TEXT
);
CREATE INDEX IF NOT EXISTS certificates_renewed_from ON certificates (renewed_from);
"""
# columns added after the first release; an older ca.db gets them on first use
_ADDED_COLUMNS = (("issuer", "TEXT"), ("renewed_from", "TEXT"))


@dataclass(frozen=True)
class CertificateRecord:
    serial: str  # hex
    spiffe_id: str
    not_before: str  # RFC 3339
    not_after: str  # RFC 3339
    issued_at: int  # unix seconds
    auth: str  # token | renewal | k8s_token
    client_bundle_version: int | None = None  # the bundle version the client said it held
    issuer: str | None = None  # SKI (hex) of the CA certificate that signed it
    renewed_from: str | None = None  # serial (hex) of the certificate presented to renew


@dataclass(frozen=True)
class TokenRecord:
    spiffe_id: str
    expires_at: int
    uses_left: int


class Store:
    """The CA's SQLite database at `path`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._migrated = False
        self._db: sqlite3.Connection | None = None
        self._queue_lock = threading.Lock()
        self._queue: list[_Pending] = []  # records waiting for a group commit
        self._uses: list[_PendingUse] = []  # token uses waiting for a group commit
        self.transactions = 0  # begun on the shared connection (tests count group commits)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @classmethod
    def create(cls, path: Path) -> Store:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
        store = cls(path)
        with store._transaction() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
        store.close()
        return store

    def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _connection(self) -> sqlite3.Connection:
        """The shared connection; call with `_lock` held."""
        if self._db is None:
            db = sqlite3.connect(
                self.path, timeout=10, isolation_level=None, check_same_thread=False
            )
            try:  # write-ahead log: a commit is one append + fsync, not a journal file made and unlinked
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = FULL")  # every commit durable before it returns
            except sqlite3.OperationalError:
                db.close()
                raise
            self._db = db
        return self._db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            with self._locked_transaction() as db:
                yield db

    @contextmanager
    def _locked_transaction(self) -> Iterator[sqlite3.Connection]:
        """A transaction on the shared connection; call with `_lock` held."""
        try:
            db = self._connection()
            if db.in_transaction:  # a failed ROLLBACK/COMMIT left one open
                db.execute("ROLLBACK")
            db.execute("BEGIN IMMEDIATE")
            self.transactions += 1
            if not self._migrated:
                _migrate(db)
                self._migrated = True
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:  # locked past the timeout, disk full, unreadable
            raise Unavailable(f"the CA database is unavailable ({exc})") from exc

    def add_token(
        self, token_sha256: str, spiffe_id: str, created_at: int, expires_at: int, uses: int
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO tokens (token_sha256, spiffe_id, created_at, expires_at, uses_left)"
                " VALUES (?, ?, ?, ?, ?)",
                (token_sha256, spiffe_id, created_at, expires_at, uses),
            )

    def token(self, token_sha256: str) -> TokenRecord | None:
        with self._transaction() as db:
            row = db.execute(
                "SELECT spiffe_id, expires_at, uses_left FROM tokens WHERE token_sha256 = ?",
                (token_sha256,),
            ).fetchone()
        return TokenRecord(*row) if row else None

    def consume_token(self, token_sha256: str, now: int) -> str:
        """Use the token once and return its SPIFFE ID; raise Unauthenticated
        (bad_token / token_expired / token_used_up) without consuming otherwise.

        Group-committed like the certificate records: the thread that gets the lock checks
        and decrements every use queued by then, each on its own (one refused use does not
        fail the others; two uses of one token see each other's decrement), in one
        transaction, and every caller returns only once that transaction has committed."""
        mine = _PendingUse(token_sha256, now)
        with self._queue_lock:
            self._uses.append(mine)
        with self._lock:
            if not mine.done:
                with self._queue_lock:
                    batch, self._uses = self._uses, []
                try:
                    with self._locked_transaction() as db:
                        for use in batch:
                            _use_token(db, use)
                except Exception as exc:  # nothing of the batch committed
                    for use in batch:
                        use.error = exc
                for use in batch:
                    use.done = True
        if mine.error is not None:
            raise mine.error
        return mine.spiffe_id

    def record_certificate(self, rec: CertificateRecord) -> None:
        """Store `rec`; return once it is committed (in a group commit, see above)."""
        mine = _Pending(rec)
        with self._queue_lock:
            self._queue.append(mine)
        with self._lock:
            if not mine.done:  # no other thread committed it while we waited: commit the queue
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                try:
                    with self._locked_transaction() as db:
                        db.executemany(
                            "INSERT INTO certificates (serial, spiffe_id, not_before, not_after, issued_at,"
                            " auth, client_bundle_version, issuer, renewed_from) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [
                                (
                                    r.serial,
                                    r.spiffe_id,
                                    r.not_before,
                                    r.not_after,
                                    r.issued_at,
                                    r.auth,
                                    r.client_bundle_version,
                                    r.issuer,
                                    r.renewed_from,
                                )
                                for r in (p.record for p in batch)
                            ],
                        )
                except Exception as exc:
                    for p in batch:
                        p.error = exc
                for p in batch:
                    p.done = True
        if mine.error is not None:
            raise mine.error

    def certificates(self) -> list[CertificateRecord]:
        with self._transaction() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM certificates ORDER BY rowid").fetchall()
        return [CertificateRecord(*r) for r in rows]

    def unexpired(self, now_rfc3339: str) -> list[CertificateRecord]:
        """Certificates whose not-after is later than `now` (RFC 3339 strings of one format
        compare like the times they name)."""
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM certificates WHERE not_after > ? ORDER BY rowid",
                (now_rfc3339,),
            ).fetchall()
        return [CertificateRecord(*r) for r in rows]

    def active(self, now_rfc3339: str) -> list[CertificateRecord]:
        """The certificates workloads hold now: unexpired and not yet replaced by a renewal
        that presented them."""
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM certificates c WHERE not_after > ? AND NOT EXISTS"
                " (SELECT 1 FROM certificates r WHERE r.renewed_from = c.serial) ORDER BY rowid",
                (now_rfc3339,),
            ).fetchall()
        return [CertificateRecord(*r) for r in rows]


@dataclass
class _Pending:
    """A record waiting for its group commit; `done` once a transaction ended for it."""

    record: CertificateRecord
    done: bool = False
    error: Exception | None = None


@dataclass
class _PendingUse:
    """A token use waiting for its group commit: the SPIFFE ID, or the error to raise."""

    token_sha256: str
    now: int
    done: bool = False
    spiffe_id: str = ""
    error: Exception | None = None


def _use_token(db: sqlite3.Connection, use: _PendingUse) -> None:
    """Check and decrement one use inside the open transaction; a refusal is recorded on
    `use`, not raised, so the rest of the batch goes on."""
    row = db.execute(
        "SELECT spiffe_id, expires_at, uses_left FROM tokens WHERE token_sha256 = ?",
        (use.token_sha256,),
    ).fetchone()
    if row is None:
        use.error = Unauthenticated("unknown join token", code="bad_token")
        return
    spiffe_id, expires_at, uses_left = row
    if expires_at <= use.now:
        use.error = Unauthenticated("the join token has expired", code="token_expired")
    elif uses_left <= 0:
        use.error = Unauthenticated("the join token has no uses left", code="token_used_up")
    else:
        db.execute(
            "UPDATE tokens SET uses_left = uses_left - 1 WHERE token_sha256 = ?",
            (use.token_sha256,),
        )
        use.spiffe_id = str(spiffe_id)


_COLUMNS = "serial, spiffe_id, not_before, not_after, issued_at, auth, client_bundle_version, issuer, renewed_from"


def _migrate(db: sqlite3.Connection) -> None:
    """Add the columns a ca.db from an earlier release lacks (inside the open transaction)."""
    have = {row[1] for row in db.execute("PRAGMA table_info(certificates)")}
    if not have:
        return  # no table yet: Store.create is about to make it
    for name, kind in _ADDED_COLUMNS:
        if name not in have:
            db.execute(f"ALTER TABLE certificates ADD COLUMN {name} {kind}")
    db.execute(
        "CREATE INDEX IF NOT EXISTS certificates_renewed_from ON certificates (renewed_from)"
    )
