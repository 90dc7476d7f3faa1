"""Tests for meshcar.proto.clienthello: real captures, every prefix, re-fragmenting, garbage."""

from __future__ import annotations

import ipaddress
import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshcar.proto.clienthello import (
    MAX_HELLO_SIZE,
    ClientHello,
    Incomplete,
    Rejected,
    RejectKind,
    is_probably_tls,
    parse_client_hello,
    validate_hostname,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "clienthello"
EXPECTED: dict[str, dict[str, object]] = json.loads((FIXTURES / "expected.json").read_text())
CAPTURES = sorted(EXPECTED)
RESULT_TYPES = (Incomplete, ClientHello, Rejected)


def capture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


# --- helpers that build TLS bytes independently of the parser ----------------------------


def u8(n: int) -> bytes:
    return struct.pack("!B", n)


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


def records_of(message: bytes, sizes: list[int], version: int = 0x0301) -> bytes:
    """Wrap a handshake message into handshake records of the given payload sizes."""
    out, pos = b"", 0
    for size in sizes:
        chunk = message[pos : pos + size]
        out += u8(22) + u16(version) + u16(len(chunk)) + chunk
        pos += size
    assert pos >= len(message)
    return out


def handshake_of(data: bytes) -> bytes:
    """Reassemble the handshake bytes carried by a sequence of records."""
    pos, hs = 0, b""
    while pos < len(data):
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        hs += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return hs


def ext(ext_type: int, body: bytes) -> bytes:
    return u16(ext_type) + u16(len(body)) + body


def sni_ext(name: bytes, name_type: int = 0) -> bytes:
    entry = u8(name_type) + u16(len(name)) + name
    return ext(0, u16(len(entry)) + entry)


def alpn_ext(protocols: list[bytes]) -> bytes:
    lst = b"".join(u8(len(p)) + p for p in protocols)
    return ext(16, u16(len(lst)) + lst)


def versions_ext(versions: list[int]) -> bytes:
    body = b"".join(u16(v) for v in versions)
    return ext(43, u8(len(body)) + body)


def build_hello(
    extensions: bytes | None = b"",
    *,
    session_id: bytes = b"\x11" * 32,
    suites: tuple[int, ...] = (0x1301, 0x1302, 0xC02F),
    legacy_version: int = 0x0303,
    compression: bytes = b"\x00",
    trailing: bytes = b"",
) -> bytes:
    """A handshake message (type 1, 3-byte length, body)."""
    body = (
        u16(legacy_version)
        + os.urandom(32)
        + u8(len(session_id))
        + session_id
        + u16(2 * len(suites))
        + b"".join(u16(s) for s in suites)
        + u8(len(compression))
        + compression
    )
    if extensions is not None:
        body += u16(len(extensions)) + extensions
    body += trailing
    return b"\x01" + len(body).to_bytes(3, "big") + body


def one_record(message: bytes) -> bytes:
    return records_of(message, [len(message)])


# --- real captures ----------------------------------------------------------------------


@pytest.mark.parametrize("name", CAPTURES)
def test_capture_parses_to_expected(name: str) -> None:
    data = capture(name)
    want = EXPECTED[name]
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello), result
    assert result.sni == want["sni"]
    assert list(result.alpn) == want["alpn"]
    assert result.offers_tls13 is want["tls13"]
    assert result.legacy_version == 0x0303
    assert result.consumed == len(data)
    assert result.cipher_suites
    # bytes after the hello (e.g. TLS 1.3 early data) are not part of it
    tail = b"\x17\x03\x03\x00\x05hello"
    assert parse_client_hello(data + tail) == result


@pytest.mark.parametrize("name", CAPTURES)
def test_every_prefix_of_capture_is_incomplete(name: str) -> None:
    data = capture(name)
    for end in range(len(data)):
        result = parse_client_hello(data[:end])
        assert isinstance(result, Incomplete), (end, result)
        assert result.at_least >= 1
        assert end + result.at_least <= len(data)


