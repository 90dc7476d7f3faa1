"""A TLS stream for trio built on `ssl.SSLObject` with batched reads and writes.

Theory of operation
-------------------
OpenSSL runs on two memory BIOs: bytes from the socket go into `_incoming`, and whatever
OpenSSL wants to send collects in `_outgoing` and is flushed to the socket. Compared with
`trio.SSLStream` this stream:

* decrypts every complete record already received in one `receive_some` call (up to
  `max_bytes`), instead of one record per call, and encrypts a whole `send_all` buffer
  before one socket write: fewer trips through the event loop on bulk transfers;
* flushes what OpenSSL queued even when a handshake fails, so the peer gets the real alert
  (e.g. "certificate required") instead of a reset;
* accepts a TLS session to resume (`session=`) when dialing;
* over a socket stream, reads and writes the non-blocking socket itself (same checkpoints
  as trio's stream, without its per-call wrapper layers), and takes its send lock without
  a scheduler trip when nobody holds it.

It supports one reader and one writer task at a time (what an HTTP/1.1 proxy needs);
socket writes are serialised with a lock because a read may need to flush too (TLS 1.3
post-handshake messages). The task holding the lock sends until nothing is queued, and a
reader never waits for it (a reader parked on the lock while the writer waits for the peer
to read would deadlock a full-duplex transfer). Concurrent `send_all` calls are serialised
by that lock instead of raising `BusyResourceError` (deliberate; tests/unit/
test_net_tls_conformance.py). Every call is a trio checkpoint, as trio's streams are.
"""

from __future__ import annotations

import operator
import os
import select
import ssl

import trio

from meshcar.net import sockio

READ_SIZE = 256 * 1024


