"""The response parser notices bytes after a complete response (RFC 9112 9.3.2: the upstream
answers one request at a time), so the pool never reuses such a connection: after a bodyless
head (204, 304, HEAD), after a Content-Length or chunked body, however the bytes are split
into reads; and a clean response, split anywhere, leaves nothing behind."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcar.errors import ProtocolError
from meshcar.proto.http1 import EndOfMessage, Http1Parser, ResponseHead

INJECTED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nINJECTED"

CLEAN = [
    (False, b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n"),
    (False, b'HTTP/1.1 304 Not Modified\r\nETag: "a"\r\n\r\n'),
    (True, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),  # a HEAD answer
    (False, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"),
    (False, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    (False, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    (False, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
]
EXTRA = [INJECTED, b"X", b"\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", b"garbage that is not HTTP"]


def run(head: bool, pieces: list[bytes]) -> tuple[Http1Parser, list]:
    p = Http1Parser("response")
    if head:
        p.expect_no_body()
    events: list = []
    for piece in pieces:  # as forward() does: read until the final response has ended
        events += p.feed(piece)
        if any(isinstance(e, EndOfMessage) for e in events) and _final_ended(events):
            break
    return p, events


def _final_ended(events: list) -> bool:
    heads = [i for i, e in enumerate(events) if isinstance(e, ResponseHead) and e.status >= 200]
    return bool(heads) and any(isinstance(e, EndOfMessage) for e in events[heads[0] :])


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for c in [*points, len(data)]:
        out.append(data[last:c])
        last = c
    return [p for p in out if p]


@pytest.mark.parametrize(("head", "resp"), CLEAN)
@pytest.mark.parametrize("extra", EXTRA)
def test_bytes_after_a_response_in_the_same_read_are_seen(
    head: bool, resp: bytes, extra: bytes
) -> None:
    p, events = run(head, [resp + extra])
    assert p.leftover
    assert not p.between_messages()
    final = [e for e in events if isinstance(e, ResponseHead) and e.status >= 200]
    assert len(final) == 1 and isinstance(events[-1], EndOfMessage)  # the real response is intact
    with pytest.raises(ProtocolError):
        p.feed(b"HTTP/1.1 200 OK\r\n\r\n")  # and nothing more is read as a response


@pytest.mark.parametrize(("head", "resp"), CLEAN)
def test_a_clean_response_leaves_nothing(head: bool, resp: bytes) -> None:
    p, events = run(head, [resp])
    assert not p.leftover and p.between_messages()
    assert isinstance(events[-1], EndOfMessage)


@settings(max_examples=200, deadline=None)
@given(
    case=st.sampled_from(CLEAN),
    extra=st.sampled_from(EXTRA),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_any_split_of_response_plus_extra_is_seen_when_they_share_a_read(
    case: tuple[bool, bytes], extra: bytes, cuts: list[int]
) -> None:
    head, resp = case
    data = resp + extra
    pieces = split(data, cuts)
    p, _ = run(head, pieces)
    # Extra bytes in a later read than the end of the response are the pool's idle check's
    # (they wait on the socket). Those in the same read are the parser's to see, except
    # CR/LF, which llhttp skips between messages (they reach nobody).
    at = 0
    for piece in pieces:
        at += len(piece)
        if at >= len(resp):
            break
    same_read = data[len(resp) : at]
    if same_read.strip(b"\r\n"):
        assert p.leftover


@settings(max_examples=200, deadline=None)
@given(
    case=st.sampled_from(CLEAN), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6)
)
def test_any_split_of_a_clean_response_leaves_nothing(
    case: tuple[bool, bytes], cuts: list[int]
) -> None:
    head, resp = case
    p, events = run(head, split(resp, cuts))
    assert not p.leftover and p.between_messages()
    assert isinstance(events[-1], EndOfMessage)


# -- a protocol error keeps the messages completed before it in the same read ------------


def _parse_error(data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        Http1Parser("request").feed(data)
    return info.value


GOOD = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize(
    "bad",
    [
        b"NOT HTTP\r\n\r\n",
        b"POST /2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # head parsed, body broken
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",  # llhttp completes it, then stops
        b"GET /3 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ],
    ids=["garbage", "bad-chunk", "connect", "two-hosts"],
)
def test_the_good_request_before_an_error_rides_on_it(bad: bytes) -> None:
    exc = _parse_error(GOOD + bad)
    assert [type(e).__name__ for e in exc.partial] == ["RequestHead", "EndOfMessage"]
    assert exc.partial[0].target == b"/1"  # type: ignore[union-attr]


def test_an_error_in_the_first_message_carries_nothing() -> None:
    assert (
        _parse_error(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        ).partial
        == []
    )