@pytest.mark.parametrize("name", CAPTURES)
def test_capture_refragmented_into_small_records(name: str) -> None:
    data = capture(name)
    expected = parse_client_hello(data)
    assert isinstance(expected, ClientHello)
    message = handshake_of(data)
    for size in (1, 3, 4, 5, 64, 100):
        sizes = [size] * -(-len(message) // size)
        if len(sizes) > 16:
            continue
        rec = records_of(message, sizes)
        result = parse_client_hello(rec)
        assert isinstance(result, ClientHello), (size, result)
        assert (result.sni, result.alpn, result.supported_versions) == (
            expected.sni,
            expected.alpn,
            expected.supported_versions,
        )
        assert result.records == len(sizes)
        assert result.consumed == len(rec)
        for end in range(len(rec)):
            assert isinstance(parse_client_hello(rec[:end]), Incomplete)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(CAPTURES),
    cuts=st.lists(st.integers(min_value=1, max_value=600), min_size=1, max_size=15, unique=True),
    tcp_cut=st.integers(min_value=0, max_value=10_000),
)
def test_random_record_fragmentation_and_tcp_split(
    name: str, cuts: list[int], tcp_cut: int
) -> None:
    data = capture(name)
    expected = parse_client_hello(data)
    assert isinstance(expected, ClientHello)
    message = handshake_of(data)
    points = sorted({c for c in cuts if c < len(message)})
    bounds = [0, *points, len(message)]
    sizes = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    rec = records_of(message, sizes)
    cut = tcp_cut % len(rec)
    assert isinstance(parse_client_hello(rec[:cut]), Incomplete)
    result = parse_client_hello(rec)
    assert isinstance(result, ClientHello)
    assert (result.sni, result.alpn) == (expected.sni, expected.alpn)
    assert result.records == len(sizes)


# --- garbage and malformed input --------------------------------------------------------

