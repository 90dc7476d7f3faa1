"""Logs: one JSON line per request (access log) and JSON lifecycle events, on stdout.

Access log lines are the hot path: they are formatted with `json.dumps` and written in
batches (at most every 0.2 s, or every 256 lines) instead of going through `logging` and a
flush per line; `flush()` is also called by the process's flush loop and at exit, so an
idle process never holds a line back for long. Lifecycle events use `logging` (rare).
"""

from __future__ import annotations

import json
import logging
import sys
import time

import trio

from meshcar.admin import recent

_buffer: list[str] = []
_last_flush = 0.0
_enabled = True
FLUSH_SECONDS = 0.2
_fields: frozenset[str] | None = None  # access_log.fields (None: every field)
_second = -1
_prefix = ""

# The fields of a request line (docs/OPERATIONS.md); `access_log.fields` picks among them.
# `ts` (RFC 3339, UTC, milliseconds) and `type` are on every line.
REQUEST_FIELDS = (
    "direction",
    "request_id",
    "trace_id",
    "span_id",
    "parent_span_id",
    "peer",
    "upstream",
    "client",  # the edge: client address, SNI, Host, mode, backend endpoint
    "sni",
    "host",
    "route",
    "mode",
    "backend",
    "plaintext_backend",
    "method",
    "path",
    "status",
    "reason",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "authz",
    "authz_policy",
    "deny_reason",
)


def configure(fields: tuple[str, ...] | None) -> None:
    """Keep only these fields on request lines (None: all)."""
    global _fields
    _fields = None if fields is None else frozenset(fields)


def timestamp(now: float) -> str:
    """RFC 3339 in UTC with milliseconds; the date and time part is formatted once a second."""
    global _second, _prefix
    sec = int(now)
    if sec != _second:
        _second, _prefix = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_prefix}.{int((now - sec) * 1000):03d}Z"


def log_request(**fields: object) -> None:
    if _fields is not None:
        fields = {k: v for k, v in fields.items() if k in _fields}
    log_entry("request", **fields)


def log_entry(kind: str, **fields: object) -> None:
    """One JSON access-log line of type `kind` (request, connection, waf, ...)."""
    global _last_flush
    if not _enabled:
        return
    line = {"ts": timestamp(time.time()), "type": kind, **fields}
    _buffer.append(json.dumps(line, separators=(",", ":")))
    recent.record(line)  # admin GET /requests/recent: the dashboard's live tail
    now = time.monotonic()
    if len(_buffer) >= 256 or now - _last_flush > FLUSH_SECONDS:
        flush()


def flush() -> None:
    global _last_flush
    _last_flush = time.monotonic()
    if _buffer:
        lines = "\n".join(_buffer) + "\n"
        _buffer.clear()
        try:
            sys.stdout.write(lines)
            sys.stdout.flush()
        except (OSError, ValueError):
            pass  # stdout gone (closed pipe): logging must never take the proxy down


async def flush_loop() -> None:
    try:
        while True:
            await trio.sleep(FLUSH_SECONDS)
            flush()
    finally:
        flush()


def setup_logging(level: str = "info") -> None:
    """Every log line is a JSON object on stdout (lifecycle events too)."""
    global _enabled
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    _enabled = root.isEnabledFor(logging.INFO)
    # httpx logs every CA request as plain text at INFO; meshcar logs its own JSON events.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
