"""The demo's gRPC framing (grpcwire.py) and its ledger protocol (ledgerdb.py), on real
loopback sockets: an h2 (h2c prior knowledge) client against the demo app's h2c server."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from meshcar.demo import grpcwire as gw
from meshcar.demo import ledgerdb
from meshcar.demo.app import quote


def test_a_message_is_flag_length_then_bytes() -> None:
    assert gw.encode_message(b"abc") == b"\x00\x00\x00\x00\x03abc"
    assert gw.encode_message(b"") == b"\x00" + struct.pack(">I", 0)


def test_decode_takes_whole_messages_and_keeps_a_partial_one() -> None:
    buf = gw.encode_message(b"one") + gw.encode_message(b"") + gw.encode_message(b"three")
    for cut in range(len(buf) + 1):
        first, rest = gw.decode_messages(buf[:cut])
        second, tail = gw.decode_messages(rest + buf[cut:])
        assert first + second == [b"one", b"", b"three"]
        assert tail == b""
    msgs, rest = gw.decode_messages(b"\x00\x00\x00\x00\x05ab")
    assert msgs == [] and rest == b"\x00\x00\x00\x00\x05ab"


@pytest.mark.parametrize(
    "frame, reason",
    [
        (b"\x01\x00\x00\x00\x01a", "compressed"),
        (b"\x02\x00\x00\x00\x01a", "flag"),
        (b"\x00" + struct.pack(">I", gw.MAX_MESSAGE_BYTES + 1), "over"),
    ],
)
def test_decode_refuses_what_the_demo_cannot_take(frame: bytes, reason: str) -> None:
    with pytest.raises(gw.FramingError, match=reason):
        gw.decode_messages(frame)


def test_encode_refuses_an_oversized_message() -> None:
    with pytest.raises(gw.FramingError):
        gw.encode_message(b"x" * (gw.MAX_MESSAGE_BYTES + 1))


@pytest.fixture
def h2c_server() -> Iterator[int]:
    """The demo app's h2c handler (payments' Quote) on a loopback port."""
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()

    def _serve_one(conn: socket.socket) -> None:
        with conn:
            gw.serve_h2c(conn, quote)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield port
    lsock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone would not)
    lsock.close()
    t.join()


def test_unary_call_gets_ok_in_trailers(h2c_server: int) -> None:
    r = gw.call_unary(
        "127.0.0.1",
        h2c_server,
        "payments",
        gw.QUOTE_METHOD,
        {"amount_cents": 10000},
        metadata=(("x-forwarded-client-cert", 'By=x;URI="spiffe://meshcar.demo/svc/api"'),),
    )
    assert r.error is None
    assert r.http_status == 200 and r.headers["content-type"] == gw.CONTENT_TYPE
    assert not r.trailers_only and r.trailers["grpc-status"] == "0"
    assert r.grpc_status == gw.OK
    assert r.response() == {
        "service": "payments",
        "amount_cents": 10000,
        "currency": "EUR",
        "fee_cents": 290,
        "peer": "spiffe://meshcar.demo/svc/api",
    }


def test_unknown_method_and_bad_message_get_their_status(h2c_server: int) -> None:
    r = gw.call_unary("127.0.0.1", h2c_server, "payments", "/x.Y/Z", {"amount_cents": 1})
    assert r.grpc_status == gw.UNIMPLEMENTED and r.messages == []
    r = gw.call_unary("127.0.0.1", h2c_server, "payments", gw.QUOTE_METHOD, {"nope": 1})
    assert r.grpc_status == gw.INVALID_ARGUMENT and "bad QuoteRequest" in r.grpc_message


def test_grpc_message_is_percent_encoded_on_the_wire(h2c_server: int) -> None:
    r = gw.call_unary("127.0.0.1", h2c_server, "payments", "/x.Y/\u00e9t\u00e9%", {})
    assert r.trailers["grpc-message"] == "unknown method /x.Y/%C3%A9t%C3%A9%25"
    assert r.grpc_message == "unknown method /x.Y/\u00e9t\u00e9%"


def test_trailers_only_status_is_read_from_the_head() -> None:
    r = gw.GrpcResult(http_status=200, headers={"grpc-status": "7"}, trailers_only=True)
    assert r.grpc_status == gw.PERMISSION_DENIED
    assert json.dumps(r.summary())  # reportable as the demo app's JSON


def test_a_closed_port_is_an_error_not_a_status() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = gw.call_unary("127.0.0.1", port, "payments", gw.QUOTE_METHOD, {})
    assert r.error and r.grpc_status is None


@pytest.fixture
def ledger() -> Iterator[int]:
    server = ledgerdb.LedgerServer("127.0.0.1", 0)
    server.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_ledger_speaks_first_and_answers_lines(ledger: int) -> None:
    with socket.create_connection(("127.0.0.1", ledger), timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline() == ledgerdb.GREETING.encode() + b"\n"  # before we sent a byte
    ex = ledgerdb.query("127.0.0.1", ledger, ("PING", "BALANCE acct-2", "BALANCE zz", "FOO"))
    assert ex.replies == ("PONG", "OK acct-2 990", "ERR no account zz", "ERR unknown command")
    assert ledgerdb.query("127.0.0.1", ledger, ("QUIT",)).replies == ("BYE",)


def test_a_connection_closed_before_the_greeting_is_a_refusal() -> None:
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]

    def close_at_once() -> None:
        conn, _ = lsock.accept()
        conn.close()

    t = threading.Thread(target=close_at_once)
    t.start()
    with pytest.raises(ledgerdb.ProtocolError, match="before the server's greeting"):
        ledgerdb.query("127.0.0.1", port)
    t.join()
    lsock.close()