GARBAGE = {
    "http_get": b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "http_connect": b"CONNECT api.demo.test:443 HTTP/1.1\r\n\r\n",
    "sslv2_hello": bytes.fromhex("802b0103010012000000100000") + b"\x00" * 32,
    "proxy_v1": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "alert_record": b"\x15\x03\x03\x00\x02\x02\x28",
    "app_data_record": b"\x17\x03\x03\x00\x05hello",
    "bad_major": b"\x16\x02\x01\x00\x05\x01\x00\x00\x01\x00",
    "bad_minor": b"\x16\x03\x09\x00\x05\x01\x00\x00\x01\x00",
    "empty_record": b"\x16\x03\x01\x00\x00",
    "record_over_2_14": b"\x16\x03\x01\x40\x01" + b"\x01",
    "server_hello": b"\x16\x03\x03\x00\x04\x02\x00\x00\x00",
    "zero_length_hello": b"\x16\x03\x01\x00\x04\x01\x00\x00\x00",
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_is_rejected(name: str) -> None:
    result = parse_client_hello(GARBAGE[name])
    assert isinstance(result, Rejected), result
    assert result.reason


def test_http_is_rejected_after_one_byte() -> None:
    assert parse_client_hello(b"G") == Rejected(RejectKind.NOT_TLS, parse_client_hello(b"G").reason)
    assert not is_probably_tls(b"GET / HTTP/1.1\r\n")


def test_empty_input_is_incomplete() -> None:
    assert parse_client_hello(b"") == Incomplete(5)


def _malformed(message: bytes) -> Rejected:
    result = parse_client_hello(one_record(message))
    assert isinstance(result, Rejected), result
    assert result.kind is RejectKind.MALFORMED
    return result


def test_good_builder_hello_parses() -> None:
    exts = sni_ext(b"Api.Demo.Test") + alpn_ext([b"h2"]) + versions_ext([0x0A0A, 0x0304])
    result = parse_client_hello(one_record(build_hello(exts)))
    assert isinstance(result, ClientHello)
    assert result.sni == "api.demo.test"
    assert result.alpn == ("h2",)
    assert result.max_version == 0x0304


def test_hello_without_extensions_tls12() -> None:
    result = parse_client_hello(one_record(build_hello(None, session_id=b"")))
    assert isinstance(result, ClientHello)
    assert (result.sni, result.alpn, result.supported_versions) == (None, (), ())
    assert result.max_version == 0x0303


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(build_hello(session_id=b"x" * 33), id="session_id_too_long"),
        pytest.param(build_hello(suites=()), id="no_cipher_suites"),
        pytest.param(build_hello(compression=b""), id="no_compression"),
        pytest.param(build_hello(legacy_version=0x0202), id="legacy_version_not_3"),
        pytest.param(build_hello(trailing=b"\x00"), id="trailing_body_bytes"),
        pytest.param(build_hello(ext(5, b"") + ext(5, b"")), id="duplicate_extension"),
        pytest.param(build_hello(b"\x00\x00\x00\x05abc"), id="extension_overruns"),
        pytest.param(build_hello(b"\x00"), id="truncated_extension_header"),
        pytest.param(build_hello(sni_ext(b"a.test", name_type=1)), id="sni_unknown_type"),
        pytest.param(build_hello(sni_ext(b"")), id="sni_empty_name"),
        pytest.param(build_hello(ext(0, u16(0))), id="sni_empty_list"),
        pytest.param(build_hello(ext(0, b"")), id="sni_no_list"),
        pytest.param(
            build_hello(ext(0, u16(14) + b"\x00\x00\x04a.de" + b"\x00\x00\x04b.de")),
            id="sni_two_names",
        ),
        pytest.param(build_hello(sni_ext(b"a.test")[:-1]), id="sni_length_mismatch"),
        pytest.param(build_hello(sni_ext(b"api.demo.test.")), id="sni_trailing_dot"),
        pytest.param(build_hello(sni_ext(b"a..b")), id="sni_empty_label"),
        pytest.param(build_hello(sni_ext(b"-a.test")), id="sni_leading_hyphen"),
        pytest.param(build_hello(sni_ext(b"a b.test")), id="sni_space"),
        pytest.param(build_hello(sni_ext(b"a\x00.test")), id="sni_nul"),
        pytest.param(build_hello(sni_ext("bücher.de".encode())), id="sni_raw_utf8"),
        pytest.param(build_hello(sni_ext(b"xn--.test")), id="sni_empty_a_label"),
        pytest.param(build_hello(sni_ext(b"xn--abc-.test")), id="sni_ascii_a_label"),
        pytest.param(build_hello(sni_ext(b"xn--99999999999.test")), id="sni_bad_punycode"),
        pytest.param(build_hello(sni_ext(b"ab--cd.test")), id="sni_reserved_hyphens"),
        pytest.param(build_hello(sni_ext(b"a" * 64 + b".test")), id="sni_label_too_long"),
        pytest.param(build_hello(sni_ext(b"a." * 127 + b"bc")), id="sni_name_too_long"),
        pytest.param(build_hello(alpn_ext([b""])), id="alpn_empty_name"),
        pytest.param(build_hello(ext(16, u16(0))), id="alpn_empty_list"),
        pytest.param(build_hello(ext(16, u16(3) + b"\x05h2")), id="alpn_overrun"),
        pytest.param(build_hello(ext(43, b"\x03\x03\x04\x03")), id="versions_odd"),
        pytest.param(build_hello(ext(43, b"\x00")), id="versions_empty"),
    ],
)
def test_malformed_hello_is_rejected(message: bytes) -> None:
    _malformed(message)


@pytest.mark.parametrize("literal", [b"10.0.0.1", b"::1", b"127.0.0.1"])
def test_ip_literal_sni_counts_as_no_sni(literal: bytes) -> None:
    # RFC 6066 forbids it, but clients such as wrk send the URL's IP as SNI: no SNI, not garbage
    result = parse_client_hello(one_record(build_hello(sni_ext(literal))))
    assert isinstance(result, ClientHello) and result.sni is None


def test_valid_idna_sni_is_accepted() -> None:
    a_label = "bücher".encode("punycode")
    result = parse_client_hello(one_record(build_hello(sni_ext(b"XN--" + a_label + b".de"))))
    assert isinstance(result, ClientHello)
    assert result.sni == "xn--" + a_label.decode() + ".de"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"API.demo.test", "api.demo.test"),
        (b"localhost", "localhost"),
        (b"_svc.example.com", "_svc.example.com"),
        (b"a-b.c-d.e", "a-b.c-d.e"),
        (b"1.2.3.4", None),
        (b"999.1.1.1", None),
        (b"", None),
        (b"a.b-", None),
        (b"a/b", None),
    ],
)
def test_validate_hostname(raw: bytes, expected: str | None) -> None:
    assert validate_hostname(raw) == expected


