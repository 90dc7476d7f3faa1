"""The last access-log entries of this process, for admin GET /requests/recent (the dashboard's
live tail).

A bounded ring buffer: `common/accesslog.py` appends each entry it writes (one deque append
of the dict it already built, on the hot path), the admin server reads a copy. Per process:
with `workers: N` each worker keeps its own.
"""

from __future__ import annotations

from collections import deque

RECENT_MAX = 200
_recent: deque[dict] = deque(maxlen=RECENT_MAX)
_seq = 0


def record(entry: dict) -> None:
    """Keep `entry` (an access-log line as a dict), dropping the oldest past RECENT_MAX."""
    global _seq
    _seq += 1
    entry["seq"] = _seq
    _recent.append(entry)


def recent(after: int = 0, limit: int = RECENT_MAX) -> list[dict]:
    """The kept entries with a sequence number above `after`, oldest first, at most `limit`."""
    out = [e for e in list(_recent) if e["seq"] > after]
    return out[-limit:] if limit > 0 else []


def clear() -> None:
    _recent.clear()
