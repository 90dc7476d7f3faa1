"""The original destination of a connection redirected by iptables REDIRECT/DNAT.

`SO_ORIGINAL_DST` (netfilter, IPv4) returns the `sockaddr_in` the client dialed before the
kernel rewrote it; `parse_sockaddr_in` is the pure part (tested on bytes), `original_dst`
the getsockopt call.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

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


def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """The pre-redirect destination, or None when the connection was not redirected."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE)
    except OSError:
        return None
    return parse_sockaddr_in(raw)
