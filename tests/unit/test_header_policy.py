"""The request header policy (underscores, count and value limits) and the `http:` config
section shared by the edge and the sidecar."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcar.edge.config import parse_edge_config
from meshcar.errors import ConfigError, ProtocolError
from meshcar.proto.http1 import (
    DEFAULT_HEADER_POLICY,
    MAX_HEAD_BYTES,
    HeaderPolicy,
    Http1Parser,
    RequestHead,
)
from meshcar.proto.path import PathOptions
from meshcar.sidecar.config import HttpPolicy, parse_config

DROP = HeaderPolicy(underscores="drop")


def head(lines: list[tuple[bytes, bytes]]) -> bytes:
    return b"GET / HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in lines) + b"\r\n"


def parse(
    raw: bytes, policy: HeaderPolicy = DEFAULT_HEADER_POLICY, step: int | None = None
) -> RequestHead:
    p = Http1Parser("request", policy)
    events = []
    for i in range(0, len(raw), step or len(raw)):
        events += p.feed(raw[i : i + (step or len(raw))])
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert len(heads) == 1
    return heads[0]


UNDERSCORED = [
    b"X_Forwarded_Client_Cert",
    b"x_forwarded_client_cert",
    b"X-Meshcar_Peer-Identity",
    b"_",
    b"Host_",
    b"Content_Length",
    b"Transfer_Encoding",
]


@pytest.mark.parametrize("name", UNDERSCORED)
def test_underscores_rejected_by_default(name: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        parse(head([(b"Host", b"a"), (name, b"spoof")]))
    assert err.value.status == 400 and "underscore" in str(err.value)


@pytest.mark.parametrize("name", UNDERSCORED)
def test_underscores_dropped(name: bytes) -> None:
    req = parse(head([(b"Host", b"a"), (name, b"spoof"), (b"X-Ok", b"1")]), DROP)
    assert req.headers == [(b"Host", b"a"), (b"X-Ok", b"1")]
    assert req.content_length is None and not req.chunked  # `Content_Length` frames nothing


def test_drop_keeps_framing_and_host_checks() -> None:
    req = parse(head([(b"Host", b"a"), (b"Host_", b"b")]), DROP)
    assert req.header(b"host") == b"a"
    with pytest.raises(ProtocolError):  # a dropped Host_ does not hide a second Host
        parse(head([(b"Host", b"a"), (b"Host_", b"b"), (b"host", b"c")]), DROP)


@pytest.mark.parametrize(
    "policy", [HeaderPolicy(max_count=3), HeaderPolicy(max_count=3, underscores="drop")]
)
def test_count_limit(policy: HeaderPolicy) -> None:
    ok = [(b"Host", b"a"), (b"A", b"1"), (b"B", b"2")]
    assert len(parse(head(ok), policy).headers) == 3
    extra = b"C_" if policy.underscores == "drop" else b"C"  # dropped headers count too
    with pytest.raises(ProtocolError) as err:
        parse(head([*ok, (extra, b"3")]), policy)
    assert err.value.status == 431


def test_count_limit_is_per_message() -> None:
    policy = HeaderPolicy(max_count=2)
    one = head([(b"Host", b"a"), (b"A", b"1")])
    p = Http1Parser("request", policy)
    events = p.feed(one * 5)  # five pipelined heads of two headers each
    assert sum(isinstance(e, RequestHead) for e in events) == 5


def test_default_limits() -> None:
    policy = HeaderPolicy()
    assert (policy.underscores, policy.max_count, policy.max_value_bytes) == (
        "reject",
        100,
        16 * 1024,
    )
    many = [(b"Host", b"a")] + [(b"X-%d" % i, b"v") for i in range(99)]
    assert len(parse(head(many)).headers) == 100
    with pytest.raises(ProtocolError) as err:
        parse(head([*many, (b"X-Last", b"v")]))
    assert err.value.status == 431


@pytest.mark.parametrize("step", [None, 1, 1000])
def test_value_limit(step: int | None) -> None:
    policy = HeaderPolicy(max_value_bytes=4096)
    req = parse(head([(b"Host", b"a"), (b"Cookie", b"c" * 4096)]), policy, step)
    assert req.header(b"cookie") == b"c" * 4096
    with pytest.raises(ProtocolError) as err:
        parse(head([(b"Host", b"a"), (b"Cookie", b"c" * 4097)]), policy, step)
    assert err.value.status == 431


def test_cumulative_head_limit_still_holds_with_a_large_value_limit() -> None:
    policy = HeaderPolicy(max_value_bytes=MAX_HEAD_BYTES)
    with pytest.raises(ProtocolError) as err:
        parse(head([(b"Host", b"a")] + [(b"X-%d" % i, b"v" * 30000) for i in range(3)]), policy)
    assert err.value.status == 431


def test_policy_is_validated() -> None:
    for bad in ({"underscores": "allow"}, {"max_count": 0}, {"max_value_bytes": 0}):
        with pytest.raises(ValueError):
            HeaderPolicy(**bad)  # type: ignore[arg-type]


def test_responses_keep_their_headers() -> None:
    """The policy is for requests: a response's `X_Upstream` header is passed on."""
    p = Http1Parser("response", DROP)
    events = p.feed(b"HTTP/1.1 200 OK\r\nX_Upstream: 1\r\nContent-Length: 0\r\n\r\n")
    assert (b"X_Upstream", b"1") in events[0].headers  # type: ignore[union-attr]