def test_interleaved_record_is_rejected() -> None:
    message = build_hello(sni_ext(b"a.test"))
    first = records_of(message[:10], [10])
    rest = records_of(message[10:], [len(message) - 10])
    result = parse_client_hello(first + b"\x15\x03\x03\x00\x02\x02\x28" + rest)
    assert isinstance(result, Rejected)
    assert result.kind is RejectKind.MALFORMED


def test_trailing_handshake_data_in_record_is_rejected() -> None:
    message = build_hello(sni_ext(b"a.test"))
    assert isinstance(parse_client_hello(one_record(message + b"\x0b")), Rejected)


def test_hello_over_size_limit_is_rejected_from_its_header() -> None:
    header = b"\x01" + (MAX_HELLO_SIZE + 1).to_bytes(3, "big")
    result = parse_client_hello(b"\x16\x03\x01\x40\x00" + header)
    assert isinstance(result, Rejected)
    assert result.kind is RejectKind.TOO_LARGE
    assert isinstance(
        parse_client_hello(b"\x16\x03\x01\x40\x00" + header, max_size=1 << 20), Incomplete
    )


def test_big_but_allowed_hello_over_two_records() -> None:
    base = len(build_hello(sni_ext(b"big.test") + ext(21, b""))) - 4
    message = build_hello(sni_ext(b"big.test") + ext(21, b"\x00" * (MAX_HELLO_SIZE - base)))
    assert len(message) - 4 == MAX_HELLO_SIZE
    assert len(message) > 1 << 14
    rec = records_of(message, [1 << 14, len(message) - (1 << 14)])
    result = parse_client_hello(rec)
    assert isinstance(result, ClientHello)
    assert result.sni == "big.test"
    assert result.records == 2


def test_too_many_records_is_rejected() -> None:
    message = build_hello(sni_ext(b"a.test"))
    rec = records_of(message, [1] * len(message))
    result = parse_client_hello(rec)
    assert isinstance(result, Rejected)
    assert result.kind is RejectKind.TOO_LARGE
    assert isinstance(parse_client_hello(rec, max_records=len(message)), ClientHello)


def test_is_probably_tls() -> None:
    assert not is_probably_tls(b"")
    assert is_probably_tls(b"\x16")
    assert is_probably_tls(b"\x16\x03\x01\x02\x00")
    assert not is_probably_tls(b"\x16\x02")
    assert not is_probably_tls(b"\x16\x03\x05")
    for name in CAPTURES:
        assert is_probably_tls(capture(name)[:3])


# --- property tests ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data: bytes) -> None:
    assert isinstance(parse_client_hello(data), RESULT_TYPES)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_inside_a_valid_record_never_raise(payload: bytes) -> None:
    message = b"\x01" + len(payload).to_bytes(3, "big") + payload
    result = parse_client_hello(one_record(message))
    assert isinstance(result, RESULT_TYPES)
    assert not isinstance(result, Incomplete)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(CAPTURES),
    flips=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4
    ),
)
def test_mutated_captures_never_raise(name: str, flips: list[tuple[int, int]]) -> None:
    data = bytearray(capture(name))
    for index, value in flips:
        data[index % len(data)] = value
    result = parse_client_hello(bytes(data))
    assert isinstance(result, RESULT_TYPES)
    if isinstance(result, ClientHello):
        assert result.consumed <= len(data)


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True).filter(
    lambda s: s[2:4] != "--"
)
_HOST = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(_LABEL, min_size=0, max_size=4),
    st.from_regex(r"[a-z]{2,10}", fullmatch=True),
)


