"""Moved to `meshcar/common/accesslog.py` (the edge logs the same way); kept as an alias so
modules with work in flight keep importing it from here. New code imports meshcar.common."""

from meshcar.common.accesslog import flush, flush_loop, log_entry, log_request, setup_logging

__all__ = ["flush", "flush_loop", "log_entry", "log_request", "setup_logging"]
