"""A misbehaving HTTP/1.1 backend for traffic-policy tests (timeouts, retries, outliers).

Its behaviour is `mode`, changeable while it runs:

* `ok`: 200 `{"ok": true, "name": ...}`;
* `503`: 503 with a small body;
* `slow`: 200 after `delay` seconds;
* `hang`: reads the request and never answers (the connection stays open);
* `reset`: reads the request head and closes with an RST (SO_LINGER 0);
* `silent`: accepts the TCP connection and never reads or writes (a connect or TLS
  handshake that never completes).

`requests` counts request heads read; `seen` is set at each one (replaced after), so a test
can wait for the next request. `GET /__mode/<mode>` switches the mode (answered 200 in any
mode; for a backend run as a process, `python -m tests.support.faulty_app`). With `tls` (a server SSLContext) it speaks TLS, e.g. as a
fake peer sidecar holding the upstream's SVID, so a reset reaches the outbound itself.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
from dataclasses import dataclass, field
from functools import partial

import trio

from meshcar.net.tls_memory_bio import TLSStream


@dataclass
class FaultyApp:
    name: str = "app"
    mode: str = "ok"
    delay: float = 0.0
    tls: ssl.SSLContext | None = None
    port: int = 0
    requests: int = 0
    seen: trio.Event = field(default_factory=trio.Event)

    def _reply(self, status: int) -> bytes:
        body = json.dumps({"ok": status == 200, "name": self.name}).encode()
        reason = b"OK" if status == 200 else b"Service Unavailable"
        return (
            b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
            % (
                status,
                reason,
                len(body),
                body,
            )
        )

    async def _handle(self, tcp: trio.SocketStream) -> None:
        if self.mode == "silent":
            await trio.sleep_forever()
        stream: trio.abc.Stream = tcp
        if self.tls is not None:
            stream = TLSStream(tcp, self.tls, server_side=True)
            try:
                await stream.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError, OSError):
                await tcp.aclose()
                return
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        await stream.aclose()
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        n = int(value)
                        while len(buf) < n:
                            buf += await stream.receive_some(65536)
                        buf = buf[n:]
                target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
                if target.startswith(b"/__mode/"):  # control: GET /__mode/<mode>, any mode
                    self.mode = target[len(b"/__mode/") :].decode()
                    await stream.send_all(self._reply(200))
                    continue
                self.requests += 1
                seen, self.seen = self.seen, trio.Event()
                seen.set()
                mode = self.mode
                if mode == "hang":
                    await trio.sleep_forever()
                if mode == "reset":
                    tcp.socket.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    tcp.socket.close()
                    return
                if mode == "slow":
                    await trio.sleep(self.delay)
                await stream.send_all(self._reply(503 if mode == "503" else 200))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            return

    async def start(self, nursery: trio.Nursery) -> FaultyApp:
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self


async def _main(name: str, port: int, mode: str, delay: float) -> None:
    app = FaultyApp(name, mode, delay, port=port)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.serve_tcp, app._handle, port, host="127.0.0.1"))


if __name__ == "__main__":  # a process for e2e tests: python -m tests.support.faulty_app
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="app")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", default="ok")
    ap.add_argument("--delay", type=float, default=0.0)
    a = ap.parse_args()
    trio.run(_main, a.name, a.port, a.mode, a.delay)
