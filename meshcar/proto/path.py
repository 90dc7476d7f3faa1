"""Request-target normalisation: the one place a request's path becomes what is matched.

Theory of operation
-------------------
Routing, WAF rules, rate-limit keys and authorization must all see the path the backend
will act on, and the backend must receive exactly the path that was matched. So every
listener (edge, sidecar inbound, outbound, transparent) calls :func:`normalise_target`
once per request, before any decision, and forwards its result.

For an origin-form target (``/path?query``), in this order:

1. Refused (400): a fragment (``#``: clients never send one; servers differ on it), NUL
   raw or as ``%00`` (anywhere in the target), any control character, space or byte
   outside ASCII, a raw ``\\``, a malformed percent-escape (``%4``, ``%zz``).
2. The query is kept byte for byte. In the path, each escape is decoded *once*, and only
   when it names an unreserved character (RFC 3986 2.3: ``A-Z a-z 0-9 - . _ ~``); every
   other escape keeps its encoding with its hex uppercased (RFC 3986 6.2.2.1). So
   ``%61dmin`` is ``admin``, ``%2e%2e`` is ``..``, and ``%252e`` stays ``%252e``.
   Characters RFC 3986 does not allow in a path (``" < > ^ ` { | } [ ]``) are
   percent-encoded.
3. Encoded ``/`` (``%2F``) and ``\\`` (``%5C``): refused by default (CVE-2021-29492:
   backends that decode them see other segments than the ones matched); with
   ``escaped_slashes: keep`` they stay encoded and are matched as ordinary characters.
4. Duplicate slashes are merged (``merge_slashes``, default on, as Envoy and nginx).
5. Dot segments are removed (RFC 3986 5.2.4); ``..`` never climbs above the root.
6. A dot segment carrying path parameters (``..;x``, ``.;x``, also after decoding) is
   refused: Tomcat and other servlet containers strip ``;params`` and treat ``/..;/`` as
   ``/../`` (the path traversal used against Tomcat behind a proxy), and no other server
   gives such a segment a meaning anyone relies on; refusing is the only choice that
   cannot disagree with the backend.

``*`` is accepted for OPTIONS only (RFC 9112 3.2.4). absolute-form (``http://host/p``) is
accepted only for the schemes the caller names (the sidecar outbound routes on
``http://``; the edge accepts both and checks the authority against Host); its path is
normalised the same way and the result is origin-form. Anything else (authority
form, a relative path) is 400.

The output of :func:`normalise_path` is a fixed point: normalising it again changes
nothing, it starts with ``/``, has no ``.`` or ``..`` segment, and never contains a
character that an escape was decoded into other than an unreserved one.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from meshcar.errors import ProtocolError

__all__ = [
    "ESCAPED_SLASH_ACTIONS",
    "PathError",
    "PathOptions",
    "Target",
    "normalise_path",
    "normalise_target",
]

ESCAPED_SLASH_ACTIONS = ("reject", "keep")

UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# pchar minus pct-encoded (RFC 3986 3.3), plus "/" between segments
_PATH_OK = UNRESERVED | frozenset("!$&'()*+,;=:@/")
# printable ASCII that a path may not carry raw; we encode them (browsers do the same)
_ENCODE = frozenset('"<>^`{|}[]')
_HEX = frozenset("0123456789abcdefABCDEF")
_SLASHES = ("2F", "5C")
_BAD = re.compile(r"[^\x21-\x7e]|#|%00")  # refused anywhere in a target
# A path that is already normal (the common case, checked in one regex): no escapes, no
# empty segment, no dot segment (also none with ;params), only characters a path may hold.
_NORMAL = re.compile(r"(?:/(?!\.\.?(?:[/;]|\Z))[A-Za-z0-9\-._~!$&'()*+,;=:@]+)*/?")
_AUTHORITY = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]{0,5})?")


class PathError(ProtocolError):
    """The request target cannot be normalised safely: answered 400."""

    def __init__(self, message: str) -> None:
        super().__init__(f"bad request target: {message}", 400)


@dataclass(frozen=True)
class PathOptions:
    merge_slashes: bool = True
    escaped_slashes: str = "reject"  # or "keep"

    def __post_init__(self) -> None:
        if self.escaped_slashes not in ESCAPED_SLASH_ACTIONS:
            raise ValueError(f"escaped_slashes must be one of {ESCAPED_SLASH_ACTIONS}")


DEFAULT = PathOptions()


@dataclass(frozen=True)
class Target:
    """A normalised request target."""

    target: bytes  # what is forwarded: origin-form path[?query], or b"*"
    path: str  # the normalised path alone: what routes and WAF rules match
    authority: str | None = None  # the host[:port] of an absolute-form target


def _check_chars(text: str) -> None:
    bad = _BAD.search(text)
    if bad is None:
        return
    found = bad.group()
    if found == "\x00":
        raise PathError("NUL character")
    if found == "#":
        raise PathError("fragment (#) in a request target")
    if found == "%00":
        raise PathError("encoded NUL (%00)")
    raise PathError(f"character {found!r} is not allowed in a request target")


def _escape(hx: str, opts: PathOptions) -> str:
    """One percent-escape's two characters: decoded if unreserved, else canonical (%XX)."""
    if len(hx) != 2 or not all(h in _HEX for h in hx):
        raise PathError("malformed percent-escape")
    hx = hx.upper()
    decoded = chr(int(hx, 16))
    if decoded in UNRESERVED:
        return decoded
    if hx == "00":
        raise PathError("encoded NUL (%00)")
    if hx in _SLASHES and opts.escaped_slashes == "reject":
        raise PathError(f"encoded {'/' if hx == '2F' else chr(92)} (%{hx}) in the path")
    return "%" + hx


