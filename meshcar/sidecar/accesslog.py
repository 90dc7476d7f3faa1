"""Access logs: one JSON line per request, on the `meshcar.access` logger."""

from __future__ import annotations

import json
import logging
import sys

log = logging.getLogger("meshcar.access")


def log_request(**fields: object) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(json.dumps({"type": "request", **fields}, separators=(",", ":")))


def setup_logging(level: str = "info") -> None:
    """Every log line is a JSON object on stdout (lifecycle events too)."""
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every CA request as plain text at INFO; meshcar logs its own JSON events.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
