"""HTTP/2 connections on trio streams, over the sans-IO `h2` state machine (both sides).

Theory of operation
-------------------
An `H2Conn` owns one `h2.connection.H2Connection` and one trio stream. `run()` is the only
reader: it feeds what arrives to the abuse guard (`proto/h2guard.py`, server side) and then
to h2, turns h2's events into per-stream state (`H2Stream`: head, body chunks, trailers,
end, reset) and wakes whoever waits on that stream. Every task that changes h2's state
writes what h2 queued with `flush()`, which takes the bytes and writes them under one lock,
so frames leave in the order h2 produced them.

Flow control is end to end: received DATA is acknowledged (WINDOW_UPDATE) only when the
consumer of a stream calls `ack()` after it has written the chunk onward, and `send_data`
waits for the peer's window; so a slow reader at either end stops the other end at the
size of one window, and per stream memory is bounded by the window we advertise.

The server side hands each new stream to `on_stream` in the connection's nursery; the
client side opens streams with `request()`. When the connection ends (EOF, GOAWAY, an
error, a guard trip), `run()` returns and every waiting stream sees `StreamGone`.
h2 is imported by this module only, and this module only when an HTTP/2 connection
arrives (idle processes do not pay its ~4 MB).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from meshcar.errors import BodyTooLarge
from meshcar.net import sockio
from meshcar.net.errors import CONNECTION_ERRORS
from meshcar.proto.h2guard import PREFACE, FrameGuard, H2Limits

log = logging.getLogger("meshcar.h2")

Headers = list[tuple[bytes, bytes]]
READ_SIZE = 64 * 1024
STREAM_WINDOW = 1 << 20  # per stream receive window we advertise
CONN_WINDOW = 4 << 20  # the connection's
MAX_CONCURRENT_STREAMS = 100
MAX_HEADER_LIST = 64 * 1024
CANCEL = h2.errors.ErrorCodes.CANCEL
ENHANCE_YOUR_CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


class StreamGone(Exception):
    """The stream was reset (by the peer or us) or its connection ended."""

    def __init__(self, code: int = CANCEL) -> None:
        super().__init__(f"stream reset ({code})")
        self.code = int(code)


class H2Stream:
    __slots__ = (
        "id",
        "headers",
        "chunks",
        "ended",
        "trailers",
        "gone",
        "scope",
        "head_sent",
        "_wake",
        "_window",
    )

    def __init__(self, sid: int) -> None:
        self.id = sid
        self.headers: Headers | None = None
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.ended = False
        self.trailers: Headers | None = None
        self.gone: int | None = None  # the reset code once the stream is gone
        self.scope: trio.CancelScope | None = None  # a served stream's: cancelled on reset
        self.head_sent = False  # a served stream's response head went out
        self._wake = trio.Event()
        self._window = trio.Event()

    def wake(self) -> None:
        self._wake.set()

    def window(self) -> None:
        self._window.set()

    async def head(self) -> Headers:
        """The (final) head of this stream's message."""
        while self.headers is None:
            if self.gone is not None:
                raise StreamGone(self.gone)
            await self._wait()
        return self.headers

    async def receive(self) -> tuple[bytes, int] | None:
        """The next body chunk and its flow-controlled length; None at the end."""
        while not self.chunks:
            if self.ended:
                return None
            if self.gone is not None:
                raise StreamGone(self.gone)
            await self._wait()
        return self.chunks.popleft()

    async def _wait(self) -> None:
        self._wake = trio.Event()
        await self._wake.wait()

    async def wait_window(self) -> None:
        self._window = trio.Event()
        await self._window.wait()