def _char(ch: str) -> str:
    """One literal path character, percent-encoded where the normal form wants it."""
    if ch == "\\":
        raise PathError("backslash in the path")
    if ch in _ENCODE:
        return f"%{ord(ch):02X}"
    if ch in _PATH_OK:
        return ch
    raise PathError(
        f"character {ch!r} is not allowed in a path"
    )  # _check_chars let only printable ASCII through


def _segment(seg: str, opts: PathOptions) -> str:
    """One path segment with escapes decoded (unreserved only) or canonicalised."""
    if "%" not in seg and all(ch in _PATH_OK for ch in seg):
        return seg
    out: list[str] = []
    i, n = 0, len(seg)
    while i < n:
        if seg[i] == "%":
            out.append(_escape(seg[i + 1 : i + 3], opts))
            i += 3
        else:
            out.append(_char(seg[i]))
            i += 1
    return "".join(out)


def _check_dot_params(seg: str) -> None:
    if (
        seg[:1] == "."
        and seg.replace("%3B", ";").split(";", 1)[0] in (".", "..")
        and seg not in (".", "..")
    ):
        raise PathError("dot segment with path parameters (..;) in the path")


def normalise_path(path: str, opts: PathOptions = DEFAULT) -> str:
    """The normalised form of an absolute path (no query); raises PathError. Called only for
    paths that are not already normal (`_origin`'s fast path skips it)."""
    if not path.startswith("/"):
        raise PathError("the path must start with /")
    _check_chars(path)
    segments = [_segment(s, opts) for s in path[1:].split("/")]
    out: list[str] = []
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        _check_dot_params(seg)
        if seg == "":
            if opts.merge_slashes and i != last:
                continue
            out.append(seg)
        elif seg == "." or seg == "..":
            if seg == ".." and out:
                out.pop()
            if i == last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def _origin(target: str, opts: PathOptions) -> tuple[str, str]:
    path, sep, query = target.partition("?")
    if _NORMAL.fullmatch(path):  # its own normal form (test_path checks the two agree)
        return path, target
    norm = normalise_path(path, opts)
    return norm, norm + sep + query


def normalise_target(
    target: bytes,
    method: bytes,
    opts: PathOptions = DEFAULT,
    *,
    absolute_schemes: tuple[str, ...] = (),
) -> Target:
    """Normalise a request target once, before any decision (see the module docstring)."""
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise PathError("a byte outside ASCII in the request target") from None
    _check_chars(text)
    if text == "*":
        if method.upper() != b"OPTIONS":
            raise PathError("* is a request target for OPTIONS only")
        return Target(b"*", "*")
    if text.startswith("/"):
        path, out = _origin(text, opts)
        return Target(out.encode("ascii"), path)
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() in absolute_schemes:
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority, tail = rest[:cut], rest[cut:]
        if "@" in authority or not _AUTHORITY.fullmatch(authority):
            raise PathError("absolute-form target needs host[:port] (and no user information)")
        if not tail.startswith("/"):
            tail = "/" + tail
        path, out = _origin(tail, opts)
        return Target(out.encode("ascii"), path, authority)
    raise PathError("not an origin-form target (/path?query)")
