"""h11 vs httptools on the proxy path: throughput and smuggling-vector behaviour (a script).

Run: ``.venv/bin/python bench/parser_bench.py [--seconds 1.0] [--repeat 3]``

Part 1 times each parser on the messages a sidecar parses: request heads, requests with a
16 KiB Content-Length body, requests with a chunked body (4 x 4 KiB), small responses and
chunked responses. Each message arrives as one ``bytes`` object (one socket read). Both
parsers collect the header list (a proxy needs it) and touch, but do not copy, body data.

* httptools: one parser per connection, fed a keep-alive stream, one message per feed.
* h11: a fresh ``h11.Connection`` per message, because h11 only starts the next cycle once
  our own side has finished a message too (a server must send a response first). The cost
  of creating the connection (and, for responses, of sending the request h11 insists on)
  is timed separately and printed, so it can be subtracted.

Throughput is the best of ``--repeat`` runs of ``--seconds`` each (best-of filters noise
from other processes on the machine). Part 2 feeds classic request-smuggling vectors to
both parsers, each out of the box (no wrapper checks), and prints what each did. When
meshcar.proto.http1 (the wrapper the sidecar uses) is importable, it gets a column too.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import h11
import httptools

try:  # the lead's wrapper on the proxy path (meshcar/proto/http1.py), when present
    from meshcar.proto import http1 as meshcar_http1
except ImportError:  # pragma: no cover - the bench also runs without it
    meshcar_http1 = None  # type: ignore[assignment]

# --- workloads --------------------------------------------------------------------------

HEAD = (
    b"Host: api.demo.test\r\n"
    b"User-Agent: curl/7.88.1\r\n"
    b"Accept: application/json\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"X-Request-Id: 3f2b8a1c-5d4e-4f6a-9b7c-1e2d3c4b5a69\r\n"
    b"Traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
    b"Authorization: Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhcGkifQ.c2ln\r\n"
    b"Connection: keep-alive\r\n"
)
BODY_16K = b"x" * 16384


def _chunked(body: bytes, size: int) -> bytes:
    out = b"".join(
        b"%x\r\n" % len(body[i : i + size]) + body[i : i + size] + b"\r\n"
        for i in range(0, len(body), size)
    )
    return out + b"0\r\n\r\n"


REQUESTS = {
    "request head only (GET)": b"GET /v1/hello?x=1 HTTP/1.1\r\n" + HEAD + b"\r\n",
    "request + 16 KiB Content-Length body": (
        b"POST /v1/pay HTTP/1.1\r\n" + HEAD + b"Content-Length: 16384\r\n\r\n" + BODY_16K
    ),
    "request + chunked body (4 x 4 KiB)": (
        b"POST /v1/pay HTTP/1.1\r\n"
        + HEAD
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + _chunked(BODY_16K, 4096)
    ),
}
RESP_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
    b"Server: demo\r\n"
    b"Cache-Control: no-store\r\n"
    b"X-Request-Id: 3f2b8a1c-5d4e-4f6a-9b7c-1e2d3c4b5a69\r\n"
)
RESP_BODY = b'{"service":"api","method":"GET","path":"/v1/hello","ok":true}' * 2
RESPONSES = {
    "response + small JSON body (CL)": (
        RESP_HEAD + b"Content-Length: %d\r\n\r\n" % len(RESP_BODY) + RESP_BODY
    ),
    "response + chunked body (4 x 4 KiB)": (
        RESP_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(BODY_16K, 4096)
    ),
}

# --- httptools --------------------------------------------------------------------------


class _Collector:
    """httptools callbacks: keep the header list, count body bytes and messages."""

    __slots__ = ("headers", "body", "done", "url")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = 0
        self.done = 0
        self.url = b""

    def on_message_begin(self) -> None:
        self.headers = []
        self.body = 0

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += len(body)

    def on_message_complete(self) -> None:
        self.done += 1


def httptools_loop(message: bytes, kind: str) -> Callable[[int], int]:
    def run(n: int) -> int:
        proto = _Collector()
        parser = (
            httptools.HttpRequestParser(proto)
            if kind == "request"
            else httptools.HttpResponseParser(proto)
        )
        feed = parser.feed_data
        for _ in range(n):
            feed(message)
        assert proto.done == n, (proto.done, n)
        return n

    return run


def meshcar_loop(message: bytes, kind: str) -> Callable[[int], int]:
    assert meshcar_http1 is not None

    def run(n: int) -> int:
        parser = meshcar_http1.Http1Parser(kind)
        done = 0
        for _ in range(n):
            for event in parser.feed(message):
                if type(event) is meshcar_http1.EndOfMessage:
                    done += 1
        assert done == n, (done, n)
        return n

    return run


# --- h11 --------------------------------------------------------------------------------

_H11_REQ = h11.Request(method="GET", target="/v1/hello", headers=[("Host", "api.demo.test")])


def h11_loop(message: bytes, kind: str) -> Callable[[int], int]:
    def run(n: int) -> int:
        done = 0
        for _ in range(n):
            if kind == "request":
                conn = h11.Connection(h11.SERVER)
            else:
                conn = h11.Connection(h11.CLIENT)
                conn.send(_H11_REQ)
                conn.send(h11.EndOfMessage())
            conn.receive_data(message)
            body = 0
            while True:
                event = conn.next_event()
                if type(event) is h11.Data:
                    body += len(event.data)
                elif type(event) is h11.EndOfMessage:
                    done += 1
                    break
                elif event is h11.NEED_DATA:
                    raise AssertionError("h11 wants more data")
                else:
                    _ = event.headers  # type: ignore[union-attr]
        assert done == n
        return n

    return run


def h11_overhead(kind: str) -> Callable[[int], int]:
    """Just the per-message set-up the h11 loop pays on top of parsing."""

    def run(n: int) -> int:
        for _ in range(n):
            conn = h11.Connection(h11.SERVER if kind == "request" else h11.CLIENT)
            if kind == "response":
                conn.send(_H11_REQ)
                conn.send(h11.EndOfMessage())
        return n

    return run


# --- timing -----------------------------------------------------------------------------


def rate(fn: Callable[[int], int], seconds: float, repeat: int) -> float:
    """Best messages/s over ``repeat`` runs of about ``seconds`` each."""
    n = 1
    while True:  # calibrate
        t0 = time.perf_counter()
        fn(n)
        dt = time.perf_counter() - t0
        if dt > 0.05:
            break
        n *= 2
    n = max(1, int(n * seconds / dt))
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(n)
        best = max(best, n / (time.perf_counter() - t0))
    return best


# --- smuggling vectors ------------------------------------------------------------------

NEXT = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


def _req(head: bytes, body: bytes = b"") -> bytes:
    return b"POST / HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n" + body


VECTORS: list[tuple[str, bytes]] = [
    ("baseline: Content-Length: 5", _req(b"Content-Length: 5\r\n", b"hello")),
    ("baseline: chunked", _req(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n")),
    (
        "CL + TE (CL first)",
        _req(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\nX"),
    ),
    (
        "TE + CL (TE first)",
        _req(b"Transfer-Encoding: chunked\r\nContent-Length: 6\r\n", b"0\r\n\r\nX"),
    ),
    ("duplicate CL, same value", _req(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello")),
    ("duplicate CL, different", _req(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!")),
    ("CL list '5, 5'", _req(b"Content-Length: 5, 5\r\n", b"hello")),
    ("CL list '5, 6'", _req(b"Content-Length: 5, 6\r\n", b"hello!")),
    ("CL '+5'", _req(b"Content-Length: +5\r\n", b"hello")),
    ("CL '-1'", _req(b"Content-Length: -1\r\n")),
    ("CL '0x5'", _req(b"Content-Length: 0x5\r\n", b"hello")),
    ("CL huge (2^64)", _req(b"Content-Length: 18446744073709551616\r\n")),
    ("space before colon (CL)", _req(b"Content-Length : 5\r\n", b"hello")),
    (
        "TE 'chunked, identity'",
        _req(b"Transfer-Encoding: chunked, identity\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    ),
    ("TE 'xchunked'", _req(b"Transfer-Encoding: xchunked\r\n", b"5\r\nhello\r\n0\r\n\r\n")),
    ("TE 'identity'", _req(b"Transfer-Encoding: identity\r\n", b"hello")),
    (
        "TE 'gzip, chunked' (valid, unsupported)",
        _req(b"Transfer-Encoding: gzip, chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    ),
    (
        "TE twice (chunked + chunked)",
        _req(
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            b"5\r\nhello\r\n0\r\n\r\n",
        ),
    ),
    (
        "TE with vertical tab '\\x0bchunked'",
        _req(b"Transfer-Encoding: \x0bchunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    ),
    (
        "TE on HTTP/1.0 (keep-alive)",
        b"POST / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ),
    ("obs-fold (X-A: a / SP b)", _req(b"X-A: a\r\n b\r\nContent-Length: 5\r\n", b"hello")),
    (
        "obs-fold on Transfer-Encoding",
        _req(b"Transfer-Encoding:\r\n chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    ),
    ("bare LF line endings", b"GET / HTTP/1.1\nHost: x\n\n"),
    ("bare LF ending one header", _req(b"X-A: a\nContent-Length: 5\r\n", b"hello")),
    ("bare CR in header value", _req(b"X-A: a\rb\r\nContent-Length: 5\r\n", b"hello")),
    ("NUL in header value", _req(b"X-A: a\x00b\r\nContent-Length: 5\r\n", b"hello")),
    ("space in header name", _req(b"X A: b\r\nContent-Length: 5\r\n", b"hello")),
    (
        "chunk size overflow",
        _req(b"Transfer-Encoding: chunked\r\n", b"10000000000000005\r\nhello\r\n0\r\n\r\n"),
    ),
    (
        "chunk line ends with bare LF",
        _req(b"Transfer-Encoding: chunked\r\n", b"5\nhello\r\n0\r\n\r\n"),
    ),
    ("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n"),
]


@dataclass(frozen=True)
class Outcome:
    rejected: bool
    detail: str

    def __str__(self) -> str:
        return ("REJECT" if self.rejected else "accept") + (
            f" ({self.detail})" if self.detail else ""
        )


def run_h11(data: bytes) -> Outcome:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    body = b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return Outcome(False, f"waits for body, has {len(body)} B")
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return Outcome(False, f"body {body!r}")
    except h11.RemoteProtocolError as exc:
        return Outcome(True, str(exc)[:40])


class _VectorCollector:
    """httptools callbacks for one vector: the first message's body, message count."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.done = 0

    def on_body(self, body: bytes) -> None:
        if self.done == 0:
            self.bodies.append(bytes(body))

    def on_message_complete(self) -> None:
        self.done += 1


