#!/usr/bin/env python3
"""Issue 12: curl twice on one connection to the demo app -- direct, through a sidecar pair
(in-process, real mTLS), through an edge (terminate) -- 5 rounds; prints ms of request 1/2.

    .venv/bin/python bench/nagle_curl.py              # the demo app as it is
    NAGLE_APP=1 .venv/bin/python bench/nagle_curl.py  # the demo app's old writes (Nagle on,
                                                      # head and body in two send() calls)

A delayed-ACK stall shows as request 2 taking >= 40 ms (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.conftest import sid, start_node  # noqa: E402
from tests.integration.edge_fixtures import public_pki, resolve, start_edge, terminate_route  # noqa: E402
from tests.support.pki import ThrowawayCA  # noqa: E402

OLD_WRITES = "app.DemoHandler.disable_nagle_algorithm = False; app.DemoHandler.wbufsize = 0; "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def curl2(*args: str) -> list[float]:
    r = await trio.run_process(
        ["curl", "-sS", "-o", "/dev/null", "-o", "/dev/null", "-w", "%{time_total} ", *args],
        capture_stdout=True,
    )
    return [float(x) * 1000 for x in r.stdout.split()]


async def main() -> None:
    port = free_port()
    code = (
        "from meshcar.demo import app; "
        + (OLD_WRITES if os.environ.get("NAGLE_APP") == "1" else "")
        + f"app.main(['--name', 'api', '--port', '{port}'])"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    tmp = Path(tempfile.mkdtemp())
    try:
        async with trio.open_nursery() as n:
            for _ in range(200):  # until the app listens
                r = await trio.run_process(
                    ["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/"], check=False
                )
                if r.returncode == 0:
                    break
                await trio.sleep(0.05)
            ca = ThrowawayCA.create()
            server = await start_node(n, tmp, ca, "api", port, [sid("web")], {})
            client = await start_node(
                n,
                tmp,
                ca,
                "web",
                port,
                [],
                {
                    "api": {
                        "endpoints": [f"127.0.0.1:{server.inbound_port}"],
                        "spiffe_id": sid("api"),
                    }
                },
            )
            pki = public_pki(tmp)
            edge = await start_edge(n, tmp, [terminate_route("www.test", port)])
            paths = {
                "direct": [f"http://127.0.0.1:{port}/a", f"http://127.0.0.1:{port}/b"],
                "pair": [
                    "-x",
                    f"http://127.0.0.1:{client.outbound_port}",
                    "http://api/a",
                    "http://api/b",
                ],
                "edge": [
                    *resolve(pki.ca_file, "www.test", edge.https),
                    f"https://www.test:{edge.https}/a",
                    f"https://www.test:{edge.https}/b",
                ],
            }
            for name, args in paths.items():
                runs = [await curl2(*args) for _ in range(5)]
                print(f"{name:7s}", "  ".join(f"{a:.1f}/{b:.1f}" for a, b in runs))
            n.cancel_scope.cancel()
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    trio.run(main)
