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

_buffer: list[str] = []
_last_flush = 0.0
_enabled = True
FLUSH_SECONDS = 0.2


def log_request(**fields: object) -> None:
    log_entry("request", **fields)


def log_entry(kind: str, **fields: object) -> None:
    """One JSON access-log line of type `kind` (request, connection, waf, ...)."""
    global _last_flush
    if not _enabled:
        return
    _buffer.append(json.dumps({"type": kind, **fields}, separators=(",", ":")))
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