class H2Conn:
    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        client: bool,
        limits: H2Limits | None = None,
        label: str = "",
    ) -> None:
        self.stream = stream
        self.client = client
        self.label = label
        cfg = h2.config.H2Configuration(client_side=client, header_encoding=None)
        self.h2 = h2.connection.H2Connection(cfg)
        S = h2.settings.SettingCodes
        self.h2.local_settings = h2.settings.Settings(
            client=client,
            initial_values={
                S.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                S.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                S.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
                S.ENABLE_PUSH: 0,
            },
        )
        self.h2.max_inbound_frame_size = 16384
        self.guard = None if client else FrameGuard(limits or H2Limits(), skip=len(PREFACE))
        self.streams: dict[int, H2Stream] = {}
        self._lock = trio.Lock()
        self._closed_stream = trio.Event()  # a stream ended: room under the peer's limit
        self.closed = False
        self.goaway: str = ""  # why we ended the connection, if we did
        self.last_stream: int | None = None  # after a graceful GOAWAY: the last stream served
        self._scope: trio.CancelScope | None = None  # run()'s: close() ends the reader too
        self.peer_goaway = False  # the peer sent GOAWAY NO_ERROR: no new streams

    async def start(self) -> None:
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONN_WINDOW - 65535)
        await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            data = self.h2.data_to_send()
            if data and not self.closed:
                try:
                    await sockio.send_all(self.stream, data)
                except CONNECTION_ERRORS:
                    self._end()

    async def run(self, on_stream: Callable[[H2Stream], Awaitable[None]] | None = None) -> None:
        """Read until the connection ends; `on_stream` (server side) serves each new stream
        in a nursery that is cancelled when the connection ends."""
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                try:
                    await self._read(nursery, on_stream)
                finally:
                    self._end()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                try:
                    await self.stream.aclose()
                except CONNECTION_ERRORS:
                    pass

    async def _read(self, nursery: trio.Nursery, on_stream: Any) -> None:
        while True:
            try:
                data = await sockio.receive_some(self.stream, READ_SIZE)
            except CONNECTION_ERRORS:
                return
            if not data:
                return
            if self.guard is not None:
                problem = self.guard.feed(data, trio.current_time())
                if problem:
                    await self.close(ENHANCE_YOUR_CALM, problem)
                    return
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:  # h2 queued the GOAWAY
                self.goaway = f"protocol error: {exc}"
                self._log_goaway()
                await self.flush()
                return
            ended = False
            for ev in events:
                ended = self._event(ev, nursery, on_stream) or ended
            await self.flush()
            if ended:
                return

    def _event(self, ev: Any, nursery: trio.Nursery, on_stream: Any) -> bool:
        """Apply one h2 event; True when the connection is over (GOAWAY received)."""
        E = h2.events
        if isinstance(ev, E.RequestReceived):
            if self.last_stream is not None and ev.stream_id > self.last_stream:
                self.h2.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                return False  # after our GOAWAY: the client retries it elsewhere
            s = self.streams[ev.stream_id] = H2Stream(ev.stream_id)
            s.headers = list(ev.headers)
            s.ended = ev.stream_ended is not None
            if on_stream is not None:
                nursery.start_soon(self._serve_stream, on_stream, s)
        elif isinstance(ev, E.ResponseReceived | E.TrailersReceived | E.DataReceived):
            self._message_event(ev)
        elif isinstance(ev, E.StreamEnded | E.StreamReset):
            self._end_event(ev)
        elif isinstance(ev, E.WindowUpdated | E.RemoteSettingsChanged):
            sid = getattr(ev, "stream_id", 0)
            if not sid:
                for s in self.streams.values():
                    s.window()
            elif sid in self.streams:
                self.streams[sid].window()
        if isinstance(ev, E.ConnectionTerminated):
            return not self._graceful_goaway(ev)
        return False

    def _graceful_goaway(self, ev: Any) -> bool:
        """A peer's GOAWAY NO_ERROR (it drains): the streams it names go on, no new one is
        opened, the connection ends with its last stream. h2 treats any GOAWAY as the end
        (its state machine then refuses every frame), so its state is put back to OPEN."""
        if not self.client or ev.error_code != 0 or ev.last_stream_id is None:
            return False
        self.peer_goaway = True
        self.h2.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        for sid, s in list(self.streams.items()):
            if sid > ev.last_stream_id:  # never taken: gone (REFUSED_STREAM)
                s.gone = int(h2.errors.ErrorCodes.REFUSED_STREAM)
                s.wake()
                s.window()
        self._end_if_done()
        return True

    def _end_if_done(self) -> None:
        if self.peer_goaway and not self.streams and self._scope is not None:
            self._scope.cancel()  # run() closes the stream

    def _message_event(self, ev: Any) -> None:
        s = self.streams.get(ev.stream_id)
        if s is None:  # a stream we are done with: its data only gives back window
            if isinstance(ev, h2.events.DataReceived):
                self.ack(ev.stream_id, ev.flow_controlled_length)
            return
        if isinstance(ev, h2.events.ResponseReceived):
            s.headers = list(ev.headers)
        elif isinstance(ev, h2.events.TrailersReceived):
            s.trailers = list(ev.headers)
        else:
            s.chunks.append((ev.data, ev.flow_controlled_length))
        if ev.stream_ended is not None:
            s.ended = True
        s.wake()

    def _end_event(self, ev: Any) -> None:
        s = self.streams.get(ev.stream_id)
        if s is None:
            return
        if isinstance(ev, h2.events.StreamEnded):
            s.ended = True
        else:
            s.gone = int(ev.error_code)
            s.window()
            if s.scope is not None:  # the peer gave up: stop serving it at once
                s.scope.cancel()
        s.wake()

    async def _serve_stream(self, on_stream: Any, s: H2Stream) -> None:
        try:
            with trio.CancelScope() as s.scope:
                await on_stream(s)
        except* StreamGone:
            pass  # reset or connection gone: nothing left to answer
        except* Exception as eg:  # one stream's bug ends that stream, never the connection
            log.error(
                json.dumps({"event": "h2.stream_error", "error": repr(eg.exceptions[0])[:300]}),
                exc_info=eg,
            )
            await self.reset(s.id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            self.forget(s)
            with trio.move_on_after(1) as scope:  # the RST or WINDOW_UPDATE forget queued
                scope.shield = True
                await self.flush()

    def forget(self, s: H2Stream) -> None:
        """We are done with stream `s`: what it buffered, and what arrives for it later, is
        acknowledged (the connection's window is shared by every stream); a served stream
        whose request is still coming is reset with NO_ERROR (RFC 9113 8.1: answered early)."""
        self.streams.pop(s.id, None)
        self._closed_stream.set()
        self._end_if_done()
        if self.closed:
            return
        for _, fc in s.chunks:
            self.ack(s.id, fc)
        s.chunks.clear()
        if not self.client and not s.ended and s.gone is None:
            s.gone = 0
            try:
                self.h2.reset_stream(s.id, error_code=0)
            except (h2.exceptions.ProtocolError, KeyError):
                pass

    def _end(self) -> None:
        if self.closed:
            return
        self.closed = True
        for s in self.streams.values():
            if s.gone is None and not (s.ended and s.headers is not None):
                s.gone = int(CANCEL)
            s.wake()
            s.window()
        self._closed_stream.set()

    async def close(self, code: int = 0, reason: str = "") -> None:
        """GOAWAY with `code` (and `reason` as its debug data), then the connection ends."""
        self.goaway = reason
        try:
            self.h2.close_connection(error_code=code, additional_data=reason.encode()[:200])
        except h2.exceptions.ProtocolError:
            pass
        if code:
            self._log_goaway()
        await self.flush()
        self._end()
        if self._scope is not None:
            self._scope.cancel()

    async def goaway_graceful(self) -> None:
        """Draining: GOAWAY NO_ERROR naming the last stream we take; the streams up to it go
        on (written as a raw frame: h2's close_connection would refuse their frames), newer
        ones are refused (REFUSED_STREAM, which clients retry)."""
        if self.last_stream is not None or self.closed:
            return
        from hyperframe.frame import GoAwayFrame

        self.last_stream = self.h2.highest_inbound_stream_id
        frame = GoAwayFrame(0, last_stream_id=self.last_stream, error_code=0).serialize()
        async with self._lock:
            data = self.h2.data_to_send() + frame
            try:
                await sockio.send_all(self.stream, data)
            except CONNECTION_ERRORS:
                self._end()

    @property
    def idle(self) -> bool:
        return not self.streams

    def _log_goaway(self) -> None:
        log.info(json.dumps({"event": "h2.goaway", "side": self.label, "reason": self.goaway}))

    # --- sending ---

    async def send_headers(self, sid: int, headers: Headers, end: bool = False) -> None:
        self._check(sid)
        try:
            self.h2.send_headers(sid, headers, end_stream=end)
        except h2.exceptions.ProtocolError:
            raise StreamGone(CANCEL) from None
        await self.flush()

    async def send_data(self, sid: int, data: bytes, end: bool = False) -> None:
        """Send `data` as the peer's windows allow (waits for WINDOW_UPDATE)."""
        view = memoryview(data)
        while True:
            self._check(sid)
            n = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if n <= 0 and view:
                s = self.streams.get(sid)
                if s is None:
                    raise StreamGone(CANCEL)
                await s.wait_window()
                continue
            chunk, view = view[:n], view[n:]
            try:
                self.h2.send_data(sid, bytes(chunk), end_stream=end and not view)
            except h2.exceptions.ProtocolError:
                raise StreamGone(CANCEL) from None
            await self.flush()
            if not view:
                return

    async def end_stream(self, sid: int, trailers: Headers | None = None) -> None:
        self._check(sid)
        try:
            if trailers:
                self.h2.send_headers(sid, trailers, end_stream=True)
            else:
                self.h2.end_stream(sid)
        except h2.exceptions.ProtocolError:
            raise StreamGone(CANCEL) from None
        await self.flush()

    async def reset(self, sid: int, code: int = CANCEL) -> None:
        s = self.streams.get(sid)
        if s is not None and s.gone is None:
            s.gone = int(code)
        if self.closed:
            return
        try:
            self.h2.reset_stream(sid, error_code=code)
        except (h2.exceptions.ProtocolError, KeyError):
            return  # already closed
        await self.flush()

    def ack(self, sid: int, n: int) -> None:
        """We passed on `n` flow-controlled bytes of stream `sid`: let the peer send more (the
        WINDOW_UPDATE leaves with the next flush)."""
        if n and not self.closed:
            try:
                self.h2.acknowledge_received_data(n, sid)
            except (h2.exceptions.ProtocolError, KeyError):
                pass

    def _check(self, sid: int | None = None) -> None:
        if self.closed:
            raise StreamGone(CANCEL)
        if sid is not None:
            s = self.streams.get(sid)
            if s is not None and s.gone is not None:
                raise StreamGone(s.gone)

    # --- client side ---

    async def request(self, headers: Headers, end: bool = False) -> H2Stream:
        """Open a stream with `headers`; waits while the peer's concurrency limit is full."""
        while self.h2.open_outbound_streams >= self.h2.remote_settings.max_concurrent_streams:
            self._check()
            self._closed_stream = trio.Event()
            await self._closed_stream.wait()
        self._check()
        sid = self.h2.get_next_available_stream_id()
        s = self.streams[sid] = H2Stream(sid)
        self.h2.send_headers(sid, headers, end_stream=end)
        await self.flush()
        return s

    @property
    def usable(self) -> bool:
        return (
            not self.closed
            and not self.peer_goaway
            and self.h2.state_machine.state != h2.connection.ConnectionState.CLOSED
        )


async def pump(src: H2Conn, s: H2Stream, dst: H2Conn, dst_id: int, limit: int | None = None) -> int:
    """Copy stream `s`'s body (and trailers) from `src` to stream `dst_id` of `dst`, a chunk
    at a time, acknowledging each chunk only once it was written onward; bytes moved. Past
    `limit` bytes (a route's max_body_bytes), BodyTooLarge before the chunk goes onward."""
    moved = 0
    while True:
        item = await s.receive()
        if item is None:
            await dst.end_stream(dst_id, s.trailers)
            return moved
        data, fc = item
        check_limit(src, s, moved + len(data), fc, limit)
        if data:
            await dst.send_data(dst_id, data)
            moved += len(data)
        src.ack(s.id, fc)
        if fc:
            await src.flush()


def check_limit(src: H2Conn, s: H2Stream, size: int, fc: int, limit: int | None) -> None:
    """BodyTooLarge if a request body of `size` bytes passes `limit`; the chunk's window is
    given back first (the connection's window is every stream's)."""
    if limit is not None and size > limit:
        src.ack(s.id, fc)
        raise BodyTooLarge(f"request body larger than {limit} bytes")