@settings(max_examples=200, deadline=None)
@given(
    host=st.one_of(st.none(), _HOST),
    upper=st.booleans(),
    alpn=st.lists(st.binary(min_size=1, max_size=20), max_size=5),
    versions=st.lists(st.sampled_from([0x0304, 0x0303, 0x0302, 0x1A1A]), max_size=4),
    data=st.data(),
)
def test_built_hello_round_trips(
    host: str | None, upper: bool, alpn: list[bytes], versions: list[int], data: st.DataObject
) -> None:
    exts = b""
    if host is not None:
        exts += sni_ext((host.upper() if upper else host).encode())
    if alpn:
        exts += alpn_ext(alpn)
    if versions:
        exts += versions_ext(versions)
    exts += ext(0xFF01, b"\x00")
    message = build_hello(exts)
    count = data.draw(st.integers(min_value=1, max_value=min(16, len(message))))
    points = sorted(
        data.draw(st.sets(st.integers(1, len(message) - 1), min_size=count - 1, max_size=count - 1))
    )
    bounds = [0, *points, len(message)]
    rec = records_of(message, [b - a for a, b in zip(bounds, bounds[1:], strict=False)])
    result = parse_client_hello(rec)
    assert isinstance(result, ClientHello), result
    assert result.sni == host
    assert result.alpn == tuple(p.decode("latin-1") for p in alpn)
    assert result.supported_versions == tuple(versions)
    assert result.consumed == len(rec)
    cut = data.draw(st.integers(min_value=0, max_value=len(rec) - 1))
    assert isinstance(parse_client_hello(rec[:cut]), Incomplete)


# --- exact results: every field, every reject reason --------------------------------------


def fields_of(data: bytes) -> dict[str, object]:
    """Decode a well-formed hello's lists by walking its layout (no validation at all)."""
    body = handshake_of(data)[4:]
    p = 2 + 32
    session_id = body[p + 1 : p + 1 + body[p]]
    p += 1 + body[p]
    k = int.from_bytes(body[p : p + 2], "big")
    suites = tuple(int.from_bytes(body[i : i + 2], "big") for i in range(p + 2, p + 2 + k, 2))
    p += 2 + k
    p += 1 + body[p] + 2  # compression methods, extensions length
    types, versions = [], ()
    while p < len(body):
        ext_type = int.from_bytes(body[p : p + 2], "big")
        k = int.from_bytes(body[p + 2 : p + 4], "big")
        types.append(ext_type)
        if ext_type == 43:
            vs = body[p + 5 : p + 4 + k]
            versions = tuple(int.from_bytes(vs[i : i + 2], "big") for i in range(0, len(vs), 2))
        p += 4 + k
    return {
        "session_id": session_id,
        "cipher_suites": suites,
        "extension_types": tuple(types),
        "supported_versions": versions,
        "record_version": int.from_bytes(data[1:3], "big"),
        "records": 1,
    }


@pytest.mark.parametrize("name", CAPTURES)
def test_capture_fields_match_layout(name: str) -> None:
    data = capture(name)
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello)
    got = {key: getattr(result, key) for key in fields_of(data)}
    assert got == fields_of(data)
    assert type(result.session_id) is bytes
    assert all(type(suite) is int for suite in result.cipher_suites)


@pytest.mark.parametrize("name", CAPTURES)
def test_bytearray_and_memoryview_input_give_the_same_result(name: str) -> None:
    data = capture(name)
    expected = parse_client_hello(data)
    for view in (bytearray(data), memoryview(data), memoryview(b"xx" + data)[2:]):
        assert parse_client_hello(view) == expected
    split = records_of(handshake_of(data), [7, len(handshake_of(data)) - 7])
    assert parse_client_hello(bytearray(split)) == parse_client_hello(split)


