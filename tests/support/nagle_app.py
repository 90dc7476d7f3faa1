"""An app that writes like many real ones: Nagle left on, a response's head and body in two
send() calls (stdlib `http.server` with its default unbuffered writer does the same).

On a keep-alive connection the body then waits in the app's kernel until the head is
ACKed; a reader that delays its ACK (Linux: ~40 ms once the connection is "interactive")
stalls every response by that much. Tests run it as its own process:
`python -m tests.support.nagle_app` binds 127.0.0.1 on a free port and prints the port on
stdout once it listens; it answers every request with a small JSON body until killed.
"""

from __future__ import annotations

import json
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class NagleHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = False  # on purpose: the app under test keeps Nagle on
    wbufsize = 0  # unbuffered: each write() below is one send()

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps(
            {
                "path": self.path,
                "nodelay": self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
            }
        ).encode()
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.wfile.write(head)  # send() 1: the head
        if self.command != "HEAD":
            self.wfile.write(body)  # send() 2: held by Nagle until the head is ACKed

    do_GET = do_POST = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


# A delayed ACK holds the second write for >= 40 ms (TCP_DELACK_MIN): with the stall, every
# request after the first on a connection takes that long. On a loaded 2-core machine
# scheduling alone can push many requests past 20 ms (a median is not robust there), but
# never all of them: the check is that some requests on the reused connection are fast.
STALL_MS = 20.0


def assert_no_ack_stall(ms: list[float]) -> None:
    """`ms`: times of sequential requests on one connection, the first one included."""
    reused = ms[1:]
    fast = sum(t < STALL_MS for t in reused)
    assert fast >= max(1, len(reused) // 8), (
        f"{fast} of {len(reused)} requests under {STALL_MS:g} ms: {[round(t, 1) for t in ms]}"
    )


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), NagleHandler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
