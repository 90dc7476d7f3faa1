"""The demo's database: a tiny built-in ledger with a server-speaks-first line protocol.

A STAND-IN for a real database (PostgreSQL is not guaranteed on the machine that runs
`meshcar demo`), kept server-speaks-first like PostgreSQL's auth request or MySQL's
greeting, so the mesh's opaque TCP path (`protocol: tcp`, docs/PROTOCOLS.md) is shown
carrying a protocol where the client waits for the server.  One line each way, UTF-8,
`\\n`-terminated, at most `MAX_LINE` bytes:

    server: MESHCAR-LEDGER 1 ready            (sent on connect, before any client byte)
    client: PING               -> PONG
    client: BALANCE <account>  -> OK <account> <cents>
    client: QUIT               -> BYE (and the server closes)
    other                      -> ERR <reason>

The payments app serves it (`meshcar demo-app --ledger-port`) behind its sidecar's
`inbound.tcp`; api reaches it through its own sidecar's `payments-db` tunnel.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from dataclasses import dataclass

GREETING = "MESHCAR-LEDGER 1 ready"
MAX_LINE = 1024
IDLE_SECONDS = 30.0
BALANCES = {"acct-1": 125000, "acct-2": 990}


class ProtocolError(ValueError):
    """The peer did not speak the ledger protocol."""


def answer(line: str) -> tuple[str, bool]:
    """(the reply to one client line, close after it?)."""
    cmd, _, arg = line.strip().partition(" ")
    cmd = cmd.upper()
    if cmd == "PING" and not arg:
        return "PONG", False
    if cmd == "BALANCE" and arg:
        if arg not in BALANCES:
            return f"ERR no account {arg}", False
        return f"OK {arg} {BALANCES[arg]}", False
    if cmd == "QUIT":
        return "BYE", True
    return "ERR unknown command", False


class _Handler(socketserver.StreamRequestHandler):
    timeout = IDLE_SECONDS

    def handle(self) -> None:
        self.wfile.write(GREETING.encode() + b"\n")
        while True:
            try:
                raw = self.rfile.readline(MAX_LINE + 1)
            except OSError:
                return
            if not raw:
                return
            if len(raw) > MAX_LINE or not raw.endswith(b"\n"):
                self.wfile.write(b"ERR line too long\n")
                return
            reply, close = answer(raw.decode("utf-8", "replace"))
            self.wfile.write(reply.encode() + b"\n")
            if close:
                return


class LedgerServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int) -> None:
        super().__init__((host, port), _Handler)

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="ledger", daemon=True)
        t.start()
        return t


@dataclass(frozen=True)
class Exchange:
    greeting: str
    replies: tuple[str, ...]


def query(
    host: str,
    port: int,
    lines: tuple[str, ...] = ("PING", "BALANCE acct-1", "QUIT"),
    *,
    timeout: float = 10.0,
) -> Exchange:
    """Connect, wait for the greeting (the server speaks first), send `lines`, read replies.

    Raises ProtocolError if the connection closes before the greeting (a refused tunnel
    does exactly that) or before a reply."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        f = sock.makefile("rwb")
        greeting = f.readline(MAX_LINE + 1)
        if not greeting:
            raise ProtocolError("closed before the server's greeting")
        if not greeting.startswith(b"MESHCAR-LEDGER "):
            raise ProtocolError(f"not a ledger greeting: {greeting[:80]!r}")
        replies = []
        for line in lines:
            f.write(line.encode() + b"\n")
            f.flush()
            reply = f.readline(MAX_LINE + 1)
            if not reply:
                raise ProtocolError(f"closed before the reply to {line!r}")
            replies.append(reply.decode().rstrip("\n"))
        return Exchange(greeting.decode().rstrip("\n"), tuple(replies))
