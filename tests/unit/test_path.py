"""Tests for meshcar.proto.path: request-target normalisation (vectors and properties)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcar.proto.path import (
    UNRESERVED,
    PathError,
    PathOptions,
    normalise_path,
    normalise_target,
)

KEEP = PathOptions(escaped_slashes="keep")
NO_MERGE = PathOptions(merge_slashes=False)

# (input path, expected output) with the default options: merge_slashes, reject %2F/%5C
VECTORS = [
    # RFC 3986 5.2.4 and 5.4 (the dot-segment parts of the reference resolution examples)
    ("/a/b/c/./../../g", "/a/g"),
    ("/mid/content=5/../6", "/mid/6"),
    ("/b/c/./g", "/b/c/g"),
    ("/b/c/.", "/b/c/"),
    ("/b/c/./", "/b/c/"),
    ("/b/c/..", "/b/"),
    ("/b/c/../", "/b/"),
    ("/b/c/../g", "/b/g"),
    ("/b/c/../..", "/"),
    ("/b/c/../../g", "/g"),
    ("/b/c/../../../g", "/g"),  # 5.4.2: ".." never climbs above the root
    ("/b/c/../../../../g", "/g"),
    ("/./g", "/g"),
    ("/../g", "/g"),
    ("/g.", "/g."),
    ("/.g", "/.g"),
    ("/g..", "/g.."),
    ("/..g", "/..g"),
    ("/b/c/./../g", "/b/g"),
    ("/b/c/./g/.", "/b/c/g/"),
    ("/b/c/g/./h", "/b/c/g/h"),
    ("/b/c/g/../h", "/b/c/h"),
    ("/b/c/g;x=1/./y", "/b/c/g;x=1/y"),
    ("/b/c/g;x=1/../y", "/b/c/y"),
    ("/", "/"),
    ("/.", "/"),
    ("/..", "/"),
    # the bypass vectors: routed and forwarded as normalised
    ("/v1/../admin", "/admin"),
    ("/v1/%2e%2e/admin", "/admin"),
    ("/v1/%2E%2E/admin", "/admin"),
    ("/v1/.%2e/admin", "/admin"),
    ("/v1/%2e/admin", "/v1/admin"),
    ("//admin", "/admin"),
    ("/%61dmin", "/admin"),
    ("/%41%44%4d%49%4e", "/ADMIN"),
    # CVE-2019-9901 (Envoy did not normalise before routing/RBAC): dot segments, escaped
    ("/public/../private", "/private"),
    ("/public/%2e%2e/private", "/private"),
    ("/public/./../private", "/private"),
    # nginx merge_slashes
    ("///admin", "/admin"),
    ("/a//b///c", "/a/b/c"),
    ("/a//", "/a/"),
    ("/a//../b", "/b"),
    # decode once only: double encoding stays literal
    ("/%252e%252e/admin", "/%252e%252e/admin"),
    ("/%252F", "/%252F"),
    ("/%25", "/%25"),
    # unreserved escapes decoded, other escapes' hex uppercased
    ("/%7e%2d%5f%2e%30", "/~-_.0"),
    ("/a%3bb", "/a%3Bb"),
    ("/a%3fb%23c", "/a%3Fb%23c"),
    ("/caf%c3%a9", "/caf%C3%A9"),
    ("/a%20b", "/a%20b"),
    # characters RFC 3986 does not allow raw in a path are encoded
    ("/a{b}|c", "/a%7Bb%7D%7Cc"),
    ('/"<>^`', "/%22%3C%3E%5E%60"),
    ("/[x]", "/%5Bx%5D"),
    # sub-delims, ":" and "@" stay
    ("/a:b@c!$&'()*+,;=", "/a:b@c!$&'()*+,;="),
    ("/a;jsessionid=1/b", "/a;jsessionid=1/b"),
]


@pytest.mark.parametrize(("raw", "expected"), VECTORS)
def test_vectors(raw: str, expected: str) -> None:
    assert normalise_path(raw) == expected
    assert normalise_path(expected) == expected


REFUSED = [
    "/v1/..;/admin",  # Tomcat treats /..;/ as /../
    "/v1/..;jsessionid=x/admin",
    "/v1/.;/admin",
    "/v1/%2e%2e;/admin",
    "/v1/..%3b/admin",
    "/v1/..%3B/admin",
    "/..;",
    "/a%2fb",  # CVE-2021-29492: escaped slash
    "/a%2Fb",
    "/v1/..%2fadmin",
    "/a%5cb",  # escaped backslash
    "/a\\b",
    "/a%00b",  # NUL
    "/a\x00b",
    "/secret#x",  # fragment
    "/a\tb",
    "/a b",
    "/a\x7fb",
    "/a\x01",
    "/caf\u00e9",
    "/a%",  # malformed escapes
    "/a%4",
    "/a%zz",
    "/a%g0",
    "a/b",  # not absolute
    "",
]


@pytest.mark.parametrize("raw", REFUSED)
def test_refused(raw: str) -> None:
    with pytest.raises(PathError) as err:
        normalise_path(raw)
    assert err.value.status == 400


def test_escaped_slashes_keep() -> None:
    assert normalise_path("/a%2fb/%5c", KEEP) == "/a%2Fb/%5C"
    # kept encoded, an escaped slash is not a separator: no segment is removed across it
    assert normalise_path("/a/..%2fb", KEEP) == "/a/..%2Fb"
    with pytest.raises(PathError):
        normalise_path("/a\\b", KEEP)


def test_merge_slashes_off() -> None:
    assert normalise_path("//a//b/", NO_MERGE) == "//a//b/"
    assert normalise_path("/a/..//b", NO_MERGE) == "//b"
    assert normalise_path("/a//..", NO_MERGE) == "/a/"


TARGETS = [
    (b"/v1/../admin?x=/../y&z=%2e%2e", b"GET", b"/admin?x=/../y&z=%2e%2e", "/admin"),
    (b"/a?", b"GET", b"/a?", "/a"),
    (b"/?%2F", b"GET", b"/?%2F", "/"),  # the query is kept as is
    (b"*", b"OPTIONS", b"*", "*"),
]


@pytest.mark.parametrize(("raw", "method", "target", "path"), TARGETS)
def test_targets(raw: bytes, method: bytes, target: bytes, path: str) -> None:
    t = normalise_target(raw, method)
    assert (t.target, t.path, t.authority) == (target, path, None)


@pytest.mark.parametrize(
    "raw",
    [
        b"*",  # with GET
        b"/a?x#frag",
        b"/a?x=%00",
        b"/a?\x01",
        b"admin",
        b"example.com:443",  # authority-form
        b"http://api/x",  # absolute-form where the caller does not accept it
        b"/a\xff",
    ],
)
def test_refused_targets(raw: bytes) -> None:
    with pytest.raises(PathError):
        normalise_target(raw, b"GET")


def test_absolute_form_where_allowed() -> None:
    t = normalise_target(b"http://API:8080/v1/%2e%2e/x?q=1", b"GET", absolute_schemes=("http",))
    assert (t.target, t.path, t.authority) == (b"/x?q=1", "/x", "API:8080")
    t = normalise_target(b"HTTP://api", b"GET", absolute_schemes=("http",))
    assert (t.target, t.authority) == (b"/", "api")
    t = normalise_target(b"http://api?q", b"GET", absolute_schemes=("http",))
    assert t.target == b"/?q"
    for bad in (
        b"https://api/",
        b"http://user@api/",
        b"http:///x",
        b"http://api/a#b",
        b"http://a:b:c/",
        b"http://[::1/",
        b"http://a:123456/",
        b"http://api/..;/x",
        b"ftp://api/",
    ):
        with pytest.raises(PathError):
            normalise_target(bad, b"GET", absolute_schemes=("http",))


# --- properties --------------------------------------------------------------------------

_ALPHABET = "/./%2e%2E%2f%2F%5c%00%41%7e%25;..abc~-_:@!$&'()*+,=x{|}\"<>^` \\#?\t"
paths = st.text(alphabet=_ALPHABET, max_size=40).map(lambda s: "/" + s)
pieces = st.lists(
    st.sampled_from(
        [
            "/",
            ".",
            "..",
            "%2e",
            "%2E",
            "%2e%2e",
            "a",
            "%61",
            ";",
            "//",
            "%25",
            "%2f",
            "%5c",
            "%7B",
            "{",
            "~",
            "%7e",
            "%zz",
            "%",
        ]
    ),
    max_size=12,
).map(lambda xs: "/" + "".join(xs))
options = st.builds(PathOptions, st.booleans(), st.sampled_from(["reject", "keep"]))


def _ok(path: str, opts: PathOptions) -> str | None:
    try:
        return normalise_path(path, opts)
    except PathError:
        return None


@settings(max_examples=400)
@given(st.one_of(paths, pieces), options)
def test_properties(path: str, opts: PathOptions) -> None:
    out = _ok(path, opts)
    if out is None:
        return
    # idempotent
    assert normalise_path(out, opts) == out
    # starts with "/", no dot segment, nothing a client could still reinterpret
    assert out.startswith("/")
    segments = out.split("/")[1:]
    assert "." not in segments and ".." not in segments
    assert all(s.split(";", 1)[0] not in (".", "..") for s in segments)
    if opts.merge_slashes:
        assert "//" not in out
    # only unreserved characters are ever decoded: every escape left is well formed,
    # uppercase, and names a character that is not unreserved
    for hx in re.findall(r"%(..)", out):
        assert re.fullmatch("[0-9A-F]{2}", hx) and chr(int(hx, 16)) not in UNRESERVED
    assert not re.search(r"%(?![0-9A-F]{2})", out)
    assert all(0x21 <= ord(ch) < 0x7F and ch not in '#?\\"<>^`{|}[]' for ch in out)
    if opts.escaped_slashes == "reject":
        assert "%2F" not in out and "%5C" not in out
    assert "%00" not in out


@given(st.one_of(paths, pieces), options)
def test_never_decodes_into_a_reserved_character(path: str, opts: PathOptions) -> None:
    """Decoding creates no "/", "?", "#", "%", ";" that the client sent encoded."""
    out = _ok(path, opts)
    if out is None:
        return
    for ch in "/?#;":
        assert out.count(ch) <= path.count(ch)
    encoded_raw = sum(path.count(ch) for ch in '"<>^`{|}[]')  # these gain a "%"
    assert out.count("%") <= path.count("%") + encoded_raw


@given(
    st.one_of(paths, pieces).filter(lambda p: "?" not in p),
    st.text(alphabet="=&a%2F/.?", max_size=10),
    options,
)
def test_target_keeps_the_query(path: str, query: str, opts: PathOptions) -> None:
    try:
        t = normalise_target(f"{path}?{query}".encode("latin-1"), b"GET", opts)
    except PathError:
        return
    assert t.target == f"{t.path}?{query}".encode()
    assert t.path == normalise_path(path, opts)


@settings(max_examples=400)
@given(st.one_of(paths, pieces), options)
def test_the_fast_path_agrees_with_the_normaliser(path: str, opts: PathOptions) -> None:
    """normalise_target takes a regex shortcut for already-normal paths: same answer."""
    try:
        slow: str | None = normalise_path(path, opts)
    except PathError:
        slow = None
    try:
        fast: str | None = normalise_target(path.encode("latin-1"), b"GET", opts).path
    except PathError:
        fast = None
    if "?" not in path:
        assert fast == slow
