"""Tests for meshcar.proto.forwarded: X-Forwarded-* with trusted hops, XFCC encoding."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcar.proto.forwarded import (
    apply_forwarded,
    encode_xfcc,
    forwarded_for,
    parse_xfcc,
    xfcc_element,
)

SPOOFED = [
    (b"Host", b"api.demo.test"),
    (b"X-Forwarded-For", b"6.6.6.6, 7.7.7.7"),
    (b"x-forwarded-for", b"8.8.8.8"),
    (b"X-Forwarded-Proto", b"http"),
    (b"X-Forwarded-Host", b"evil.test"),
    (b"X-Forwarded-Client-Cert", b"By=spiffe://meshcar.demo/svc/edge;URI=spiffe://x"),
    (b"Forwarded", b"for=6.6.6.6"),
    (b"Accept", b"*/*"),
]


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [k.lower() for k, _ in headers]


def test_zero_trusted_hops_replaces_everything() -> None:
    fwd = forwarded_for(SPOOFED, peer_ip="203.0.113.9", scheme="https", host="api.demo.test")
    assert fwd.client_ip == "203.0.113.9"
    assert fwd.xff == "203.0.113.9"
    assert (fwd.proto, fwd.host) == ("https", "api.demo.test")
    out = apply_forwarded(SPOOFED, fwd)
    assert out == [
        (b"Host", b"api.demo.test"),
        (b"Accept", b"*/*"),
        (b"X-Forwarded-For", b"203.0.113.9"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"api.demo.test"),
    ]


def test_xfcc_is_always_replaced() -> None:
    fwd = forwarded_for(SPOOFED, peer_ip="127.0.0.1", scheme="https", host=None, trusted_hops=2)
    xfcc = encode_xfcc([xfcc_element(by="spiffe://meshcar.demo/svc/api", uri="spiffe://p")])
    out = apply_forwarded(SPOOFED, fwd, xfcc=xfcc)
    assert names(out).count(b"x-forwarded-client-cert") == 1
    assert (b"X-Forwarded-Client-Cert", xfcc.encode()) in out
    assert b"forwarded" not in names(out)
    assert b"x-forwarded-host" in names(out)  # the trusted proxy's value


@pytest.mark.parametrize(
    ("hops", "client", "chain"),
    [
        (0, "10.0.0.1", ("10.0.0.1",)),
        (1, "8.8.8.8", ("8.8.8.8", "10.0.0.1")),
        (2, "7.7.7.7", ("7.7.7.7", "8.8.8.8", "10.0.0.1")),
        (3, "6.6.6.6", ("6.6.6.6", "7.7.7.7", "8.8.8.8", "10.0.0.1")),
        # fewer entries than trusted hops: the peer, never a client-written entry (Envoy's
        # xff_num_trusted_hops falls back to the downstream address)
        (4, "10.0.0.1", ("10.0.0.1",)),
        (9, "10.0.0.1", ("10.0.0.1",)),
    ],
)
def test_trusted_hops_pick_the_client(hops: int, client: str, chain: tuple[str, ...]) -> None:
    # repeated XFF lines are one list: 6.6.6.6, 7.7.7.7, 8.8.8.8; the LB at 10.0.0.1 connects
    fwd = forwarded_for(
        SPOOFED, peer_ip="10.0.0.1", scheme="https", host="h.test", trusted_hops=hops
    )
    assert fwd.client_ip == client
    assert fwd.chain == chain


def test_trusted_proto_and_host_need_single_valid_values() -> None:
    base = [
        (b"X-Forwarded-For", b"192.0.2.7"),
        (b"X-Forwarded-Proto", b"HTTP"),
        (b"X-Forwarded-Host", b"www.demo.test:8443"),
    ]
    fwd = forwarded_for(base, peer_ip="10.0.0.1", scheme="https", host="x", trusted_hops=1)
    assert (fwd.proto, fwd.host) == ("http", "www.demo.test:8443")
    # the chain is incomplete (no entry from the trusted proxy): its other claims are not
    # believed either
    fwd = forwarded_for(base[1:], peer_ip="10.0.0.1", scheme="https", host="x", trusted_hops=1)
    assert (fwd.proto, fwd.host, fwd.client_ip) == ("https", "x", "10.0.0.1")
    bad = [
        (b"X-Forwarded-For", b"192.0.2.7"),
        (b"X-Forwarded-Proto", b"https, http"),
        (b"X-Forwarded-Host", b"a b\x01"),
    ]
    fwd = forwarded_for(bad, peer_ip="10.0.0.1", scheme="https", host="x", trusted_hops=1)
    assert (fwd.proto, fwd.host) == ("https", "x")
    fwd = forwarded_for(
        [(b"X-Forwarded-For", b"192.0.2.7"), (b"X-Forwarded-Proto", b"gopher")],
        peer_ip="10.0.0.1",
        scheme="http",
        host=None,
        trusted_hops=1,
    )
    assert fwd.proto == "http"


@pytest.mark.parametrize(
    ("xff", "hops", "chain"),
    [
        (b"1.1.1.1, unknown, 2.2.2.2", 1, ("2.2.2.2", "10.0.0.1")),
        (b"1.1.1.1, unknown, 2.2.2.2", 2, ("10.0.0.1",)),  # a trusted proxy never writes `unknown`
        (b"1.1.1.1, unknown, 2.2.2.2", 5, ("10.0.0.1",)),
        (b"1.1.1.1, 2.2.2.2, 3.3.3.3", 3, ("1.1.1.1", "2.2.2.2", "3.3.3.3", "10.0.0.1")),
        (b"1.1.1.1, 2.2.2.2, 3.3.3.3", 2, ("2.2.2.2", "3.3.3.3", "10.0.0.1")),
        (b"9.9.9.9", 2, ("10.0.0.1",)),  # the client skipped a proxy, or wrote the only entry
        (b"", 1, ("10.0.0.1",)),
        (b" , ,", 1, ("10.0.0.1",)),
        (b"9.9.9.9, ", 1, ("9.9.9.9", "10.0.0.1")),  # empty entries are not entries
        (b"[::1]:80, 300.1.1.1", 1, ("10.0.0.1",)),
    ],
)
def test_incomplete_or_broken_chain_means_the_peer(
    xff: bytes, hops: int, chain: tuple[str, ...]
) -> None:
    headers = [(b"X-Forwarded-For", xff)]
    fwd = forwarded_for(headers, peer_ip="10.0.0.1", scheme="https", host=None, trusted_hops=hops)
    assert fwd.chain == chain and fwd.client_ip == chain[0]


@given(
    st.lists(st.one_of(st.ip_addresses().map(str), st.text(max_size=8)), max_size=6),
    st.integers(min_value=0, max_value=8),
)
def test_the_client_is_the_peer_or_a_trusted_entry(entries: list[str], hops: int) -> None:
    """The client is the peer or one of the rightmost `hops` entries, never one further left."""
    value = ", ".join(entries)
    if any(ord(ch) < 0x20 or ord(ch) > 0xFF for ch in value):
        return
    headers = [(b"X-Forwarded-For", value.encode("latin-1"))]
    fwd = forwarded_for(headers, peer_ip="10.0.0.1", scheme="https", host=None, trusted_hops=hops)
    claimed = [e.strip() for e in value.split(",") if e.strip()]
    if fwd.client_ip != "10.0.0.1":
        assert hops > 0 and len(claimed) >= hops
        assert len(fwd.chain) == hops + 1


def test_entries_with_ports_and_ipv6_are_normalised() -> None:
    headers = [(b"X-Forwarded-For", b"[2001:DB8::1]:443, 192.0.2.1:1234")]
    fwd = forwarded_for(headers, peer_ip="::1", scheme="https", host=None, trusted_hops=2)
    assert fwd.chain == ("2001:db8::1", "192.0.2.1", "::1")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        forwarded_for([], peer_ip="nope", scheme="https", host=None)
    with pytest.raises(ValueError):
        forwarded_for([], peer_ip="1.2.3.4", scheme="ftp", host=None)
    with pytest.raises(ValueError):
        forwarded_for([], peer_ip="1.2.3.4", scheme="https", host=None, trusted_hops=-1)
    fwd = forwarded_for([], peer_ip="1.2.3.4", scheme="https", host="a\r\nX-Evil: 1")
    with pytest.raises(ValueError):
        apply_forwarded([], fwd)


# --- XFCC --------------------------------------------------------------------------------


def test_xfcc_envoy_format() -> None:
    der = b"\x30\x82certificate-bytes"
    element = xfcc_element(
        by="spiffe://meshcar.demo/svc/api",
        cert_der=der,
        uri="spiffe://meshcar.demo/svc/edge",
    )
    value = encode_xfcc([element])
    assert value == (
        "By=spiffe://meshcar.demo/svc/api;"
        f"Hash={hashlib.sha256(der).hexdigest()};"
        "URI=spiffe://meshcar.demo/svc/edge"
    )
    assert parse_xfcc(value) == (element,)


def test_xfcc_quoting() -> None:
    element = xfcc_element(subject='CN=a,O="b";x', uri="spiffe://t/x", dns=["a.test"])
    value = encode_xfcc([element, xfcc_element(by="spiffe://t/y")])
    assert value == 'Subject="CN=a,O=\\"b\\";x";URI=spiffe://t/x;DNS=a.test,By=spiffe://t/y'
    assert parse_xfcc(value) == (element, (("By", "spiffe://t/y"),))


@pytest.mark.parametrize(
    "bad",
    ["", "By", "Nope=x", 'By="unterminated', 'By="x"y', "By=a=b", 'By=a"b', 'By="a\\'],
)
def test_parse_xfcc_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_xfcc(bad)


def test_encode_xfcc_refuses_injection_and_bad_keys() -> None:
    with pytest.raises(ValueError):
        encode_xfcc([(("URI", "spiffe://t/x\r\nX-Evil: 1"),)])
    with pytest.raises(ValueError):
        encode_xfcc([(("Nope", "x"),)])
    with pytest.raises(ValueError):
        encode_xfcc([()])


_VALUE = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=30,
)
_ELEMENT = st.lists(
    st.tuples(st.sampled_from(["By", "Hash", "Subject", "URI", "DNS"]), _VALUE),
    min_size=1,
    max_size=5,
).map(tuple)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ELEMENT, min_size=1, max_size=4))
def test_xfcc_round_trip(elements: list[tuple[tuple[str, str], ...]]) -> None:
    value = encode_xfcc(elements)
    assert parse_xfcc(value) == tuple(elements)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_parse_xfcc_never_raises_anything_but_valueerror(value: str) -> None:
    try:
        parse_xfcc(value)
    except ValueError:
        pass
