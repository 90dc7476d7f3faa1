"""The demo's gRPC over h2c, spoken with the `h2` library (no grpcio, no protobuf).

A demo app on a fresh machine has neither grpcio nor protoc, so the demo's one gRPC method,
`/meshcar.demo.Payments/Quote`, uses gRPC's own wire format with the JSON codec:

- content-type `application/grpc+json` (gRPC allows `application/grpc+<codec>`);
- each message is length-prefixed: 1 byte compressed flag (always 0 here), 4 bytes
  big-endian length, then the message (a UTF-8 JSON object);
- the status travels in trailers: `grpc-status` (0 OK) and `grpc-message`, or in the head
  of a trailers-only answer (what a sidecar sends when its allow list refuses: 7,
  PERMISSION_DENIED).

`call_unary` is a blocking client over one h2c (prior knowledge) connection, made to the
app's own sidecar outbound; `serve_h2c` serves one h2c connection on a blocking socket
(the demo app's threads).  `h2` is imported only when a call or a connection needs it.
"""

from __future__ import annotations

import json
import socket
import struct
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CONTENT_TYPE = "application/grpc+json"
QUOTE_METHOD = "/meshcar.demo.Payments/Quote"
MAX_MESSAGE_BYTES = 1024 * 1024
PREFACE_START = b"PRI "  # the first bytes of the HTTP/2 connection preface

# gRPC status codes used here (grpc/doc/statuscodes.md)
OK, INVALID_ARGUMENT, UNIMPLEMENTED, PERMISSION_DENIED, INTERNAL = 0, 3, 12, 7, 13


class FramingError(ValueError):
    """A gRPC message frame that this demo cannot accept."""


def encode_message(message: bytes) -> bytes:
    """One length-prefixed gRPC message (uncompressed)."""
    if len(message) > MAX_MESSAGE_BYTES:
        raise FramingError(f"message of {len(message)} bytes is over {MAX_MESSAGE_BYTES}")
    return struct.pack(">BI", 0, len(message)) + message


def decode_messages(buf: bytes) -> tuple[list[bytes], bytes]:
    """(the whole messages at the start of `buf`, the bytes left over: a partial frame)."""
    out: list[bytes] = []
    pos = 0
    while len(buf) - pos >= 5:
        flag, length = struct.unpack_from(">BI", buf, pos)
        if flag not in (0, 1):
            raise FramingError(f"bad compressed flag {flag}")
        if flag == 1:
            raise FramingError("compressed messages are not supported (no grpc-encoding)")
        if length > MAX_MESSAGE_BYTES:
            raise FramingError(f"message of {length} bytes is over {MAX_MESSAGE_BYTES}")
        if len(buf) - pos - 5 < length:
            break
        out.append(bytes(buf[pos + 5 : pos + 5 + length]))
        pos += 5 + length
    return out, bytes(buf[pos:])


def encode_json(doc: dict[str, Any]) -> bytes:
    return encode_message(json.dumps(doc, separators=(",", ":")).encode())


@dataclass
class GrpcResult:
    """What a unary call got back."""

    http_status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    messages: list[bytes] = field(default_factory=list)
    trailers_only: bool = False
    error: str | None = None  # a transport failure (no gRPC status at all)

    @property
    def grpc_status(self) -> int | None:
        value = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return int(value) if value is not None and value.isdigit() else None

    @property
    def grpc_message(self) -> str:
        raw = self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))
        return urllib.parse.unquote(raw)  # percent-encoded on the wire (gRPC's HTTP/2 spec)

    def response(self) -> Any:
        return json.loads(self.messages[0]) if self.messages else None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "http_status": self.http_status,
            "grpc_status": self.grpc_status,
            "grpc_message": self.grpc_message,
            "trailers_only": self.trailers_only,
            "trailers": self.trailers,
        }
        if self.error:
            out["error"] = self.error
        try:
            out["response"] = self.response()
        except ValueError:
            out["response"] = repr(self.messages[0][:200])
        return out


def _h2(client_side: bool) -> Any:
    import h2.config
    import h2.connection

    return h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
    )


def _request_headers(
    authority: str, method: str, timeout: float, metadata: tuple[tuple[str, str], ...]
) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", authority),
        (":path", method),
        ("content-type", CONTENT_TYPE),
        ("te", "trailers"),
        ("grpc-timeout", f"{max(1, int(timeout * 1000))}m"),
        *metadata,
    ]


