"""Ports for tests that must name a port before something binds it (a config file for a real
process, a port that must refuse connections). Prefer port 0 read back where a component
reports the port it bound; use this only where it cannot.

Why not bind port 0 and close: the kernel hands out the next port of the ephemeral range
(32768-60999 here), the range every concurrent test run and every outgoing connection draws
from, so two runs got the same port ("Address already in use"). Instead each test process
owns a block of BLOCK ports in 10000-32767 (below the ephemeral range, above the demo's fixed
7xxx/9xxx ports): it holds an exclusive flock on a per-block lock file for its lifetime, so no
other process using this helper on the machine hands out ports from the same block. Ports
within the block are handed out once each, and each is checked free by a bind first.
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
import threading
from pathlib import Path

LOW, HIGH = 10000, 32768  # [LOW, HIGH): outside net.ipv4.ip_local_port_range's default
BLOCK = 100
LOCK_DIR = Path(tempfile.gettempdir()) / "meshcar-test-ports"

_lock = threading.Lock()
_held: list[int] = []  # lock file descriptors, kept open (and locked) until the process exits
_next: list[int] = []  # ports of the current block not handed out yet


def _claim_block() -> list[int]:
    LOCK_DIR.mkdir(exist_ok=True)
    blocks = list(range(LOW, HIGH - BLOCK + 1, BLOCK))
    random.shuffle(blocks)
    for base in blocks:
        fd = os.open(LOCK_DIR / f"{base}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held.append(fd)
        return list(range(base, base + BLOCK))
    raise RuntimeError(f"every port block in {LOW}-{HIGH} is held by another test process")


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port no other test process using this helper hands out, free when checked."""
    with _lock:
        while True:
            if not _next:
                _next.extend(_claim_block())
            port = _next.pop(0)
            if _bindable(port, host):
                return port


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    return [free_port(host) for _ in range(n)]


def own_ipv4_or_skip() -> str:
    """A non-loopback IPv4 address of this host (the source address of a route to a TEST-NET
    address: no packet is sent), for tests of loopback-only rules; pytest.skip where none."""
    import pytest

    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.connect(("192.0.2.1", 9))
        own = probe.getsockname()[0]
        probe.close()
    except OSError:
        pytest.skip("this machine has no non-loopback IPv4 address")
    if own.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address")
    return own
