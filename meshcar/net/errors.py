"""Map the I/O exceptions of trio, ssl and the OS to what a proxy must do with them."""

from __future__ import annotations

import ssl

import trio

# Exceptions that mean "this connection is gone or broken", never a bug in meshcar.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    ssl.SSLError,
    ConnectionError,
    OSError,
)

# The same, plus a trio timeout: what can end a handshake we wait on.
HANDSHAKE_ERRORS: tuple[type[BaseException], ...] = (trio.TooSlowError, *CONNECTION_ERRORS)
