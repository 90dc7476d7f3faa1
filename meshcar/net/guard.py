"""One fault boundary per connection.

`guarded(handler, listener, on_error)` wraps a connection handler so that an unexpected
exception (a bug, an unmapped library error) ends that connection only: it is logged with
its traceback, counted through `on_error(listener)`, the stream is closed, and the listener
and every other connection go on. Cancellation (a `BaseException`) passes through untouched,
so draining and shutdown still work.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger("meshcar.connection")

Handler = Callable[..., Awaitable[None]]


def guarded(
    handler: Handler, listener: str, on_error: Callable[[str], None] | None = None
) -> Handler:
    async def run(stream: trio.abc.AsyncResource, *args: Any, **kwargs: Any) -> None:
        try:
            await handler(stream, *args, **kwargs)
        except Exception as exc:
            log.exception(
                json.dumps(
                    {
                        "event": "connection.handler_error",
                        "listener": listener,
                        "error": type(exc).__name__,
                    }
                )
            )
            if on_error is not None:
                on_error(listener)
        finally:
            await trio.aclose_forcefully(stream)

    return run