def run_httptools(data: bytes) -> Outcome:
    proto = _VectorCollector()
    bodies = proto.bodies
    parser = httptools.HttpRequestParser(proto)
    try:
        parser.feed_data(data)
    except httptools.HttpParserError as exc:
        return Outcome(True, str(exc)[:40])
    body = b"".join(bodies)
    if proto.done == 0:
        return Outcome(False, f"waits for body, has {len(body)} B")
    return Outcome(False, f"body {body!r}, {proto.done} msgs")


def run_meshcar(data: bytes) -> Outcome:
    assert meshcar_http1 is not None
    parser = meshcar_http1.Http1Parser("request")
    body = b""
    try:
        for event in parser.feed(data):
            if type(event) is meshcar_http1.Data:
                body += event.data
            elif type(event) is meshcar_http1.EndOfMessage:
                return Outcome(False, f"body {body!r}")
    except Exception as exc:  # ProtocolError, with the status it would answer
        return Outcome(True, f"{getattr(exc, 'status', '?')} {exc}"[:40])
    return Outcome(False, f"waits for body, has {len(body)} B")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    print(
        f"# python {platform.python_version()} on {platform.machine()}, "
        f"h11 {h11.__version__}, httptools {httptools.__version__}"
    )
    print(f"# best of {args.repeat} x ~{args.seconds:.1f} s per cell; messages/s (µs/message)\n")
    wrap = meshcar_http1 is not None
    print(
        "| workload | bytes | h11 msg/s | httptools msg/s | httptools/h11 | h11 set-up share |"
        + (" meshcar Http1Parser msg/s | Http1Parser/h11 |" if wrap else "")
    )
    print("|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if wrap else ""))
    for kind, table in (("request", REQUESTS), ("response", RESPONSES)):
        overhead = rate(h11_overhead(kind), args.seconds, args.repeat)
        for name, message in table.items():
            h = rate(h11_loop(message, kind), args.seconds, args.repeat)
            t = rate(httptools_loop(message, kind), args.seconds, args.repeat)
            share = (1 / overhead) / (1 / h)
            line = (
                f"| {name} | {len(message)} | {h:,.0f} ({1e6 / h:.1f}) | "
                f"{t:,.0f} ({1e6 / t:.2f}) | {t / h:.1f}x | {share:.0%} |"
            )
            if wrap:
                m = rate(meshcar_loop(message, kind), args.seconds, args.repeat)
                line += f" {m:,.0f} ({1e6 / m:.2f}) | {m / h:.1f}x |"
            print(line)
            sys.stdout.flush()

    print("\n| smuggling vector | h11 | httptools |" + (" meshcar Http1Parser |" if wrap else ""))
    print("|---|---|---|" + ("---|" if wrap else ""))
    for name, data in VECTORS:
        line = f"| {name} | {run_h11(data + NEXT)} | {run_httptools(data + NEXT)} |"
        if wrap:
            line += f" {run_meshcar(data + NEXT)} |"
        print(line.replace("\n", " "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
