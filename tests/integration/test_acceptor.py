"""net/acceptor.py: the edge's accept loop, with real sockets and a real process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from functools import partial

import pytest
import trio

from meshcar.net.acceptor import bind_listeners, serve_sockets


async def _greet(seen: list[tuple], sock: socket.socket, addr: tuple) -> None:
    seen.append(addr)
    try:
        sock.send(b"hi")
    finally:
        sock.close()


async def test_every_connection_gets_a_task_with_its_peer_address(nursery: trio.Nursery) -> None:
    seen: list[tuple] = []
    listeners = await nursery.start(partial(serve_sockets, partial(_greet, seen), "127.0.0.1", 0))
    port = listeners[0].getsockname()[1]
    streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(100)]
    for s in streams:
        with trio.fail_after(5):
            assert await s.receive_some(10) == b"hi"
        await s.aclose()
    assert len(seen) == 100
    assert {a[0] for a in seen} == {"127.0.0.1"}
    assert len({a[1] for a in seen}) == 100  # each task got its own client's address


async def test_a_failing_handler_costs_only_its_connection(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(sock: socket.socket, addr: tuple) -> None:
        data = b""
        while not data:
            try:
                data = sock.recv(10)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
        if data == b"boom":
            raise RuntimeError("a bug in the handler")
        sock.send(b"ok:" + data)
        sock.close()

    listeners = await nursery.start(partial(serve_sockets, handler, "127.0.0.1", 0))
    port = listeners[0].getsockname()[1]
    for payload, expected in ((b"boom", b""), (b"fine", b"ok:fine")):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(payload)
        with trio.fail_after(5):
            assert await stream.receive_some(10) == expected  # closed (not left open) after the bug
        await stream.aclose()
    assert "connection.handler_error" in caplog.text and "a bug in the handler" in caplog.text


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(
    not _has_ipv6_loopback(), reason="needs IPv6 loopback (::1), absent on this machine"
)
async def test_ipv6_loopback(nursery: trio.Nursery) -> None:
    seen: list[tuple] = []
    listeners = await nursery.start(partial(serve_sockets, partial(_greet, seen), "::1", 0))
    assert listeners[0].family == socket.AF_INET6
    stream = await trio.open_tcp_stream("::1", listeners[0].getsockname()[1])
    with trio.fail_after(5):
        assert await stream.receive_some(10) == b"hi"
    await stream.aclose()
    assert seen[0][0] == "::1"


def test_binds_every_address_and_refuses_a_taken_port() -> None:
    socks = bind_listeners("localhost", 0)
    try:
        families = {s.family for s in socks}
        assert socket.AF_INET in families
        assert all(s.getblocking() is False for s in socks)
        taken = socks[0].getsockname()[1]
        try:
            bind_listeners("127.0.0.1", taken)
        except OSError:
            pass
        else:
            raise AssertionError("a second listener on a taken port must fail")
    finally:
        for s in socks:
            s.close()


# Runs in its own process: it lowers its descriptor limit so that accept() fails with EMFILE.
OUT_OF_FDS = r"""
import os, resource, socket, sys, trio
from meshcar.net.acceptor import serve_sockets

async def hold(sock, addr):
    try:
        sock.send(b"hi")
        await trio.lowlevel.wait_readable(sock)  # until the client closes
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()

async def main():
    async with trio.open_nursery() as n:
        listeners = await n.start(serve_sockets, hold, "127.0.0.1", 0)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 2, hard))
        print(listeners[0].getsockname()[1], flush=True)

trio.run(main)
"""


def test_out_of_descriptors_waits_and_keeps_serving() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", OUT_OF_FDS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(12)]
        # only a few fit under the limit; each one closed makes room for the next in the queue
        for c in clients:
            assert c.recv(2) == b"hi"
            c.close()
        time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "accept.out_of_resources" in err and "Too many open files" in err
