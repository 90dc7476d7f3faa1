"""Admin lockdown: a peer off loopback (another network namespace, as another pod would be)
gets only /live, /ready and /metrics; /certs, POST /renew and POST /shutdown are refused."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from functools import partial

import httpx
import pytest
import trio
import trio.testing

from meshcar.admin.metrics import Metrics
from meshcar.admin.server import AdminHooks, AdminServer

NS = f"mcadm{os.getpid() % 100000}"
HOST_IP, NS_IP = "10.213.0.1", "10.213.0.2"


class Calls:
    def __init__(self) -> None:
        self.renewed = 0
        self.shut = 0

    async def renew(self) -> dict:
        self.renewed += 1
        return {"renewed": True}

    def shutdown(self) -> None:
        self.shut += 1


def _sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def _netns_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a network namespace and a veth pair"
    if shutil.which("ip") is None or shutil.which("curl") is None:
        return "needs ip (iproute2) and curl"
    return None


@pytest.fixture
def other_pod() -> Iterator[str]:
    reason = _netns_skip_reason()
    if reason:
        pytest.skip(reason)
    _sh("ip", "netns", "del", NS)
    _sh("ip", "link", "del", f"{NS}h")
    steps = [
        ("ip", "netns", "add", NS),
        ("ip", "link", "add", f"{NS}h", "type", "veth", "peer", "name", f"{NS}p"),
        ("ip", "link", "set", f"{NS}p", "netns", NS),
        ("ip", "addr", "add", f"{HOST_IP}/30", "dev", f"{NS}h"),
        ("ip", "link", "set", f"{NS}h", "up"),
        ("ip", "netns", "exec", NS, "ip", "addr", "add", f"{NS_IP}/30", "dev", f"{NS}p"),
        ("ip", "netns", "exec", NS, "ip", "link", "set", f"{NS}p", "up"),
        ("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up"),
    ]
    try:
        for step in steps:
            r = _sh(*step)
            if r.returncode != 0:
                pytest.skip(
                    f"cannot set up a network namespace here: {' '.join(step)}: {r.stderr.strip()}"
                )
        yield NS
    finally:
        _sh("ip", "link", "del", f"{NS}h")
        _sh("ip", "netns", "del", NS)


async def _serve(
    nursery: trio.Nursery, calls: Calls, public: frozenset[bytes] | None = None
) -> int:
    hooks = AdminHooks(lambda: (True, "ok"), lambda: {"serial": "ab"}, calls.renew, calls.shutdown)
    admin = (
        AdminServer(Metrics(), hooks) if public is None else AdminServer(Metrics(), hooks, public)
    )
    listeners = await nursery.start(trio.serve_tcp, admin.handle_connection, 0)
    return listeners[0].socket.getsockname()[1]


async def _curl_from(ns: str, method: str, url: str) -> int:
    r = await trio.run_process(
        [
            "ip",
            "netns",
            "exec",
            ns,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            method,
            "--max-time",
            "10",
            url,
        ],
        capture_stdout=True,
        check=False,
    )
    return int(r.stdout.decode() or 0)


async def test_other_namespace_gets_probes_only(other_pod: str, nursery: trio.Nursery) -> None:
    calls = Calls()
    port = await _serve(nursery, calls)
    base = f"http://{HOST_IP}:{port}"
    assert await _curl_from(other_pod, "GET", f"{base}/live") == 200
    assert await _curl_from(other_pod, "GET", f"{base}/ready") == 200
    assert await _curl_from(other_pod, "GET", f"{base}/metrics") == 200
    assert await _curl_from(other_pod, "GET", f"{base}/certs") == 403
    assert await _curl_from(other_pod, "POST", f"{base}/renew") == 403
    assert await _curl_from(other_pod, "POST", f"{base}/shutdown") == 403
    assert await _curl_from(other_pod, "POST", f"{base}/shutdown?x=/live") == 403
    assert (calls.renewed, calls.shut) == (0, 0)
    # the same process, from loopback: everything is served
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
        assert (await c.get("/certs")).status_code == 200
        assert (await c.post("/renew")).status_code == 200
        assert (await c.post("/shutdown")).status_code == 202
    assert (calls.renewed, calls.shut) == (1, 1)


async def test_configured_public_paths_from_another_namespace(
    other_pod: str, nursery: trio.Nursery
) -> None:
    """`admin.public_paths: [/ready, /certs]`: exactly those off loopback, never /renew or /shutdown."""
    from meshcar.sidecar.config import load_config_text
    from tests.unit.test_sidecar_config import GOOD

    cfg = load_config_text(
        GOOD.replace(
            "admin: {listen: 127.0.0.1:7202}",
            "admin: {listen: 127.0.0.1:7202, public_paths: [/ready, /certs]}",
        ),
        "s.yaml",
    )
    calls = Calls()
    port = await _serve(nursery, calls, cfg.admin_public_paths)
    base = f"http://{HOST_IP}:{port}"
    assert await _curl_from(other_pod, "GET", f"{base}/ready") == 200
    assert await _curl_from(other_pod, "GET", f"{base}/certs") == 200
    assert await _curl_from(other_pod, "GET", f"{base}/live") == 403
    assert await _curl_from(other_pod, "GET", f"{base}/metrics") == 403
    assert await _curl_from(other_pod, "POST", f"{base}/renew") == 403
    assert await _curl_from(other_pod, "POST", f"{base}/shutdown") == 403
    assert (calls.renewed, calls.shut) == (0, 0)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
        assert (await c.get("/live")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200


async def test_loopback_only_rule_without_namespaces(nursery: trio.Nursery) -> None:
    """Where no namespace can be made: a non-loopback address of this host is still refused."""
    import socket

    calls = Calls()
    port = await _serve(nursery, calls)
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a source address
        own = probe.getsockname()[0]
        probe.close()
    except OSError:
        pytest.skip("this machine has no non-loopback IPv4 address")
    if own.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address")
    async with httpx.AsyncClient(base_url=f"http://{own}:{port}") as c:
        assert (await c.get("/ready")).status_code == 200
        assert (await c.get("/certs")).status_code == 403
        assert (await c.post("/renew")).status_code == 403
    assert calls.renewed == 0


async def test_admin_connections_over_the_limit_get_503_and_the_listener_recovers(
    nursery: trio.Nursery,
) -> None:
    metrics = Metrics()
    admin = AdminServer(metrics, AdminHooks(lambda: (True, "ok"), dict), max_connections=1)
    listeners = await nursery.start(
        partial(trio.serve_tcp, admin.handle_connection, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    held = await trio.open_tcp_stream("127.0.0.1", port)
    await trio.testing.wait_all_tasks_blocked()
    over = await trio.open_tcp_stream("127.0.0.1", port)
    await over.send_all(b"GET /live HTTP/1.1\r\nHost: a\r\n\r\n")
    got = b""
    with trio.fail_after(10):
        while chunk := await over.receive_some(4096):
            got += chunk
    assert got.startswith(b"HTTP/1.1 503") and b"connection limit" in got
    await over.aclose()
    assert b'meshcar_listener_connections_refused_total{listener="admin"} 1.0' in metrics.render()
    await held.aclose()
    with trio.fail_after(10):
        while admin.conn_limit.open:
            await trio.sleep(0.01)
    async with httpx.AsyncClient(timeout=5) as c:
        assert (await c.get(f"http://127.0.0.1:{port}/live")).status_code == 200
