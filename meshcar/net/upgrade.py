"""Protocol upgrades (WebSocket and any `Upgrade`): the switch checked, then a byte relay.

Theory of operation: the parser (`proto/http1.py`) delivers a request with `Connection:
upgrade` and an Upgrade header as an ordinary request marked `upgrade` (HTTP/1.1 only; a
WebSocket one must be a GET; CONNECT stays refused with 501) and the last of its
connection. It goes through every check a request goes through (routing, allow list,
identity headers, XFCC, WAF, rate limits) and `forward` sends it upstream with
`Connection: Upgrade` and its Upgrade value (hop-by-hop headers otherwise stripped). An
answer other than 101 is an ordinary response (then the connection closes). A 101 comes
back as `Exchange.switched`; `relay_switched` checks that its Upgrade names one of the
protocols asked for (else 502, nothing sent to the client), sends the 101 down and then
moves bytes both ways until both directions end:

* idle timeout (`timeouts.upgraded_idle_seconds`, default 1 h): one deadline for the
  connection, moved on every read in either direction, so a relay is closed only after
  that long without a byte either way (or a peer not taking bytes that long);
* half-close: a direction that reads EOF shuts the write side of a plain TCP destination
  and the other direction goes on (a client's close still lets the server's last frames
  through); a TLS destination cannot be half-closed here, so EOF towards it ends both
  directions once what was read is delivered. Either close order of a WebSocket (a Close
  frame each way, then the server's TCP close) passes through unchanged;
* a reset or write failure ends the relay; both connections are closed, and the upstream
  connection never goes back to its pool.

The caller's access log line (written when `proxy_request` returns) records status 101,
the bytes each way and the whole connection's duration; an `UpgradeObserver` (the admin
metrics) counts switched connections open and closed.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from meshcar.errors import UpstreamError
from meshcar.net import sockio
from meshcar.net.errors import CONNECTION_ERRORS
from meshcar.net.forward import DownstreamGone, Exchange, Timeouts
from meshcar.net.httpconn import HttpConn
from meshcar.net.pool import Pool, Pooled
from meshcar.proto.headers import clean_headers, serialize_response
from meshcar.proto.http1 import Headers, RequestHead, ResponseHead

log = logging.getLogger("meshcar.upgrade")

CHUNK = 256 * 1024


class UpgradeObserver(Protocol):
    """Where switched connections are counted (admin's metrics, per listener)."""

    def upgrade_opened(self, protocol: str) -> None: ...

    def upgrade_closed(self, protocol: str, bytes_up: int, bytes_down: int, end: str) -> None: ...


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def switch_problem(req: RequestHead, resp: ResponseHead) -> str:
    """Why the upstream's 101 does not answer the request's Upgrade, or ""."""
    offered = resp.header(b"upgrade")
    if offered is None:
        return "upstream answered 101 without an Upgrade header"
    chosen = _tokens(offered)
    asked = _tokens(req.upgrade or b"")
    if len(chosen) != 1 or chosen[0] not in asked:
        return (
            f"upstream switched to {offered.decode('latin-1')!r}, "
            f"not one of {(req.upgrade or b'').decode('latin-1')!r}"
        )
    return ""


@dataclass
class _Counts:
    up: int = 0  # client -> upstream
    down: int = 0  # upstream -> client


def _half_close(stream: trio.abc.Stream) -> bool:
    """Shut the write side of a plain TCP stream; False for streams that cannot (TLS)."""
    if not isinstance(stream, trio.SocketStream):
        return False
    try:
        stream.socket.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    return True


class _Relay:
    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.scope = trio.CancelScope()
        self.end = ""  # who ended it: client_/upstream_ closed/error, idle_timeout, cancelled
        self.error = ""
        self.counts = _Counts()
        self.bump()

    def bump(self) -> None:
        self.scope.deadline = trio.current_time() + self.idle

    def finish(self, end: str) -> None:
        if not self.end:
            self.end = end
        self.scope.cancel()

    async def one_way(
        self, src: trio.abc.Stream, dst: trio.abc.Stream, first: bytes, upward: bool
    ) -> None:
        try:
            data = first
            while True:
                if data:
                    await sockio.send_all(dst, data)
                    if upward:
                        self.counts.up += len(data)
                    else:
                        self.counts.down += len(data)
                data = await sockio.receive_some(src, CHUNK)
                self.bump()
                if not data:
                    break
        except CONNECTION_ERRORS as exc:
            self.error = f"{type(exc).__name__}: {exc}"[:200]
            self.finish(f"{'client' if upward else 'upstream'}_error")
            return
        who = "client" if upward else "upstream"
        if not _half_close(dst):
            self.finish(f"{who}_closed")
        elif not self.end:
            self.end = f"{who}_closed"


async def end_upgrade(
    down: HttpConn,
    pool: Pool,
    p: Pooled,
    req: RequestHead,
    ex: Exchange,
    rewrite_response: Callable[[ResponseHead, Headers], Headers],
    timeouts: Timeouts,
    observer: UpgradeObserver | None = None,
) -> Exchange:
    """The end of an upgrade request's exchange (`proxy_request`): a 101 relayed until it
    ends; the upstream connection discarded either way (it never returns to the pool)."""
    try:
        if ex.switched is None:
            return ex
        return await relay_switched(down, p.conn, req, ex, rewrite_response, timeouts, observer)
    finally:
        await pool.discard(p)


async def relay_switched(
    down: HttpConn,
    up: HttpConn,
    req: RequestHead,
    ex: Exchange,
    rewrite_response: Callable[[ResponseHead, Headers], Headers],
    timeouts: Timeouts,
    observer: UpgradeObserver | None = None,
) -> Exchange:
    """The upstream answered 101 (`ex.switched`): check it, send it down, relay until both
    directions end. Raises UpstreamError (502) before anything reached the client."""
    resp = ex.switched
    assert resp is not None
    problem = switch_problem(req, resp)
    if problem:
        raise UpstreamError(problem, 502)
    proto = _tokens(resp.header(b"upgrade") or b"")[0]
    headers = rewrite_response(resp, clean_headers(resp.headers))
    headers += [(b"Connection", b"Upgrade"), (b"Upgrade", resp.header(b"upgrade") or proto)]
    head = serialize_response(101, resp.reason or b"Switching Protocols", headers)
    r = _Relay(timeouts.upgraded_idle)
    client_first, upstream_first = down.detach(), up.detach()
    with trio.move_on_after(timeouts.write):
        try:
            await sockio.send_all(down.stream, head + upstream_first)
        except CONNECTION_ERRORS as exc:
            raise DownstreamGone(repr(exc)) from None
        ex.response_started = True
    if not ex.response_started:
        raise DownstreamGone(f"client did not take the 101 for {timeouts.write:g}s")
    r.counts.down = len(upstream_first)
    try:
        await relay_streams(
            r, down.stream, up.stream, client_first, proto.decode("latin-1"), observer
        )
    finally:
        ex.bytes_up += r.counts.up
        ex.bytes_down = r.counts.down
    return ex


def new_relay(idle: float) -> _Relay:
    """A relay whose idle deadline (`idle` seconds without a byte either way) starts now."""
    return _Relay(idle)


async def relay_streams(
    r: _Relay,
    client: trio.abc.Stream,
    upstream: trio.abc.Stream,
    client_first: bytes,
    name: str,
    observer: UpgradeObserver | None = None,
) -> None:
    """Move bytes both ways until both directions end (or `r`'s idle deadline passes),
    counted in `r.counts`; the observer and the `upgrade.closed` log line see it. Also
    the tunnel of a CONNECT (sidecar/egress.py, protocol "connect")."""
    if observer is not None:
        observer.upgrade_opened(name)
    try:
        with r.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(r.one_way, client, upstream, client_first, True)
                nursery.start_soon(r.one_way, upstream, client, b"", False)
        if r.scope.cancelled_caught and not r.end:
            r.end = "idle_timeout"
    finally:
        end = r.end or "cancelled"
        if observer is not None:
            observer.upgrade_closed(name, r.counts.up, r.counts.down, end)
        entry = {"event": "upgrade.closed", "protocol": name, "end": end}
        if r.error:
            entry["error"] = r.error
        log.info(json.dumps(entry | {"bytes_up": r.counts.up, "bytes_down": r.counts.down}))
