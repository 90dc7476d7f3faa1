"""Sans-IO HTTP/1.1 message framing on top of httptools (llhttp).

Theory of operation
-------------------
`Http1Parser` turns bytes into a small set of events, in the style of h11: a head
(`RequestHead` / `ResponseHead`), zero or more `Data` chunks, then `EndOfMessage`. The C
parser does all the parsing (request line, headers, chunked decoding, Content-Length
arithmetic) and rejects the classic smuggling vectors itself: Content-Length together with
Transfer-Encoding, duplicate or malformed Content-Length, a Transfer-Encoding other than
`chunked` last, obs-fold, bare LF. Any such error becomes `ProtocolError` with a status hint
(400 for a request, 502 for a response from upstream); the caller answers and closes.

We never hand-parse HTTP here: the only header inspection is of the already-parsed header
list, to decide framing for re-serialisation and to refuse what we do not proxy.

Bodies are never buffered: every `feed()` returns the events produced by that slice of
bytes, so memory is bounded by the read size. The parser is reused across keep-alive
messages; a response to HEAD (or a 1xx/204/304) has no body whatever its headers say,
which llhttp cannot be told, so for those the parser stops after the head and is renewed.
The upstream answers one request at a time, so on the response side any byte after a final
response in the same read (after a bodyless head, or after a body) is nobody's response:
the parser sets `leftover` and refuses to read on, and the connection is never reused.
A response without Content-Length or chunked framing is delimited by connection close: the
caller ends it with `feed_eof()`.

A protocol switch ends HTTP/1.1 on a connection: llhttp stops after an upgrade request
(`Connection: upgrade` + Upgrade) or a 101. The request is delivered with `upgrade` set and
`keep_alive` False (HTTP/1.1 only; a WebSocket upgrade must be a GET; CONNECT is refused
with 501), the 101 as an ordinary interim head; the bytes after it in the same read are
kept in `upgrade_tail` for the relay (net/upgrade.py), and any further feed is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import httptools

from meshcar.errors import ProtocolError

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_HEADER_VALUE_BYTES = 16 * 1024  # nginx and Apache: 8 KiB a line; room for big JWTs and cookies
UNDERSCORE_ACTIONS = ("reject", "drop")

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    """What a listener accepts in request headers (the same policy on every listener).

    `underscores`: a header name containing `_` is refused with 400 (`reject`, Envoy's
    REJECT_REQUEST) or removed before anything sees it (`drop`, Envoy's DROP_HEADER): many
    frameworks fold `_` into `-` (CGI, nginx's underscores_in_headers), so
    `X_Forwarded_Client_Cert` could pass for a header meshcar strips. `max_count` header
    lines (dropped ones included; 431 beyond), `max_value_bytes` per value (431 beyond); the
    whole head stays within MAX_HEAD_BYTES. Response heads keep the fixed defaults.
    """

    underscores: str = "reject"
    max_count: int = MAX_HEADERS
    max_value_bytes: int = MAX_HEADER_VALUE_BYTES

    def __post_init__(self) -> None:
        if self.underscores not in UNDERSCORE_ACTIONS:
            raise ValueError(f"underscores must be one of {UNDERSCORE_ACTIONS}")
        if self.max_count < 1 or self.max_value_bytes < 1:
            raise ValueError("header limits must be >= 1")


DEFAULT_HEADER_POLICY = HeaderPolicy()


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: bytes
    target: bytes
    version: str
    headers: Headers
    keep_alive: bool
    chunked: bool
    content_length: int | None
    # the Upgrade header of a request asking to switch protocols (`Connection: upgrade`);
    # such a request is the last one on its connection (keep_alive is False)
    upgrade: bytes | None = None

    def header(self, name: bytes) -> bytes | None:
        return get_header(self.headers, name)


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: str
    headers: Headers
    keep_alive: bool
    chunked: bool
    content_length: int | None
    until_close: bool  # body delimited by connection close

    def header(self, name: bytes) -> bytes | None:
        return get_header(self.headers, name)


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    pass


END = EndOfMessage()
Event = RequestHead | ResponseHead | Data | EndOfMessage


def get_header(headers: Headers, name: bytes) -> bytes | None:
    lname = name.lower()
    for k, v in headers:
        if k.lower() == lname:
            return v
    return None


def _upgrade_problem(req: RequestHead, allow_connect: bool = False) -> str:
    """Why an upgrade request (llhttp saw `Connection: upgrade` and Upgrade, or CONNECT)
    cannot be proxied, or "" (RFC 9110 7.8; RFC 6455 4.1 for websocket). CONNECT only
    where the listener takes it (`allow_connect`: the sidecar's outbound HTTP proxy)."""
    if req.method == b"CONNECT":
        return "" if allow_connect and req.version == "1.1" else "CONNECT is not supported"
    value = req.header(b"upgrade")
    if value is None or not value.strip():
        return "Connection: upgrade without an Upgrade header"
    if req.version != "1.1":
        return "a protocol upgrade needs HTTP/1.1"
    tokens = [t.strip().lower() for t in value.split(b",")]
    if b"websocket" in tokens and req.method != b"GET":
        return "a WebSocket upgrade must be a GET request"
    return ""


def _switching(head: RequestHead) -> RequestHead:
    """An upgrade request (or an allowed CONNECT) as delivered: the connection's last."""
    if head.method == b"CONNECT":
        return replace(head, keep_alive=False)
    return replace(head, upgrade=head.header(b"upgrade"), keep_alive=False)


def _check_request_head(version: str, te: bytes | None, headers: Headers) -> None:
    """What meshcar refuses in a request head that llhttp accepted (400)."""
    if te is not None and (version != "1.1" or te.strip().lower() != b"chunked"):
        # RFC 9112 6.1: Transfer-Encoding on HTTP/1.0 is faulty framing; and meshcar
        # forwards only `chunked` alone (it does not track other codings).
        raise ProtocolError(
            "Transfer-Encoding must be exactly `chunked`, and only in a version 1.1 request",
            400,
        )
    hosts = sum(1 for n, _ in headers if n.lower() == b"host")
    if version == "1.1" and hosts == 0:
        raise ProtocolError("HTTP/1.1 request without a Host header", 400)
    if hosts > 1:
        raise ProtocolError("more than one Host header (RFC 9112 3.2)", 400)


class _StopAfterHead(Exception):
    """Raised inside the callback to stop llhttp after a head that has no body."""


class _StopAtLeftover(Exception):
    """Raised when a response stream goes on after its final response in the same feed."""


class Http1Parser:
    """Parse one direction of an HTTP/1.1 connection into events (see module docstring)."""

    def __init__(self, kind: str, policy: HeaderPolicy = DEFAULT_HEADER_POLICY) -> None:
        if kind not in ("request", "response"):
            raise ValueError(kind)
        self._kind = kind
        self._policy = policy if kind == "request" else DEFAULT_HEADER_POLICY
        self._header_lines = 0
        self._events: list[Event] = []
        self._headers: Headers = []
        self._url = b""
        self._head_bytes = 0
        self._in_head = True
        self._until_close = False
        self._expect_no_body = False  # set by the caller before feeding a HEAD response
        self._parsed_head = 0
        self._final_done = False  # a final (non-1xx) response ended in the current feed
        self._tail = b""  # the last bytes of the previous feed (a head terminator may span feeds)
        self.leftover = False  # bytes followed a complete response: the connection is spent
        # a protocol switch (an upgrade request, a 101 response) ended the HTTP/1.1 stream:
        # what followed its message in the same read is the new protocol's (`upgrade_tail`)
        self.switched = False
        self.upgrade_tail = b""
        self.allow_connect = False  # deliver CONNECT (keep_alive False) instead of a 501
        self._new_parser()

    # -- public API -------------------------------------------------------------------

    def expect_no_body(self) -> None:
        """The next response answers HEAD: it has no body whatever its headers say."""
        self._expect_no_body = True

    def feed(self, data: bytes | bytearray) -> list[Event]:
        """The events this slice of bytes completes. On a protocol error, the messages
        completed before it in the same slice ride on the error as `partial` (a good request
        followed by garbage in one read is still a good request: the caller serves it
        first); the message the error is in is dropped, whatever of it was parsed."""
        try:
            return self._feed(data)
        except ProtocolError as exc:
            events, self._events = self._events, []
            last_end = max((i for i, ev in enumerate(events) if ev is END), default=-1)
            exc.partial = list(events[: last_end + 1])
            raise

    def _feed(self, data: bytes | bytearray) -> list[Event]:
        if self.leftover:
            raise self._error("bytes after a complete response")
        if self.switched:
            raise self._error("HTTP/1.1 bytes after a protocol switch")
        mid_head = self._in_head  # a head may have begun in an earlier read (even after a 1xx)
        if self._in_head:
            self._head_bytes += len(data)
        self._final_done = False
        try:
            self._parser.feed_data(data)
        except Exception as exc:  # llhttp stopped inside the data: _stopped says why
            self._stopped(exc, data, mid_head)
        if self._kind == "response":
            self._tail = (self._tail + bytes(data[-3:]))[-3:]
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
            raise self._error("request head too large", 431 if self._kind == "request" else 502)
        events, self._events = self._events, []
        return events

    def _stopped(self, exc: Exception, data: bytes | bytearray, mid_head: bool) -> None:
        """llhttp stopped inside `data`: a callback of ours stopped it (after a bodyless
        head, at bytes after a final response, or with a ProtocolError: httptools wraps
        those in HttpParserCallbackError), a protocol switch, or a parse error."""
        if isinstance(exc, httptools.HttpParserCallbackError):
            inner = exc.__cause__ or exc.__context__
            if not isinstance(inner, (_StopAfterHead, _StopAtLeftover, ProtocolError)):
                raise self._error(str(exc)) from exc
            if isinstance(inner, ProtocolError):
                raise inner from None
            exc = inner
        if isinstance(exc, httptools.HttpParserUpgrade):
            self._switch(data, exc.args[0] if exc.args else len(data))
            return
        if isinstance(exc, _StopAfterHead):
            self._finish_bodyless(data, mid_head)
        elif isinstance(exc, _StopAtLeftover):
            self._spent()
        elif isinstance(exc, httptools.HttpParserError):
            raise self._error(str(exc)) from exc
        else:
            raise exc  # ProtocolError from a callback httptools did not wrap, or a bug

    def between_messages(self) -> bool:
        """No message is half-parsed (the last one ended, or none began)."""
        return (
            self._in_head and self._head_bytes == 0 and not self._until_close and not self.leftover
        )

    def feed_eof(self) -> list[Event]:
        """The peer closed. Ends a close-delimited body; anything else mid-message is an error."""
        if self._until_close:
            self._until_close = False
            self._new_parser()
            return [END]
        if not self._in_head or self._head_bytes:
            raise self._error("connection closed in the middle of a message")
        return []

    # -- llhttp callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._final_done:
            # The upstream answers one request at a time: a byte after its final response
            # (other than the CR/LF llhttp skips) is nobody's response (RFC 9112 9.3.2).
            raise _StopAtLeftover()
        self._headers = []
        self._url = b""
        self._in_head = True
        self._parsed_head = 0  # bytes of this head seen by the callbacks, however it was fed

    def _count_head(self, n: int) -> None:
        # The limit is on the head as a whole: a head arriving in one large write is parsed
        # by a single feed() call, so the per-feed count alone would not see it.
        self._parsed_head += n
        if self._parsed_head > MAX_HEAD_BYTES:
            raise ProtocolError(
                "request head too large" if self._kind == "request" else "response head too large",
                431 if self._kind == "request" else 502,
            )

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        self._url += url

    def on_status(self, reason: bytes) -> None:
        self._count_head(len(reason))
        self._url += reason  # the response's reason phrase shares the start-line buffer

    def on_header(self, name: bytes, value: bytes) -> None:
        # httptools calls this once per complete header line (it joins llhttp's pieces).
        policy = self._policy
        self._header_lines += 1  # dropped headers count too
        if self._header_lines > policy.max_count:
            raise ProtocolError(f"more than {policy.max_count} headers", 431)
        self._count_head(len(name) + len(value) + 4)
        if self._kind == "request" and len(value) > policy.max_value_bytes:
            raise ProtocolError(f"header value larger than {policy.max_value_bytes} bytes", 431)
        if self._kind == "request" and b"_" in name:
            # Many frameworks fold `_` into `-` (CGI, nginx's underscores_in_headers), so
            # `X_Forwarded_Client_Cert` could pass for a header meshcar strips. Envoy's
            # headers_with_underscores_action: REJECT_REQUEST, or DROP_HEADER (policy).
            if policy.underscores == "reject":
                raise ProtocolError(
                    f"header name with an underscore: {name.decode('latin-1')[:64]}", 400
                )
            return  # dropped: nothing downstream ever sees it
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._header_lines = 0
        self._in_head = False
        self._head_bytes = 0
        p: Any = self._parser  # HttpRequestParser or HttpResponseParser, per self._kind
        headers = self._headers
        te = get_header(headers, b"transfer-encoding")
        chunked = te is not None  # llhttp accepted it, so it ends in `chunked`
        cl_raw = get_header(headers, b"content-length")
        content_length = int(cl_raw) if cl_raw is not None else None
        if self._kind == "request":
            version = p.get_http_version()
            _check_request_head(version, te, headers)
            self._events.append(
                RequestHead(
                    method=p.get_method(),
                    target=self._url,
                    version=version,
                    headers=headers,
                    keep_alive=p.should_keep_alive(),
                    chunked=chunked,
                    content_length=content_length,
                )
            )
            return
        self._response_head(p, headers, chunked, content_length)

    def _response_head(
        self, p: Any, headers: Headers, chunked: bool, content_length: int | None
    ) -> None:
        status = p.get_status_code()
        no_body = self._expect_no_body or status in (204, 304) or 100 <= status < 200
        until_close = not no_body and not chunked and content_length is None
        self._events.append(
            ResponseHead(
                status=status,
                reason=self._url,
                version=p.get_http_version(),
                headers=headers,
                keep_alive=p.should_keep_alive() and not until_close,
                chunked=chunked,
                content_length=0 if no_body else content_length,
                until_close=until_close,
            )
        )
        self._until_close = until_close
        if no_body and not (100 <= status < 200):
            raise _StopAfterHead()

    def on_body(self, body: bytes) -> None:
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        # llhttp signals 1xx interim responses as complete messages too; they carry no body.
        self._events.append(END)
        self._in_head = True
        if self._kind == "response" and self._last_head_is_final():
            self._final_done = True

    # -- internals ----------------------------------------------------------------------

    def _new_parser(self) -> None:
        cls = (
            httptools.HttpRequestParser if self._kind == "request" else httptools.HttpResponseParser
        )
        self._parser = cls(self)
        self._in_head = True
        self._head_bytes = 0

    def _last_head_is_final(self) -> bool:
        for ev in reversed(self._events):
            if isinstance(ev, ResponseHead):
                return ev.status >= 200
        return True  # the head came in an earlier feed; only final responses have bodies

    def _finish_bodyless(self, data: bytes | bytearray, mid_head: bool) -> None:
        """llhttp stopped right after a bodyless head, somewhere inside `data`. It does not say
        where, so find the end of that head: every head ends at the first blank line after its
        start, and this feed completed as many heads as it produced. Counting terminators
        from the start can only find each end early, never late, so any byte after the head
        is seen (and a stray blank line errs towards closing, not towards reuse)."""
        self._expect_no_body = False
        self._events.append(END)
        self._new_parser()
        buf = (self._tail if mid_head else b"") + bytes(data)
        end = 0
        for _ in range(sum(1 for ev in self._events if isinstance(ev, ResponseHead))):
            at = buf.find(b"\r\n\r\n", end)
            if at < 0:
                break
            end = at + 4
        if end < len(buf):
            self.leftover = True

    def _switch(self, data: bytes | bytearray, offset: int) -> None:
        """llhttp paused after a message that switches protocols (CONNECT, an upgrade request,
        a 101 response), which it completed. An upgrade request is delivered, marked with
        its Upgrade value and as the connection's last; a 101 response too. CONNECT (and a
        head that cannot switch) is refused and not delivered."""
        heads = [
            i for i, ev in enumerate(self._events) if isinstance(ev, (RequestHead, ResponseHead))
        ]
        at = heads[-1] if heads else -1
        head = self._events[at] if heads else None
        problem = ""
        if isinstance(head, RequestHead):
            problem = _upgrade_problem(head, self.allow_connect)
            if not problem:
                self._events[at] = _switching(head)
        elif not (isinstance(head, ResponseHead) and head.status == 101):
            problem = "a protocol switch in a response other than 101"
        if problem:
            del self._events[max(at, 0) :]
            status = 501 if isinstance(head, RequestHead) and head.method == b"CONNECT" else 400
            if self._kind == "response":
                status = 502
            raise ProtocolError(problem, status)
        self.switched = True
        self.upgrade_tail = bytes(data[offset:])

    def _spent(self) -> None:
        """A final response ended and more bytes followed in the same feed."""
        self.leftover = True
        self._new_parser()

    def _error(self, message: str, status: int | None = None) -> ProtocolError:
        if status is None:
            status = 400 if self._kind == "request" else 502
        who = "request" if self._kind == "request" else "upstream response"
        return ProtocolError(f"malformed {who}: {message}", status)
