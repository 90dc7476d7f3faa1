"""The original destination of a connection redirected by iptables REDIRECT/DNAT.

`SO_ORIGINAL_DST` (netfilter, IPv4) returns the `sockaddr_in` the client dialed before the
kernel rewrote it; `parse_sockaddr_in` is the pure part (tested on bytes), `original_dst`
the getsockopt call.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Protocol

SO_ORIGINAL_DST = 80  # from linux/netfilter_ipv4.h
SOCKADDR_IN_SIZE = 16


def parse_sockaddr_in(raw: bytes) -> tuple[str, int]:
    """(IPv4 address, port) from a struct sockaddr_in (port and address in network order)."""
    if len(raw) < 8:
        raise ValueError(f"sockaddr_in too short: {len(raw)} bytes")
    family = struct.unpack_from("=H", raw, 0)[0]
    if family != socket.AF_INET:
        raise ValueError(f"not an AF_INET address (family {family})")
    port = struct.unpack_from("!H", raw, 2)[0]
    return str(ipaddress.IPv4Address(raw[4:8])), port


class _HasGetsockopt(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...


def original_dst(sock: _HasGetsockopt) -> tuple[str, int] | None:
    """The pre-redirect destination, or None when the kernel has none for this connection.

    `sock` is a stdlib or trio socket (both forward `getsockopt`). A connection made straight
    to the listener (not redirected) may still report the listener's own address: callers
    must treat the answer as a lookup key, never as a place to connect to.
    """
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE)
    except OSError:
        return None
    try:
        return parse_sockaddr_in(raw)
    except ValueError:
        return None
