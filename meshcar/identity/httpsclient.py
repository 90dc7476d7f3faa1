"""One HTTPS request on a connection of its own: the CA API client's few calls.

The CA client makes a handful of requests in a process's life (bootstrap, then one per
renewal), so it needs no pool, no redirects, no cookies and no proxies. This does one
exchange over `trio.SSLStream` with the caller's SSLContext (its trust roots and, for
renewal, the client certificate), sends `Connection: close`, and parses the response with
httptools, which the sidecar loads anyway for its proxy path. It replaced httpx here, which
pulled httpx, httpcore, anyio, certifi and `http.cookiejar` into every long-running sidecar
for those few calls (issue 12: memory; figures in docs/PERFORMANCE.md).

Bounded: the whole exchange runs under one deadline (`timeout`) and a response body larger
than `max_body` is refused.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools
import trio

from meshcar.errors import MeshcarError

MAX_BODY = 1 << 20  # a trust bundle of many roots fits; anything larger is not the CA


class HTTPSFailure(MeshcarError):
    """The request got no complete HTTP response: connect, TLS, timeout or framing."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


@dataclass
class _Reader:
    """httptools callbacks: collect one response."""

    max_body: int
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    done: bool = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size <= self.max_body:  # past it, _exchange refuses the response
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.done = True


def _request_bytes(method: str, host: str, target: str, body: bytes | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines.append("User-Agent: meshcar")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def request(
    method: str,
    url: str,
    ctx: ssl.SSLContext,
    *,
    body: bytes | None = None,
    timeout: float = 10.0,
    max_body: int = MAX_BODY,
) -> Response:
    """Send one request to an https:// URL and read the whole response."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise HTTPSFailure(f"not an https:// URL: {url!r}")
    host, port = parts.hostname, parts.port or 443
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    netloc = f"[{host}]" if ":" in host else host
    authority = netloc if port == 443 else f"{netloc}:{port}"
    try:
        with trio.fail_after(timeout):
            return await _exchange(
                host, port, ctx, _request_bytes(method, authority, target, body), max_body
            )
    except trio.TooSlowError:
        raise HTTPSFailure(f"no response from {host}:{port} within {timeout} s") from None
    except (OSError, trio.BrokenResourceError, httptools.HttpParserError) as exc:
        raise HTTPSFailure(f"{host}:{port}: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__  # trio's BrokenResourceError wraps the ssl or OS error
    return f"{type(cause or exc).__name__}: {cause or exc}"


async def _exchange(
    host: str, port: int, ctx: ssl.SSLContext, data: bytes, max_body: int
) -> Response:
    tcp = await trio.open_tcp_stream(host, port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=host, https_compatible=True)
    try:
        await stream.send_all(data)
        reader = _Reader(max_body)
        parser = httptools.HttpResponseParser(reader)
        while not reader.done:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise HTTPSFailure(f"{host}:{port} closed the connection before a full response")
            parser.feed_data(chunk)
            if reader.size > max_body:
                raise HTTPSFailure(f"response body larger than {max_body} bytes")
        return Response(parser.get_status_code(), reader.headers, b"".join(reader.chunks))
    finally:
        await trio.aclose_forcefully(stream)  # Connection: close; no close_notify to wait for
