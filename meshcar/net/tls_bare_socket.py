"""A TLS stream for trio in which OpenSSL reads and writes the non-blocking socket itself.

Theory of operation
-------------------
`TLSStream` (net/tls_memory_bio.py) runs OpenSSL over memory BIOs and moves every byte between
the BIOs and the socket in Python. That is flexible (replayed bytes, batched records) but
costs Python work per handshake flight. The edge accepts many short public connections,
and a new connection's Python cost decides its handshake rate, so its public listener uses
this stream instead: `SSLContext.wrap_socket` on the accepted non-blocking socket, with
`SSL_ERROR_WANT_READ`/`WANT_WRITE` turned into trio's `wait_readable`/`wait_writable`. The
ClientHello is still read first, with `MSG_PEEK` (edge/listener.py), so OpenSSL finds it in
the socket. OpenSSL writes alerts straight to the socket, so a client whose handshake
fails sees the real alert.

Rules kept from trio's streams: every `CHECKPOINT_EVERY` operations that did not have to
wait yield to the scheduler (one busy connection cannot starve the others; cancellation
is noticed); errors surface as `trio.BrokenResourceError`; a peer that closes without
close_notify is an error, not a clean end of data (truncation must not look like EOF).
One reader and one writer task at a time, as an HTTP/1.1 proxy needs.
"""

from __future__ import annotations

import operator
import socket
import ssl

import trio

READ_SIZE = 64 * 1024
CHECKPOINT_EVERY = 16


class SocketTLSStream(trio.abc.Stream):
    """The server side of TLS over an accepted non-blocking `socket.socket`, which it takes
    over (and closes)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        # wrap_socket detaches `sock`: from here on the SSLSocket owns the descriptor.
        self._ssl = ctx.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False, suppress_ragged_eofs=False
        )
        self._ops = 0
        self._closed = False
        self._broken = False  # the connection failed: no close_notify to send on close

    # -- what the edge asks of a finished handshake -------------------------------------------

    def getpeercert(self, binary_form: bool = False):  # noqa: ANN201 - mirrors ssl's API
        return self._ssl.getpeercert(binary_form)

    @property
    def session_reused(self) -> bool:
        return bool(self._ssl.session_reused)

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    # -- internals --------------------------------------------------------------------------------

    async def _maybe_checkpoint(self) -> None:
        self._ops += 1
        if self._ops >= CHECKPOINT_EVERY:
            self._ops = 0
            await trio.lowlevel.checkpoint()

    def _broken_error(self, message: str) -> trio.BrokenResourceError:
        self._broken = True
        return trio.BrokenResourceError(message)

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TLS stream is closed")

    # -- trio.abc.Stream --------------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Complete the handshake. ssl.SSLError (an alert, a protocol error) and OSError (the
        peer went away) pass through unchanged, so the caller can tell them apart."""
        self._check_open()
        while True:
            try:
                self._ssl.do_handshake()
                return
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self._ssl)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self._ssl)
            except OSError:
                self._broken = True
                raise

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check_open()
        if max_bytes is None:
            n = READ_SIZE
        else:
            n = operator.index(max_bytes)
            if n < 1:
                raise ValueError("max_bytes must be >= 1")
        while True:
            try:
                data = self._ssl.recv(n)
            except ssl.SSLWantReadError:
                self._ops = 0
                await trio.lowlevel.wait_readable(self._ssl)
                continue
            except ssl.SSLWantWriteError:  # a TLS 1.2 renegotiation attempt wants to write
                self._ops = 0
                await trio.lowlevel.wait_writable(self._ssl)
                continue
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLEOFError:
                raise self._broken_error("peer closed without close_notify") from None
            except ssl.SSLError as exc:
                raise self._broken_error(f"TLS error: {exc}") from None
            except OSError as exc:
                raise self._broken_error(repr(exc)) from None
            await self._maybe_checkpoint()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        if data:
            # Without SSL_MODE_ENABLE_PARTIAL_WRITE, SSL_write either takes all of `data` or
            # asks to be called again with the same buffer once the socket can take more.
            while True:
                try:
                    self._ssl.send(data)
                    break
                except ssl.SSLWantWriteError:
                    self._ops = 0
                    await trio.lowlevel.wait_writable(self._ssl)
                except ssl.SSLWantReadError:
                    self._ops = 0
                    await trio.lowlevel.wait_readable(self._ssl)
                except ssl.SSLError as exc:
                    raise self._broken_error(f"TLS error: {exc}") from None
                except OSError as exc:
                    raise self._broken_error(repr(exc)) from None
        await self._maybe_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()  # a closed socket's fd is -1: ValueError from trio, not this
        await trio.lowlevel.wait_writable(self._ssl)

    def close_now(self) -> None:
        """Send close_notify if the socket takes it at once, then close. Never blocks. After
        a failure (reset, truncation, TLS error) nothing is sent: the peer is gone or the TLS
        state is dead, and a write would only cost a syscall (nginx skips it too)."""
        if self._closed:
            return
        self._closed = True
        if not self._broken:
            try:
                self._ssl.unwrap()  # one SSL_shutdown: queues close_notify, does not wait for the peer's
            except (ssl.SSLError, OSError, ValueError):
                pass
        trio.lowlevel.notify_closing(self._ssl)
        self._ssl.close()

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()
