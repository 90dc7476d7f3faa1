"""Tests for meshcar.proto.proxy_protocol: round trips, every prefix, malformed input."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcar.proto.proxy_protocol import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    Command,
    Family,
    Incomplete,
    ProxyHeader,
    Rejected,
    RejectKind,
    crc32c,
    encode_v1,
    encode_v2,
    parse_proxy_header,
)

RESULT_TYPES = (Incomplete, ProxyHeader, Rejected)


def assert_every_prefix_incomplete(header: bytes) -> None:
    for end in range(len(header)):
        result = parse_proxy_header(header[:end])
        assert isinstance(result, Incomplete), (end, header[:end], result)
        assert result.at_least >= 1


# --- v1 ---------------------------------------------------------------------------------


def test_v1_tcp4_known_bytes() -> None:
    header = encode_v1(("192.0.2.10", 51234), ("198.51.100.1", 443))
    assert header == b"PROXY TCP4 192.0.2.10 198.51.100.1 51234 443\r\n"
    result = parse_proxy_header(header + b"\x16\x03\x01")
    assert result == ProxyHeader(
        1, Command.PROXY, Family.TCP4, "192.0.2.10", 51234, "198.51.100.1", 443, (), len(header)
    )


def test_v1_tcp6_and_longest_header_fits() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    header = encode_v1((full, 65535), (full, 65535))
    assert len(header) == V1_MAX_LENGTH - 3  # 107 is the worst case with UNKNOWN
    result = parse_proxy_header(header)
    assert isinstance(result, ProxyHeader)
    assert (result.family, result.src_addr, result.src_port) == (Family.TCP6, full, 65535)
    assert_every_prefix_incomplete(header)


def test_v1_unknown() -> None:
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
        result = parse_proxy_header(line + b"rest")
        assert isinstance(result, ProxyHeader)
        assert result.family is Family.UNKNOWN
        assert result.src_addr is None and result.dst_port is None
        assert result.consumed == len(line)


V1_BAD = [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # bare LF
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",
    b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",  # double space
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",  # trailing space
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",  # leading zero
    b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",  # family mismatch
    b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n",  # non-ASCII digit
    b"PROXY TCP4 1.2.3.4\x005.6.7.8 1 2\r\n",
    b"PROXY \r\n",
    b"PROXY\r\n",
    b"PROXY TCP4 " + b"1" * 100 + b"\r\n",  # over 107 bytes
]


@pytest.mark.parametrize("data", V1_BAD)
def test_v1_malformed_is_rejected(data: bytes) -> None:
    result = parse_proxy_header(data)
    assert isinstance(result, Rejected), result
    assert result.kind in (RejectKind.MALFORMED, RejectKind.TOO_LARGE, RejectKind.NOT_PROXY)


def test_v1_too_long_without_crlf_is_rejected_at_107_bytes() -> None:
    data = b"PROXY UNKNOWN " + b"x" * 200
    assert isinstance(parse_proxy_header(data[:106]), Incomplete)
    result = parse_proxy_header(data[:107])
    assert isinstance(result, Rejected) and result.kind is RejectKind.TOO_LARGE
    # a CRLF ending exactly at byte 107 is fine
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
    assert len(line) == V1_MAX_LENGTH
    assert isinstance(parse_proxy_header(line), ProxyHeader)


def test_v1_garbage_rejected_early() -> None:
    assert parse_proxy_header(b"PROXZ").kind is RejectKind.NOT_PROXY  # type: ignore[union-attr]
    assert parse_proxy_header(b"GET / HTTP/1.1\r\n").kind is RejectKind.NOT_PROXY  # type: ignore[union-attr]
    assert isinstance(parse_proxy_header(b"PROXY TCP4 1.2\n"), Rejected)


# --- v2 ---------------------------------------------------------------------------------


def test_v2_tcp4_known_bytes() -> None:
    header = encode_v2(("192.0.2.10", 51234), ("198.51.100.1", 443))
    assert header == (
        V2_SIGNATURE
        + b"\x21\x11\x00\x0c"
        + bytes([192, 0, 2, 10, 198, 51, 100, 1])
        + struct.pack("!HH", 51234, 443)
    )
    result = parse_proxy_header(header + b"payload")
    assert result == ProxyHeader(
        2, Command.PROXY, Family.TCP4, "192.0.2.10", 51234, "198.51.100.1", 443, (), 28
    )


def test_v2_tcp6_with_tlvs_and_crc() -> None:
    tlvs = [(PP2_TYPE_ALPN, b"h2"), (PP2_TYPE_AUTHORITY, b"payments.demo.test")]
    header = encode_v2(("2001:db8::1", 1), ("2001:db8::2", 2), tlvs=tlvs, with_crc32c=True)
    result = parse_proxy_header(header)
    assert isinstance(result, ProxyHeader)
    assert result.family is Family.TCP6
    assert result.tlv(PP2_TYPE_AUTHORITY) == b"payments.demo.test"
    assert result.tlv(PP2_TYPE_CRC32C) is not None
    assert result.tlv(0x7F) is None
    assert result.tlvs[:2] == tuple(tlvs)
    assert_every_prefix_incomplete(header)
    corrupted = bytearray(header)
    corrupted[20] ^= 1
    bad = parse_proxy_header(bytes(corrupted))
    assert isinstance(bad, Rejected) and "CRC32C" in bad.reason


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283


def test_v2_local() -> None:
    header = encode_v2(None, None, local=True)
    assert header == V2_SIGNATURE + b"\x20\x00\x00\x00"
    result = parse_proxy_header(header)
    assert isinstance(result, ProxyHeader)
    assert (result.command, result.family, result.src_addr) == (Command.LOCAL, Family.UNKNOWN, None)
    # LOCAL with an address block: the addresses are discarded
    odd = V2_SIGNATURE + b"\x20\x11\x00\x0c" + b"\x01" * 12
    result = parse_proxy_header(odd)
    assert isinstance(result, ProxyHeader)
    assert result.command is Command.LOCAL and result.src_addr is None and result.consumed == 28


def test_v2_unspec_and_unix() -> None:
    result = parse_proxy_header(encode_v2(None, None))
    assert isinstance(result, ProxyHeader)
    assert (result.command, result.family) == (Command.PROXY, Family.UNKNOWN)
    unix = V2_SIGNATURE + b"\x21\x31" + struct.pack("!H", 216)
    unix += b"/run/a.sock".ljust(108, b"\x00") + b"/run/b.sock".ljust(108, b"\x00")
    result = parse_proxy_header(unix)
    assert isinstance(result, ProxyHeader)
    assert (result.family, result.src_addr, result.dst_addr) == (
        Family.UNIX_STREAM,
        "/run/a.sock",
        "/run/b.sock",
    )


V2_BAD = {
    "version_1_nibble": V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12,
    "command_2": V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,
    "family_4": V2_SIGNATURE + b"\x21\x41\x00\x0c" + b"\x00" * 12,
    "transport_3": V2_SIGNATURE + b"\x21\x13\x00\x0c" + b"\x00" * 12,
    "short_inet_block": V2_SIGNATURE + b"\x21\x11\x00\x0b" + b"\x00" * 11,
    "short_inet6_block": V2_SIGNATURE + b"\x21\x21\x00\x0c" + b"\x00" * 12,
    "tlv_overrun": V2_SIGNATURE + b"\x21\x11\x00\x10" + b"\x00" * 12 + b"\x01\x00\x05a",
    "tlv_truncated_header": V2_SIGNATURE + b"\x21\x11\x00\x0e" + b"\x00" * 12 + b"\x01\x00",
    "crc_wrong_size": V2_SIGNATURE + b"\x21\x11\x00\x11" + b"\x00" * 12 + b"\x03\x00\x02ab",
    "crc_mismatch": V2_SIGNATURE + b"\x21\x11\x00\x13" + b"\x00" * 12 + b"\x03\x00\x04abcd",
    "too_large": V2_SIGNATURE + b"\x21\x11\xff\xff",
    "bad_signature": b"\r\n\r\n\x00\r\nQUIX\n",
}


@pytest.mark.parametrize("name", sorted(V2_BAD))
def test_v2_malformed_is_rejected(name: str) -> None:
    result = parse_proxy_header(V2_BAD[name])
    assert isinstance(result, Rejected), result


def test_v2_size_limit_is_configurable() -> None:
    header = encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[(0xE0, b"x" * 5000)])
    assert parse_proxy_header(header).kind is RejectKind.TOO_LARGE  # type: ignore[union-attr]
    assert isinstance(parse_proxy_header(header, max_v2_size=1 << 17), ProxyHeader)


def test_encoders_refuse_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_v1(("1.2.3.4", 1), ("::1", 2))
    with pytest.raises(ValueError):
        encode_v2(("1.2.3.4", 70000), ("5.6.7.8", 2))
    with pytest.raises(ValueError):
        encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[(256, b"")])
    with pytest.raises(ValueError):
        encode_v2(("not-an-ip", 1), ("5.6.7.8", 2))


def test_not_proxy() -> None:
    assert parse_proxy_header(b"") == Incomplete(1)
    for data in (b"\x16\x03\x01\x02\x00", b"GET /", b"\x00"):
        result = parse_proxy_header(data)
        assert isinstance(result, Rejected) and result.kind is RejectKind.NOT_PROXY


# --- properties -------------------------------------------------------------------------

_PORT = st.integers(0, 65535)
_V4 = st.ip_addresses(v=4).map(str)
_V6 = st.ip_addresses(v=6).map(str)
_PAIR = st.one_of(
    st.tuples(st.tuples(_V4, _PORT), st.tuples(_V4, _PORT)),
    st.tuples(st.tuples(_V6, _PORT), st.tuples(_V6, _PORT)),
)
_TLVS = st.lists(
    st.tuples(st.integers(0, 255).filter(lambda t: t != PP2_TYPE_CRC32C), st.binary(max_size=40)),
    max_size=5,
)


@settings(max_examples=150, deadline=None)
@given(pair=_PAIR, tail=st.binary(max_size=20))
def test_v1_round_trip(pair: tuple[tuple[str, int], tuple[str, int]], tail: bytes) -> None:
    src, dst = pair
    header = encode_v1(src, dst)
    assert len(header) <= V1_MAX_LENGTH
    result = parse_proxy_header(header + tail)
    assert isinstance(result, ProxyHeader)
    assert (result.src_addr, result.src_port, result.dst_addr, result.dst_port) == (
        str(ipaddress.ip_address(src[0])),
        src[1],
        str(ipaddress.ip_address(dst[0])),
        dst[1],
    )
    assert result.consumed == len(header)
    assert_every_prefix_incomplete(header)


@settings(max_examples=150, deadline=None)
@given(pair=_PAIR, tlvs=_TLVS, crc=st.booleans(), tail=st.binary(max_size=20))
def test_v2_round_trip(
    pair: tuple[tuple[str, int], tuple[str, int]],
    tlvs: list[tuple[int, bytes]],
    crc: bool,
    tail: bytes,
) -> None:
    src, dst = pair
    header = encode_v2(src, dst, tlvs=tlvs, with_crc32c=crc)
    result = parse_proxy_header(header + tail)
    assert isinstance(result, ProxyHeader)
    assert result.family is (Family.TCP4 if ":" not in src[0] else Family.TCP6)
    assert (result.src_addr, result.src_port, result.dst_addr, result.dst_port) == (
        str(ipaddress.ip_address(src[0])),
        src[1],
        str(ipaddress.ip_address(dst[0])),
        dst[1],
    )
    assert result.tlvs[: len(tlvs)] == tuple(tlvs)
    assert len(result.tlvs) == len(tlvs) + crc
    assert result.consumed == len(header)
    assert_every_prefix_incomplete(header)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data: bytes) -> None:
    assert isinstance(parse_proxy_header(data), RESULT_TYPES)


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE]),
    rest=st.binary(max_size=120),
)
def test_signature_plus_random_bytes_never_raise(prefix: bytes, rest: bytes) -> None:
    result = parse_proxy_header(prefix + rest)
    assert isinstance(result, RESULT_TYPES)
    if isinstance(result, ProxyHeader):
        assert result.consumed <= len(prefix + rest)


@settings(max_examples=200, deadline=None)
@given(
    pair=_PAIR,
    version=st.sampled_from([1, 2]),
    flips=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=3
    ),
)
def test_mutated_headers_never_raise(
    pair: tuple[tuple[str, int], tuple[str, int]], version: int, flips: list[tuple[int, int]]
) -> None:
    header = bytearray(encode_v1(*pair) if version == 1 else encode_v2(*pair, with_crc32c=True))
    for index, value in flips:
        header[index % len(header)] = value
    assert isinstance(parse_proxy_header(bytes(header)), RESULT_TYPES)


# --- ProxyPolicy: who may send a header ---------------------------------------------------


def test_policy_verdicts() -> None:
    from meshcar.proto.proxy_protocol import ProxyPolicy, Verdict

    header = parse_proxy_header(encode_v1(("203.0.113.7", 1), ("127.0.0.1", 2)))
    none = parse_proxy_header(b"\x16\x03\x01")
    broken = parse_proxy_header(b"PROXY TCP9 x\r\n")
    assert (
        isinstance(header, ProxyHeader)
        and isinstance(none, Rejected)
        and isinstance(broken, Rejected)
    )
    strict = ProxyPolicy.parse(["127.0.0.1/32", "10.0.0.0/8"])
    loose = ProxyPolicy.parse(["127.0.0.1"], required=False)
    cases = [
        (strict, "127.0.0.1", header, Verdict.ACCEPT, ""),
        (strict, "::ffff:10.9.8.7", header, Verdict.ACCEPT, ""),  # v4-mapped peer
        (strict, "127.0.0.1", none, Verdict.REFUSE, "missing_header"),
        (strict, "127.0.0.1", broken, Verdict.REFUSE, "malformed"),
        (strict, "127.0.0.2", header, Verdict.REFUSE, "untrusted_source"),
        (strict, "127.0.0.2", broken, Verdict.REFUSE, "untrusted_source"),
        (strict, "127.0.0.2", none, Verdict.DIRECT, ""),
        (strict, "not-an-ip", header, Verdict.REFUSE, "untrusted_source"),
        (loose, "127.0.0.1", none, Verdict.DIRECT, ""),
        (loose, "127.0.0.1", header, Verdict.ACCEPT, ""),
    ]
    for policy, peer, result, verdict, reason in cases:
        assert policy.verdict(peer, result) == (verdict, reason), (peer, result)
    default = ProxyPolicy()
    assert default.required and default.trusts("127.0.0.1") and default.trusts("::1")
    assert not default.trusts("127.0.0.2") and not default.trusts("192.0.2.1")
    with pytest.raises(ValueError, match="10.0.0.1/8"):
        ProxyPolicy.parse(["10.0.0.1/8"])  # host bits set: a typo, not a network