# --- properties --------------------------------------------------------------------------

names = (
    st.text(alphabet="ABCxyz-_", min_size=1, max_size=12)
    .map(str.encode)
    .filter(lambda n: n.lower() not in (b"host", b"content-length", b"transfer-encoding"))
)
values = st.binary(min_size=0, max_size=300).map(lambda v: bytes(b for b in v if 0x21 <= b < 0x7F))
header_lists = st.lists(st.tuples(names, values), max_size=30)
policies = st.builds(
    HeaderPolicy,
    st.sampled_from(["reject", "drop"]),
    st.integers(min_value=1, max_value=40),
    st.integers(min_value=1, max_value=400),
)


@settings(max_examples=300)
@given(header_lists, policies, st.sampled_from([None, 1, 7, 64]))
def test_policy_properties(
    headers: list[tuple[bytes, bytes]], policy: HeaderPolicy, step: int | None
) -> None:
    lines = [(b"Host", b"a"), *headers]
    raw = head(lines)
    try:
        req = parse(raw, policy, step)
    except ProtocolError as exc:
        too_many = len(lines) > policy.max_count
        too_big = any(len(v) > policy.max_value_bytes for _, v in lines)
        underscore = policy.underscores == "reject" and any(b"_" in n for n, _ in lines)
        assert (exc.status == 431 and (too_many or too_big)) or (exc.status == 400 and underscore)
        return
    # nothing forwarded ever has an underscore in its name, under either action
    assert not any(b"_" in n for n, _ in req.headers)
    # the limits hold
    assert len(lines) <= policy.max_count
    assert all(len(v) <= policy.max_value_bytes for _, v in req.headers)
    # drop removes exactly the underscored headers, in order
    assert req.headers == [(n, v) for n, v in lines if b"_" not in n]


# --- the `http:` config section ----------------------------------------------------------

SIDECAR = {
    "identity": {
        "spiffe_id": "spiffe://t.test/svc/a",
        "ca_url": "https://127.0.0.1:1",
        "ca_bundle": "x",
        "state_dir": "/tmp/x",
    },
    "app": {"port": 8080},
    "inbound": {"listen": "127.0.0.1:1"},
    "admin": {"listen": "127.0.0.1:2"},
}
EDGE = {
    "listen": {"https": "127.0.0.1:8443"},
    "admin": {"listen": "127.0.0.1:7204"},
    "routes": [
        {
            "host": "www.test",
            "mode": "terminate",
            "tls": {"cert": "c", "key": "k"},
            "backend": {"endpoints": ["127.0.0.1:9001"]},
        }
    ],
}
HTTP = {
    "path": {"merge_slashes": False, "escaped_slashes": "keep"},
    "headers": {"underscores": "drop", "max_count": 50, "max_value_bytes": 4096},
}
EXPECTED = HttpPolicy(PathOptions(False, "keep"), HeaderPolicy("drop", 50, 4096))


def test_http_section_defaults_and_values() -> None:
    assert parse_config(SIDECAR, "s.yaml", Path("/")).http == HttpPolicy()
    assert parse_edge_config(EDGE, "e.yaml", Path("/")).http == HttpPolicy()
    assert parse_config({**SIDECAR, "http": HTTP}, "s.yaml", Path("/")).http == EXPECTED
    assert parse_edge_config({**EDGE, "http": HTTP}, "e.yaml", Path("/")).http == EXPECTED


BAD_HTTP = {
    "path": {"merge_slashes": "yes", "escaped_slashes": "decode", "x": 1},
    "headers": {"underscores": "allow", "max_count": 0, "max_value_bytes": True},
    "y": {},
}


@pytest.mark.parametrize("which", ["sidecar", "edge"])
def test_http_section_problems_are_all_reported(which: str) -> None:
    with pytest.raises(ConfigError) as err:
        if which == "sidecar":
            parse_config({**SIDECAR, "http": BAD_HTTP}, "f.yaml", Path("/"))
        else:
            parse_edge_config({**EDGE, "http": BAD_HTTP}, "f.yaml", Path("/"))
    text = str(err.value)
    for key in (
        "http.path.merge_slashes",
        "http.path.escaped_slashes",
        "http.path.x",
        "http.headers.underscores",
        "http.headers.max_count",
        "http.headers.max_value_bytes",
        "http.y",
    ):
        assert f"f.yaml: {key}:" in text, key
    with pytest.raises(ConfigError, match="http: must be a mapping"):
        parse_config({**SIDECAR, "http": []}, "f.yaml", Path("/"))
