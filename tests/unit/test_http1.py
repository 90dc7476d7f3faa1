"""The HTTP/1.1 framing layer: events, bodyless responses and smuggling vectors refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcar.errors import ProtocolError
from meshcar.proto.headers import clean_headers
from meshcar.proto.http1 import END, Data, Http1Parser, RequestHead, ResponseHead


def feed_all(kind: str, data: bytes, step: int | None = None):
    p = Http1Parser(kind)
    out = []
    if step is None:
        out += p.feed(data)
    else:
        for i in range(0, len(data), step):
            out += p.feed(data[i : i + step])
    return out


def test_request_with_chunked_body_then_pipelined_request() -> None:
    raw = (
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\nGET /y HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    for step in (None, 1, 7):
        evs = feed_all("request", raw, step)
        heads = [e for e in evs if isinstance(e, RequestHead)]
        assert [h.target for h in heads] == [b"/x", b"/y"]
        assert heads[0].chunked and heads[0].content_length is None
        assert b"".join(e.data for e in evs if isinstance(e, Data)) == b"abcde"
        assert evs.count(END) == 2


SMUGGLING = [
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\n\n",
    b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GARBAGE\r\n\r\n",
    b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",
]


@pytest.mark.parametrize("raw", SMUGGLING)
def test_smuggling_vectors_are_400(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        feed_all("request", raw)
    assert err.value.status == 400


def test_head_too_large_is_431() -> None:
    p = Http1Parser("request")
    with pytest.raises(ProtocolError) as err:
        p.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 70000)
    assert err.value.status == 431


def test_connect_is_501() -> None:
    with pytest.raises(ProtocolError) as err:
        feed_all("request", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n")
    assert err.value.status == 501


def test_response_to_head_has_no_body_then_next_response_parses() -> None:
    p = Http1Parser("response")
    p.expect_no_body()
    evs = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert isinstance(evs[0], ResponseHead) and evs[1] is END
    evs = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert evs[1] == Data(b"hi") and evs[2] is END


def test_close_delimited_response() -> None:
    p = Http1Parser("response")
    evs = p.feed(b"HTTP/1.1 200 OK\r\n\r\nabc")
    assert evs[0].until_close and not evs[0].keep_alive
    assert p.feed(b"def") == [Data(b"def")]
    assert p.feed_eof() == [END]


def test_eof_mid_message_is_an_error() -> None:
    p = Http1Parser("response")
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    with pytest.raises(ProtocolError):
        p.feed_eof()


def test_malformed_response_is_502() -> None:
    with pytest.raises(ProtocolError) as err:
        feed_all("response", b"HTTP/1.1 2000 OK\r\n\r\n")
    assert err.value.status == 502


def test_hop_by_hop_and_connection_listed_headers_are_removed() -> None:
    hs = [
        (b"Connection", b"keep-alive, X-Secret"),
        (b"X-Secret", b"1"),
        (b"Keep-Alive", b"5"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"TE", b"trailers"),
        (b"Upgrade", b"h2c"),
        (b"X-Forwarded-Client-Cert", b"spoof"),
        (b"Accept", b"*/*"),
    ]
    out = clean_headers(hs, drop={b"x-forwarded-client-cert"})
    assert out == [(b"Accept", b"*/*")]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.integers(min_value=1, max_value=64))
def test_random_bytes_only_ever_raise_protocol_error(data: bytes, step: int) -> None:
    for kind in ("request", "response"):
        try:
            feed_all(kind, data, step)
        except ProtocolError:
            pass


@pytest.mark.parametrize("size", [65 * 1024, 70 * 1024, 100 * 1024, 128 * 1024, 200 * 1024])
@pytest.mark.parametrize("shape", ["one-header", "many-headers", "long-target"])
def test_complete_heads_over_the_limit_in_one_write_are_431(size: int, shape: str) -> None:
    """Round 1 counted per read: a whole 70-128 KiB head in one write passed the 64 KiB limit."""
    if shape == "one-header":
        head = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * size + b"\r\n\r\n"
    elif shape == "many-headers":
        head = (
            b"GET / HTTP/1.1\r\nHost: a\r\n"
            + b"".join(b"X-%d: " % i + b"b" * (size // 90) + b"\r\n" for i in range(90))
            + b"\r\n"
        )
    else:
        head = b"GET /" + b"c" * size + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    for step in (None, 8192):
        with pytest.raises(ProtocolError) as err:
            feed_all("request", head, step)
        assert err.value.status == 431


def test_response_head_over_the_limit_is_502() -> None:
    with pytest.raises(ProtocolError) as err:
        feed_all(
            "response", b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\nContent-Length: 0\r\n\r\n"
        )
    assert err.value.status == 502


def test_head_just_under_the_limit_parses() -> None:
    # 60 KiB of values in four headers, each under the per-value limit (16 KiB)
    head = (
        b"GET / HTTP/1.1\r\nHost: a\r\n"
        + b"".join(b"X%d: %b\r\n" % (i, b"a" * (15 * 1024)) for i in range(4))
        + b"\r\n"
    )
    req, end = feed_all("request", head)
    assert isinstance(req, RequestHead) and end is END


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHOST: a\r\nX: 1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
    ],
)
def test_more_than_one_host_is_400(raw: bytes) -> None:
    with pytest.raises(ProtocolError, match="more than one Host") as err:
        feed_all("request", raw)
    assert err.value.status == 400


@pytest.mark.parametrize(
    "name",
    [b"X_Forwarded_Client_Cert", b"x_forwarded_for", b"_", b"X-Spiffe_Id", b"Content_Length"],
)
def test_header_names_with_underscores_are_400(name: bytes) -> None:
    with pytest.raises(ProtocolError, match="underscore") as err:
        feed_all("request", b"GET / HTTP/1.1\r\nHost: a\r\n" + name + b": v\r\n\r\n")
    assert err.value.status == 400


def test_underscores_in_response_headers_pass() -> None:
    (resp, end) = feed_all("response", b"HTTP/1.1 204 No Content\r\nX_App: 1\r\n\r\n")
    assert isinstance(resp, ResponseHead) and (b"X_App", b"1") in resp.headers
