"""Accept TCP connections and hand each plain, non-blocking `socket.socket` to a handler task.

Theory of operation: `trio.serve_tcp` wraps every connection in a `SocketStream` (two
setsockopt calls), accepts one connection per scheduler pass and closes the stream after
the handler with a cancel scope of its own. The edge's public listener wants the bare
socket instead (it peeks the ClientHello with `MSG_PEEK` and lets OpenSSL own the socket,
see net/tls_bare_socket.py), so this loop accepts until the kernel says EAGAIN, starts a handler
task per connection with the peer address accept() already returned, and parks on
`wait_readable` only when the queue is empty. The handler may hand the socket on (to an
`SSLSocket`, a trio socket) or close it; whatever it leaves open is closed when it returns,
and an exception from a handler is logged and costs only that connection. Like trio, it binds every address the host resolves to (IPv6 sockets are v6-only), and
when the process runs out of descriptors or memory it logs, waits 100 ms and goes on
instead of dying: the connections it already serves keep working.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("meshcar.net")

Handler = Callable[[socket.socket, tuple], Awaitable[None]]

# Out of resources: wait and retry (as trio.serve_listeners does).
CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# One connection went bad between SYN and accept(): skip it.
SKIP_ERRNOS = {
    errno.ECONNABORTED,
    errno.EPROTO,
    errno.EPERM,
    errno.ENETDOWN,
    errno.ENOPROTOOPT,
    errno.EHOSTDOWN,
    errno.ENONET,
    errno.EHOSTUNREACH,
    errno.EOPNOTSUPP,
    errno.ENETUNREACH,
}
ACCEPT_BATCH = 64  # yield to the scheduler after this many accepts in a row


def bind_listeners(
    host: str, port: int, backlog: int = 0xFFFF, *, reuse_port: bool = False
) -> list[socket.socket]:
    """Listening, non-blocking sockets on every address `host` resolves to; `reuse_port`
    (SO_REUSEPORT) lets `workers: N` processes bind the same port (net/workers.py)."""
    infos = socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        seen = set()
        for family, type_, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)  # the kernel caps it at net.core.somaxconn
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def _run_handler(
    handler: Handler, conn: socket.socket, addr: tuple, on_error: Callable[[str], None] | None
) -> None:
    """A bug met by one connection is logged and ends that connection, not the listener."""
    try:
        await handler(conn, addr)
    except Exception:
        log.exception(json.dumps({"event": "connection.handler_error", "client": str(addr[0])}))
        if on_error is not None:
            on_error("https")
    finally:
        if conn.fileno() != -1:  # not handed on (or the handler failed before it could)
            trio.lowlevel.notify_closing(conn)
            conn.close()


async def _accept_loop(
    lsock: socket.socket,
    handler: Handler,
    nursery: trio.Nursery,
    on_error: Callable[[str], None] | None,
) -> None:
    in_a_row = 0
    while True:
        try:
            conn, addr = lsock.accept()
        except BlockingIOError:
            in_a_row = 0
            await trio.lowlevel.wait_readable(lsock)
            continue
        except OSError as exc:
            if exc.errno in CAPACITY_ERRNOS:
                log.error(
                    json.dumps(
                        {
                            "event": "accept.out_of_resources",
                            "error": str(exc),
                            "listen": str(lsock.getsockname()),
                        }
                    )
                )
                await trio.sleep(0.1)
                continue
            if exc.errno in SKIP_ERRNOS:
                continue
            raise
        conn.setblocking(False)
        nursery.start_soon(_run_handler, handler, conn, addr, on_error)
        in_a_row += 1
        if in_a_row >= ACCEPT_BATCH:
            in_a_row = 0
            await trio.lowlevel.checkpoint()


async def serve_sockets(
    handler: Handler,
    host: str,
    port: int,
    *,
    on_error: Callable[[str], None] | None = None,
    handler_nursery: trio.Nursery | None = None,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[list[socket.socket]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `task_status.started` gets the bound listening sockets.
    Handlers run in `handler_nursery` if given (as `trio.serve_listeners`), so cancelling
    the listener closes the listening sockets but not the connections already accepted."""
    listeners = bind_listeners(host, port, reuse_port=reuse_port)
    try:
        async with trio.open_nursery() as nursery:
            for lsock in listeners:
                nursery.start_soon(
                    _accept_loop, lsock, handler, handler_nursery or nursery, on_error
                )
            task_status.started(listeners)
    finally:
        for lsock in listeners:
            trio.lowlevel.notify_closing(lsock)
            lsock.close()
