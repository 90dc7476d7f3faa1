"""The parser's side of protocol switches (issue 13): an upgrade request is delivered, marked
and last on its connection, with the bytes after it kept for the relay; a 101 response
likewise; CONNECT and malformed upgrades are refused."""

from __future__ import annotations

import pytest

from meshcar.errors import ProtocolError
from meshcar.net.forward import request_bytes
from meshcar.proto.headers import IDENTITY_HEADERS, clean_headers
from meshcar.proto.http1 import END, Http1Parser, RequestHead, ResponseHead

WS = (
    b"GET /chat HTTP/1.1\r\nHost: api\r\nConnection: keep-alive, Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.parametrize("step", [None, 1, 7])
def test_an_upgrade_request_is_delivered_marked_and_last(step: int | None) -> None:
    p = Http1Parser("request")
    data = WS + b"\x81\x05early"  # a frame the client sent before the 101
    events = []
    if step is None:
        events = p.feed(data)
    else:
        for i in range(0, len(WS), step):
            events += p.feed(WS[i : i + step])
        events += []
        with pytest.raises(ProtocolError):
            p.feed(b"\x81\x05early")  # after the switch, HTTP/1.1 parsing is over
    head = events[0]
    assert isinstance(head, RequestHead) and events[1:] == [END]
    assert head.upgrade == b"websocket" and head.keep_alive is False
    assert p.switched
    if step is None:
        assert p.upgrade_tail == b"\x81\x05early"


def test_the_forwarded_head_keeps_the_switch_and_the_websocket_headers() -> None:
    (head, _) = Http1Parser("request").feed(WS)
    assert isinstance(head, RequestHead)
    out = request_bytes(head, b"/chat", clean_headers(head.headers, drop=IDENTITY_HEADERS))
    lines = out.split(b"\r\n")
    assert b"Connection: Upgrade" in lines and b"Upgrade: websocket" in lines
    assert b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==" in lines
    assert not any(line.lower().startswith(b"connection: keep-alive") for line in lines)


@pytest.mark.parametrize(
    ("raw", "status", "message"),
    [
        (b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n", 501, "CONNECT"),
        (
            b"POST /chat HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: 0\r\n\r\n",
            400,
            "must be a GET",
        ),
        (
            b"GET /chat HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            400,
            "needs HTTP/1.1",
        ),
    ],
)
def test_upgrades_meshcar_cannot_carry_are_refused(raw: bytes, status: int, message: str) -> None:
    with pytest.raises(ProtocolError) as err:
        Http1Parser("request").feed(raw)
    assert err.value.status == status and message in str(err.value)


def test_a_101_response_switches_and_keeps_the_first_bytes() -> None:
    p = Http1Parser("response")
    events = p.feed(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi"
    )
    head = events[0]
    assert isinstance(head, ResponseHead) and head.status == 101 and events[1:] == [END]
    assert p.switched and p.upgrade_tail == b"\x81\x02hi"


def test_a_101_without_connection_upgrade_is_a_bad_upstream() -> None:
    with pytest.raises(ProtocolError) as err:
        Http1Parser("response").feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\nx")
    assert err.value.status == 502
