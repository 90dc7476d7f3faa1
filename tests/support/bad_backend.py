"""A misbehaving HTTP/1.1 backend for pool-hygiene tests: raw sockets, keep-alive, and bytes
written where no response was asked for.

Per request, by target:

* `/204`, `/304`: the bodyless answer, then an injected response in the same write;
* `HEAD /head`: a 200 with `Content-Length: 10` and no body (right for HEAD), then the
  injected response in the same write;
* `/cl-same`: a full Content-Length response and the injected one in the same write;
* `/cl-later`: a full response; the injected one in a later write, once the test calls
  `trigger()` (it does after its client has the whole response);
* `/idle`: a full response; the injected bytes (`unsolicited`) only once the test calls
  `trigger()` (it does once the proxy's pool holds the connection idle);
* `/hold`: answers like anything else, but only once the test calls `release()`;
* `/stall`: a head with `Content-Length: 100` and 10 body bytes, then nothing (the
  connection stays open until the peer closes it);
* anything else: `{"ok": true, "target": ..., "conn": N}`.

With `tls` (a server SSLContext) it speaks TLS (meshcar's TLSStream), e.g. as a fake
peer sidecar's mesh listener, to test the outbound's mTLS pool the same way.

`injected` is set after an injected write has left (loopback delivers it to the peer's
socket within the send call), so a test can wait on it before its next client.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass, field
from functools import partial

import trio

from meshcar.net.tls_memory_bio import TLSStream

INJECTED = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 8\r\n\r\nINJECTED"


def _ok(target: str, conn: int) -> bytes:
    body = json.dumps({"ok": True, "target": target, "conn": conn}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
        len(body),
        body,
    )


@dataclass
class BadBackend:
    port: int = 0
    connections: int = 0
    requests: list[str] = field(default_factory=list)
    injected: trio.Event = field(default_factory=trio.Event)
    _go: trio.Event = field(default_factory=trio.Event)
    _released: trio.Event = field(default_factory=trio.Event)
    holding: int = 0  # /hold requests waiting for release()
    tls: ssl.SSLContext | None = None

    def release(self) -> None:
        self._released.set()

    def trigger(self) -> None:
        self._go.set()

    async def _later(self, stream: trio.abc.Stream, data: bytes) -> None:
        await self._go.wait()
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.injected.set()

    async def _handle(self, tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        if self.tls is not None:
            stream = TLSStream(tcp, self.tls, server_side=True)
            try:
                await stream.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError):
                await tcp.aclose()
                return
        self.connections += 1
        n = self.connections
        buf = b""
        async with stream, trio.open_nursery() as nursery:
            try:
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        buf += data
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    method, target = head.split(b" ", 2)[:2]
                    t = target.decode()
                    self.requests.append(f"{method.decode()} {t}")
                    if t == "/204":
                        await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n" + INJECTED)
                        self.injected.set()
                    elif t == "/304":
                        await stream.send_all(
                            b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n' + INJECTED
                        )
                        self.injected.set()
                    elif t == "/head":
                        await stream.send_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + INJECTED
                        )
                        self.injected.set()
                    elif t == "/cl-same":
                        await stream.send_all(_ok(t, n) + INJECTED)
                        self.injected.set()
                    elif t == "/hold":
                        self.holding += 1
                        await self._released.wait()
                        self.holding -= 1
                        await stream.send_all(_ok(t, n))
                    elif t == "/stall":
                        await stream.send_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"
                        )
                    elif t in ("/cl-later", "/idle"):
                        await stream.send_all(_ok(t, n))
                        nursery.start_soon(self._later, stream, INJECTED)
                    else:
                        await stream.send_all(_ok(t, n))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            finally:
                nursery.cancel_scope.cancel()

    async def start(self, nursery: trio.Nursery) -> BadBackend:
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self
