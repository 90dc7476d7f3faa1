"""Is a plain TCP connection HTTP/2 with prior knowledge? (No h2 import: idle cost nil.)"""

from __future__ import annotations

import socket

import trio


async def is_h2_preface(stream: trio.abc.Stream) -> bool:
    """Does the plain TCP connection start with the HTTP/2 client preface (h2c with prior
    knowledge)? Peeks without consuming (one MSG_PEEK when the first bytes arrive)."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return False
    try:
        first = await sock.recv(4, socket.MSG_PEEK)
    except OSError:
        return False
    return first == b"PRI "
