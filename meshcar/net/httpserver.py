"""The server side of an HTTP/1.1 connection: read request heads, hand each to a handler.

The loop owns keep-alive, idle and head timeouts, and the answer to requests that cannot
be parsed (400/431/501 with `Connection: close`, then close; written by `net/respond.py`).
Handlers own everything from the request head to the end of their response, including
reading the request body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

import trio

from meshcar.errors import ProtocolError
from meshcar.net.drain import Drain
from meshcar.net.errors import CONNECTION_ERRORS
from meshcar.net.forward import Timeouts
from meshcar.net.httpconn import HttpConn
from meshcar.net.respond import Refuse, answer, refusal_for
from meshcar.proto.http1 import EndOfMessage, RequestHead

log = logging.getLogger("meshcar.http")

# A handler returns True if the connection may carry another request.
Handler = Callable[[RequestHead, HttpConn], Awaitable[bool]]


async def send_error(conn: HttpConn, status: int, message: str, close: bool = True) -> None:
    """A JSON error answer (`respond.answer`), for handlers that are not request pipelines."""
    await answer(conn, Refuse(status, message, close=close))


HEAD_TIMEOUT = Refuse(408, "request head not received in time", close=True)
NOT_A_REQUEST = Refuse(400, "unexpected data", close=True)


async def serve_http(
    conn: HttpConn,
    handler: Handler,
    *,
    idle_timeout: float = 60.0,
    head_timeout: float = 30.0,
    drain: Drain | None = None,
    timeouts: Timeouts | None = None,
) -> None:
    """`timeouts`, when given, sets the head and idle timeouts (its `request_head`, `idle`)."""
    if timeouts is not None:
        head_timeout, idle_timeout = timeouts.request_head, timeouts.idle
    try:
        req = await next_request(conn, head_timeout)
        while req is not None:
            if drain is None:
                keep = await handler(req, conn)
            else:
                with drain:
                    keep = await handler(req, conn)
                keep = keep and not drain.draining
            if not keep or not req.keep_alive:
                return
            req = await next_request(conn, idle_timeout)
    except CONNECTION_ERRORS:
        return
    finally:
        await conn.aclose()


async def next_request(conn: HttpConn, timeout: float) -> RequestHead | None:
    """The next request head within `timeout`, or None when the connection is to close
    (the client closed, or sent what cannot be parsed: then it was answered)."""
    while True:
        with trio.move_on_after(timeout) as scope:
            try:
                event = await conn.next_event()
            except ProtocolError as exc:
                log.info(json.dumps({"event": "http.bad_request", "error": str(exc)}))
                refusal = refusal_for(exc)
                if refusal is not None:
                    await answer(conn, refusal)
                return None
        if scope.cancelled_caught:
            # 408 only to a client that began a head; an idle keep-alive connection (or a
            # preconnect) is closed silently, as nginx and Go do: an unsolicited 408 on it
            # could be read by a pooling client as the answer to its next request.
            if not conn.parser.between_messages():
                await answer(conn, HEAD_TIMEOUT)
            return None
        if event is None or isinstance(event, RequestHead):
            return event
        if not isinstance(event, EndOfMessage):  # cannot happen with a request parser
            await answer(conn, NOT_A_REQUEST)
            return None
        # the end of a bodiless request whose handler did not read it: read on


REFUSE_HEAD_SECONDS = 2.0


async def refuse_http(
    stream: trio.abc.Stream, message: str, timeouts: Timeouts | None = None
) -> None:
    """A connection over its listener's limit: its first request, if it comes within
    REFUSE_HEAD_SECONDS (or the head timeout, if shorter), gets 503 with `Connection: close`
    and a JSON error; then the connection closes. The short wait keeps a flood of idle
    connections from holding a task each for the full head timeout once the limit is hit."""

    async def refuse(req: RequestHead, conn: HttpConn) -> bool:
        await send_error(conn, 503, message)
        return False

    t = timeouts or Timeouts()
    t = replace(t, request_head=min(t.request_head, REFUSE_HEAD_SECONDS))
    await serve_http(HttpConn(stream, "request"), refuse, timeouts=t)