def _client_event(conn: Any, sid: int, ev: Any, result: GrpcResult, body: bytearray) -> bool:
    """Apply one h2 event of a unary call to `result`; True once the call has ended."""
    import h2.events

    if isinstance(ev, h2.events.ConnectionTerminated):
        result.error = f"GOAWAY (error code {ev.error_code})"
        return True
    if getattr(ev, "stream_id", None) != sid:
        return False
    if isinstance(ev, h2.events.ResponseReceived):
        result.headers = {str(k): str(v) for k, v in ev.headers}
        result.http_status = int(result.headers.get(":status", "0"))
        if ev.stream_ended is not None:
            result.trailers_only = True
    elif isinstance(ev, h2.events.DataReceived):
        body += ev.data
        conn.acknowledge_received_data(ev.flow_controlled_length, sid)
    elif isinstance(ev, h2.events.TrailersReceived):
        result.trailers = {str(k): str(v) for k, v in ev.headers}
    elif isinstance(ev, h2.events.StreamReset):
        result.error = f"stream reset (error code {ev.error_code})"
        return True
    return isinstance(ev, h2.events.StreamEnded)


def call_unary(
    host: str,
    port: int,
    authority: str,
    method: str,
    request: dict[str, Any],
    *,
    timeout: float = 10.0,
    metadata: tuple[tuple[str, str], ...] = (),
) -> GrpcResult:
    """One unary call with prior-knowledge h2c to host:port (the app's sidecar outbound)."""
    import h2.events
    import h2.exceptions

    result = GrpcResult()
    conn = _h2(client_side=True)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            conn.initiate_connection()
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, _request_headers(authority, method, timeout, metadata))
            conn.send_data(sid, encode_json(request), end_stream=True)
            sock.sendall(conn.data_to_send())
            body = bytearray()
            done = False
            while not done:
                data = sock.recv(65536)
                if not data:
                    result.error = "connection closed before the call ended"
                    break
                for ev in conn.receive_data(data):
                    done = _client_event(conn, sid, ev, result, body) or done
                pending = conn.data_to_send()
                if pending:
                    sock.sendall(pending)
            result.messages, rest = decode_messages(bytes(body))
            if rest:
                result.error = result.error or f"{len(rest)} bytes of a partial message"
            try:
                conn.close_connection()
                sock.sendall(conn.data_to_send())
            except (OSError, h2.exceptions.ProtocolError):
                pass
    except (OSError, h2.exceptions.ProtocolError, FramingError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


# A unary handler: (method path, request headers, request message) -> (status, message, response)
Handler = Callable[[str, dict[str, str], bytes], tuple[int, str, dict[str, Any] | None]]


_Streams = dict[int, tuple[dict[str, str], bytearray]]


def _server_event(conn: Any, ev: Any, streams: _Streams, handler: Handler) -> None:
    """Apply one h2 event of a served connection: collect a call, answer it when it ends."""
    import h2.events

    if isinstance(ev, h2.events.RequestReceived):
        streams[ev.stream_id] = ({str(k): str(v) for k, v in ev.headers}, bytearray())
    elif isinstance(ev, h2.events.DataReceived):
        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        if ev.stream_id in streams:
            streams[ev.stream_id][1].extend(ev.data)
    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in streams:
        headers, body = streams.pop(ev.stream_id)
        _answer(conn, ev.stream_id, headers, bytes(body), handler)
    elif isinstance(ev, h2.events.StreamReset):
        streams.pop(ev.stream_id, None)


def serve_h2c(sock: socket.socket, handler: Handler) -> None:
    """Serve one prior-knowledge h2c connection: unary gRPC calls, answered by `handler`.

    A request that is not gRPC (`content-type` not application/grpc*) gets HTTP 415; a
    malformed message grpc-status 3 (INVALID_ARGUMENT); an unknown method is the handler's
    to refuse (12, UNIMPLEMENTED).  Ends when the peer closes or sends GOAWAY.
    """
    import h2.events
    import h2.exceptions

    conn = _h2(client_side=False)
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    streams: _Streams = {}
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            return
        if not data:
            return
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            sock.sendall(conn.data_to_send())
            return
        for ev in events:
            if isinstance(ev, h2.events.ConnectionTerminated):
                sock.sendall(conn.data_to_send())
                return
            _server_event(conn, ev, streams, handler)
        pending = conn.data_to_send()
        if pending:
            sock.sendall(pending)


def _answer(conn: Any, sid: int, headers: dict[str, str], body: bytes, handler: Handler) -> None:
    if not headers.get("content-type", "").startswith("application/grpc"):
        conn.send_headers(sid, [(":status", "415"), ("content-length", "0")], end_stream=True)
        return
    try:
        messages, rest = decode_messages(body)
        if len(messages) != 1 or rest:
            raise FramingError(f"a unary call takes one message, got {len(messages)}")
        status, message, response = handler(headers.get(":path", ""), headers, messages[0])
    except FramingError as exc:
        status, message, response = INVALID_ARGUMENT, str(exc), None
    except Exception as exc:  # noqa: BLE001 - a handler bug is the call's INTERNAL
        status, message, response = INTERNAL, f"{type(exc).__name__}: {exc}", None
    conn.send_headers(sid, [(":status", "200"), ("content-type", CONTENT_TYPE)])
    if response is not None and status == OK:
        conn.send_data(sid, encode_json(response))
    encoded = urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
    conn.send_headers(
        sid, [("grpc-status", str(status)), ("grpc-message", encoded)], end_stream=True
    )