def socket_readable(fd: int) -> bool:
    """Would a read on `fd` return at once (data, EOF or an error)? Never blocks."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI | select.POLLRDHUP)
    return bool(poller.poll(0))


class TLSStream(trio.abc.Stream):
    def __init__(
        self,
        transport: trio.abc.Stream,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
        self._send_lock = trio.Lock()
        self._closed = False

    # -- introspection, as on ssl.SSLObject ---------------------------------------------------

    def getpeercert(self, binary_form: bool = False):  # noqa: ANN201 - mirrors ssl's API
        return self._obj.getpeercert(binary_form)

    @property
    def session(self) -> ssl.SSLSession | None:
        return self._obj.session

    @property
    def context(self) -> ssl.SSLContext:
        """The SSLContext this connection was made with (sessions belong to it)."""
        return self._obj.context

    @property
    def session_reused(self) -> bool:
        return self._obj.session_reused

    def selected_alpn_protocol(self) -> str | None:
        return self._obj.selected_alpn_protocol()

    def version(self) -> str | None:
        return self._obj.version()

    def has_unread(self) -> bool:
        """Without blocking: is anything but TLS housekeeping waiting on this idle connection?

        Takes what the socket already holds into OpenSSL, then asks for one byte of
        application data. Post-handshake records (TLS 1.3 NewSessionTicket, KeyUpdate) are
        consumed by OpenSSL and do not count; application data, close_notify, EOF, an error,
        or a partial record left over (it might be data) all do. A connection that answers
        True is never used again."""
        if self._closed:
            return True
        if self._obj.pending():
            return True
        sock = getattr(self.transport, "socket", None)
        if sock is None:
            return bool(self._incoming.pending)
        fd = sock.fileno()
        if fd < 0:
            return True
        # The socket is non-blocking: a read answers at once with data, EOF, an error or
        # EAGAIN (one syscall; a poll() first cost a poll object and a second syscall).
        while True:
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                return True
            if not data:
                return True  # EOF
            self._incoming.write(data)
        if not self._incoming.pending:
            return False
        try:
            self._obj.read(1)
            return True  # application data nobody asked for
        except ssl.SSLWantReadError:
            return bool(self._incoming.pending)  # a partial record may be data
        except ssl.SSLError:
            return True

    # -- internals ------------------------------------------------------------------------------

    async def _flush(self, *, wait: bool = True) -> bool:
        """Send what OpenSSL queued; True if this call waited on anything. With `wait=False`
        (a reader) nothing is done while another task holds the lock: it sends all queued."""
        if not self._outgoing.pending or (not wait and self._send_lock.locked()):
            return False
        lock = self._send_lock
        try:  # uncontended (the usual case): no trip through the scheduler for the lock
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            while self._outgoing.pending:
                data = self._outgoing.read()
                # on the socket itself under a socket stream (sockio: trio's checkpoints
                # without the socket stream's wrapper layers)
                fd = self._fd()
                if fd is None:
                    await self.transport.send_all(data)
                elif fd < 0:
                    raise trio.BrokenResourceError("socket is closed")
                else:
                    await sockio.fd_send_all(fd, data)
        finally:
            lock.release()
        return True

    def _fd(self) -> int | None:
        """The transport's socket descriptor, if it is a socket stream (asked per call: never
        a cached number that a closed socket's successor could reuse)."""
        sock = getattr(self.transport, "socket", None)
        return None if sock is None else sock.fileno()

    async def _fill(self) -> None:
        """`transport.receive_some(READ_SIZE)` into OpenSSL, on the socket itself as `_flush`."""
        fd = self._fd()
        if fd is None:
            data = bytes(await self.transport.receive_some(READ_SIZE))
        elif fd < 0:
            raise trio.BrokenResourceError("socket is closed")
        else:
            data = await sockio.fd_receive_some(fd, READ_SIZE)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    # -- trio.abc.Stream --------------------------------------------------------------------------

    async def do_handshake(self) -> None:
        while True:
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except ssl.SSLError:
                try:  # let the peer see OpenSSL's alert
                    with trio.move_on_after(1):
                        await self._flush()
                except trio.BrokenResourceError:
                    pass
                raise
        await self._flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            limit = READ_SIZE
        else:
            limit = operator.index(max_bytes)
            if limit < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._closed:
            raise trio.ClosedResourceError("TLS stream is closed")
        waited = False
        while True:
            parts: list[bytes] = []
            got = 0
            try:
                while got < limit:
                    chunk = self._obj.read(limit - got)
                    if not chunk:
                        # OpenSSL saw close_notify: CPython returns b"" for it, not
                        # SSLZeroReturnError. Reading on would wait for EOF forever.
                        if parts:
                            break
                        return await self._done(b"", waited)
                    parts.append(chunk)
                    got += len(chunk)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return await self._done(b"".join(parts), waited)
            except ssl.SSLError as exc:
                if parts:
                    return await self._done(b"".join(parts), waited)
                raise await self._broken(exc) from None
            # post-handshake messages (tickets, key update); never wait for the writer
            waited = await self._flush(wait=False) or waited
            if parts:
                return await self._done(b"".join(parts), waited)
            await self._fill()
            waited = True

    @staticmethod
    async def _broken(exc: ssl.SSLError) -> trio.BrokenResourceError:
        """What a read raises for a TLS error with nothing decrypted, after a checkpoint
        (kept out of `receive_some`'s loop: the hot path stays one function)."""
        await trio.lowlevel.checkpoint()
        if isinstance(exc, ssl.SSLEOFError):
            return trio.BrokenResourceError("peer closed without close_notify")
        return trio.BrokenResourceError(f"TLS error: {exc}")

    @staticmethod
    async def _done(data: bytes, waited: bool) -> bytes:
        if not waited:  # every call is a checkpoint, even when OpenSSL had the bytes already
            await trio.lowlevel.checkpoint()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TLS stream is closed")
        if data:
            try:
                self._obj.write(data)
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS error: {exc}") from None
        if not await self._flush():
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                try:
                    self._obj.unwrap()
                except ssl.SSLError:
                    pass
                try:
                    await self._flush()
                except trio.BrokenResourceError:
                    pass
        finally:
            await self.transport.aclose()