# The reasons are part of the edge's log lines: pinned here as they read before the parser
# was rewritten for speed (the rewrite kept every one of them).
REASONS = [
    (b"GET /", "first byte 0x47 is not a TLS handshake"),
    (b"\x16\x03\x03\x00\x04\x02\x00\x00\x00", "handshake type 2 is not client_hello"),
    (b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", "legacy_version: needs 2 bytes, 1 left"),
    (one_record(b"\x01\x00\x00\x02\x03\x03"), "random: needs 32 bytes, 0 left"),
    (one_record(build_hello(session_id=b"x" * 33)), "legacy_session_id: length 33 out of range"),
    (one_record(build_hello(suites=())), "cipher_suites: length 0 out of range"),
    (one_record(build_hello(compression=b"")), "legacy_compression_methods: length 0 out of range"),
    (one_record(build_hello(legacy_version=0x0202)), "legacy_version 0x0202 is not TLS"),
    (one_record(build_hello(trailing=b"\x00")), "ClientHello: 1 trailing bytes"),
    (one_record(build_hello(ext(5, b"") + ext(5, b""))), "duplicate extension 5"),
    (one_record(build_hello(b"\x00\x00\x00\x05abc")), "extension 0: needs 5 bytes, 3 left"),
    (one_record(build_hello(b"\x00")), "extension type: needs 2 bytes, 1 left"),
    (one_record(build_hello(b"\x00\x10\x00")), "extension 16 length: needs 2 bytes, 1 left"),
    (one_record(build_hello(sni_ext(b"a.test", 1))), "server_name type 1 is not host_name"),
    (one_record(build_hello(sni_ext(b""))), "host_name: length 0 out of range"),
    (one_record(build_hello(ext(0, u16(0)))), "server_name_list: length 0 out of range"),
    (one_record(build_hello(ext(0, b""))), "server_name_list length: needs 2 bytes, 0 left"),
    (
        one_record(build_hello(ext(0, u16(14) + b"\x00\x00\x04a.de" + b"\x00\x00\x04b.de"))),
        "server_name_list must hold exactly one host_name",
    ),
    (one_record(build_hello(sni_ext(b"a.test")[:-1])), "extension 0: needs 11 bytes, 10 left"),
    (
        one_record(build_hello(ext(0, u16(9) + b"\x00\x00\x07a.test"))),
        "host_name: needs 7 bytes, 6 left",
    ),
    (one_record(build_hello(sni_ext(b"a..b"))), "server_name is not a valid DNS host name"),
    (
        one_record(build_hello(ext(0, u16(1) + b"\x00\x00"))),
        "server_name extension: 1 trailing bytes",
    ),
    (one_record(build_hello(alpn_ext([b""]))), "protocol_name_list: length 1 out of range"),
    (one_record(build_hello(alpn_ext([b"h2", b""]))), "protocol_name: length 0 out of range"),
    (one_record(build_hello(ext(16, u16(3) + b"\x05h2"))), "protocol_name: needs 5 bytes, 2 left"),
    (one_record(build_hello(ext(43, b"\x03\x03\x04\x03"))), "supported_versions: odd length"),
    (one_record(build_hello(ext(43, b"\x00"))), "supported_versions: length 0 out of range"),
    (
        one_record(build_hello(ext(43, b"\x02\x03\x04\x00"))),
        "supported_versions extension: 1 trailing bytes",
    ),
]


@pytest.mark.parametrize(("data", "reason"), REASONS, ids=[r for _, r in REASONS])
def test_reject_reasons_are_pinned(data: bytes, reason: str) -> None:
    result = parse_client_hello(data)
    assert isinstance(result, Rejected), result
    assert result.reason == reason


def test_many_extensions_within_the_size_limit() -> None:
    exts = b"".join(ext(t, b"") for t in range(100, 3100))  # 12000 bytes of empty extensions
    result = parse_client_hello(records_of(build_hello(exts), [1 << 14]))
    assert isinstance(result, ClientHello)
    assert result.extension_types == tuple(range(100, 3100))
    duplicate = records_of(build_hello(exts + ext(3000, b"")), [1 << 14])
    assert parse_client_hello(duplicate) == Rejected(
        RejectKind.MALFORMED, "duplicate extension 3000"
    )


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"[0-9a-fA-F.:]{1,45}", fullmatch=True))
def test_validate_hostname_never_returns_an_ip_literal(text: str) -> None:
    host = validate_hostname(text.encode())
    if host is not None:
        with pytest.raises(ValueError):
            ipaddress.ip_address(host)


@pytest.mark.parametrize("literal", [b"::1", b"fe80::1", b"::ffff:10.0.0.1", b"0.0.0.0"])
def test_validate_hostname_rejects_ip_literals(literal: bytes) -> None:
    assert validate_hostname(literal) is None
