"""Forwarding headers for the edge and the sidecar: X-Forwarded-* and Envoy-style XFCC.

Theory of operation
-------------------
Client-sent forwarding headers are claims, not facts. :func:`forwarded_for` decides what is
true from the one fact the edge has (the peer address of the TCP connection) plus a
configured number of *trusted hops*: proxies in front of the edge (a cloud load balancer,
say) whose own X-Forwarded-For entries are believed.

The hop chain is ``X-Forwarded-For entries (left to right) + [peer]``. With ``trusted_hops
= N`` the last N elements are trusted proxies, so the client is the element just left of
them: ``chain[-(N + 1)]``. Entries further left were written by the client (or by proxies
we do not know) and are dropped. When the rightmost N entries are not all IP addresses
(fewer than N entries, or one that is not an address: a trusted proxy writes neither), the
chain did not come through the trusted proxies as configured and nothing in it is
believed: the client is the peer, as with Envoy's ``xff_num_trusted_hops`` (never an
entry the client could have written). With the default ``N = 0`` every client-sent value
is ignored: the client is the peer and the new X-Forwarded-For is just the peer address.
X-Forwarded-Proto and -Host are taken from the trusted proxy nearest to the client only
when N > 0, the chain is complete, and the client-sent value is a single well-formed
value; otherwise from the edge's own connection (scheme, Host header).

:func:`apply_forwarded` removes every client-sent ``X-Forwarded-For/-Proto/-Host``,
``Forwarded`` (RFC 7239, never produced or verified by meshcar) and
``X-Forwarded-Client-Cert`` header and appends meshcar's own. Headers are the
``list[tuple[bytes, bytes]]`` used by :mod:`meshcar.proto.http1`.

XFCC (``X-Forwarded-Client-Cert``) follows Envoy's format: one element per hop, elements
separated by ``,``, ``key=value`` pairs separated by ``;``, keys ``By`` (our own SPIFFE
ID), ``Hash`` (hex SHA-256 of the peer certificate's DER), ``URI`` (the peer's SPIFFE ID),
``DNS``, ``Subject``. A value containing ``,``, ``;``, ``=`` or ``"`` is double-quoted,
with ``"`` and ``\\`` escaped by a backslash. Control characters are refused (a value
must never be able to inject a header). :func:`parse_xfcc` reads the format back.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ForwardedFor",
    "Headers",
    "XfccElement",
    "apply_forwarded",
    "encode_xfcc",
    "forwarded_for",
    "parse_xfcc",
    "xfcc_element",
]

Headers = list[tuple[bytes, bytes]]

XFF = b"x-forwarded-for"
XFP = b"x-forwarded-proto"
XFH = b"x-forwarded-host"
XFCC = b"x-forwarded-client-cert"
FORWARDED = b"forwarded"
STRIPPED = frozenset({XFF, XFP, XFH, XFCC, FORWARDED})

_SCHEMES = ("http", "https")
_HOST = re.compile(r"\A(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::[0-9]{1,5})?\Z")


@dataclass(frozen=True)
class ForwardedFor:
    """What the edge believes about the client, and the headers it will send on."""

    client_ip: str
    proto: str
    host: str | None
    chain: tuple[str, ...]  # the new X-Forwarded-For, client first

    @property
    def xff(self) -> str:
        return ", ".join(self.chain)


def _values(headers: Headers, name: bytes) -> list[str]:
    """All comma-separated values of a header (over repeated lines), stripped."""
    out: list[str] = []
    for key, value in headers:
        if key.lower() == name:
            text = value.decode("latin-1")
            out.extend(part.strip() for part in text.split(","))
    return out


def _ip_of(entry: str) -> str | None:
    """Normalise an X-Forwarded-For entry (IP, IP:port or [IPv6]:port) to an IP, or None."""
    candidate = entry
    if candidate.startswith("["):
        end = candidate.find("]")
        if end < 0 or (end + 1 < len(candidate) and not candidate[end + 1 :].startswith(":")):
            return None
        candidate = candidate[1:end]
    elif candidate.count(":") == 1:
        candidate = candidate.split(":", 1)[0]
    if "%" in candidate:
        return None
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return None


def forwarded_for(
    headers: Headers,
    *,
    peer_ip: str,
    scheme: str,
    host: str | None,
    trusted_hops: int = 0,
) -> ForwardedFor:
    """Decide the client address, scheme and host of a request (see the module docstring).

    ``peer_ip`` is the TCP peer of the connection, ``scheme`` the edge's own ("https" on the
    TLS listener), ``host`` the request's Host header as the edge validated it.
    """
    if trusted_hops < 0:
        raise ValueError("trusted_hops must be >= 0")
    if scheme not in _SCHEMES:
        raise ValueError(f"scheme must be http or https, not {scheme!r}")
    peer = _ip_of(peer_ip)
    if peer is None:
        raise ValueError(f"peer address {peer_ip!r} is not an IP address")
    if trusted_hops:
        return _through_trusted_hops(headers, peer, scheme, host, trusted_hops)
    return ForwardedFor(client_ip=peer, proto=scheme, host=host, chain=(peer,))


def _through_trusted_hops(
    headers: Headers, peer: str, scheme: str, host: str | None, trusted_hops: int
) -> ForwardedFor:
    """forwarded_for behind `trusted_hops` proxies: their X-Forwarded-* count only when the
    last `trusted_hops` X-Forwarded-For entries are all IP addresses."""
    chain = [peer]
    claimed = [e for e in _values(headers, XFF) if e]
    trusted = [_ip_of(e) for e in claimed[-trusted_hops:]]
    if len(trusted) == trusted_hops and all(trusted):
        chain = [ip for ip in trusted if ip] + chain
    proto, fwd_host = scheme, host
    if len(chain) > 1:  # the chain is complete
        protos = _values(headers, XFP)
        if len(protos) == 1 and protos[0].lower() in _SCHEMES:
            proto = protos[0].lower()
        hosts = _values(headers, XFH)
        if len(hosts) == 1 and _HOST.match(hosts[0]):
            fwd_host = hosts[0]
    return ForwardedFor(client_ip=chain[0], proto=proto, host=fwd_host, chain=tuple(chain))


def apply_forwarded(
    headers: Headers,
    fwd: ForwardedFor,
    *,
    xfcc: str | None = None,
) -> Headers:
    """Headers without any client-sent forwarding/XFCC header, plus meshcar's own."""
    out = [(k, v) for k, v in headers if k.lower() not in STRIPPED]
    out.append((b"X-Forwarded-For", fwd.xff.encode("ascii")))
    out.append((b"X-Forwarded-Proto", fwd.proto.encode("ascii")))
    if fwd.host is not None:
        _check_value(fwd.host)
        out.append((b"X-Forwarded-Host", fwd.host.encode("latin-1")))
    if xfcc is not None:
        _check_value(xfcc)
        out.append((b"X-Forwarded-Client-Cert", xfcc.encode("latin-1")))
    return out


# --- XFCC --------------------------------------------------------------------------------

XfccElement = tuple[tuple[str, str], ...]

_XFCC_KEYS = ("By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS")
_NEEDS_QUOTES = frozenset(',;="')


def _check_value(value: str) -> None:
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError("control character in a header value")
    if not value.isascii() and any(ord(ch) > 0xFF for ch in value):
        raise ValueError("header value is not latin-1")


def _quote(value: str) -> str:
    _check_value(value)
    if any(ch in _NEEDS_QUOTES for ch in value) or value != value.strip():
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def xfcc_element(
    *,
    by: str | None = None,
    cert_der: bytes | None = None,
    uri: str | None = None,
    dns: Iterable[str] = (),
    subject: str | None = None,
) -> XfccElement:
    """One hop's XFCC element, keys in Envoy's order: By, Hash, Subject, URI, DNS."""
    pairs: list[tuple[str, str]] = []
    if by is not None:
        pairs.append(("By", by))
    if cert_der is not None:
        pairs.append(("Hash", hashlib.sha256(cert_der).hexdigest()))
    if subject is not None:
        pairs.append(("Subject", subject))
    if uri is not None:
        pairs.append(("URI", uri))
    pairs.extend(("DNS", name) for name in dns)
    return tuple(pairs)


def encode_xfcc(elements: Iterable[XfccElement]) -> str:
    """``By=...;Hash=...;URI=...[,next hop...]`` with values quoted where needed."""
    parts = []
    for element in elements:
        if not element:
            raise ValueError("empty XFCC element")
        for key, _ in element:
            if key not in _XFCC_KEYS:
                raise ValueError(f"unknown XFCC key {key!r}")
        parts.append(";".join(f"{key}={_quote(value)}" for key, value in element))
    return ",".join(parts)


def _xfcc_quoted(value: str, i: int) -> tuple[str, int]:
    """A quoted XFCC value whose text starts at ``i``: (the text, where it ends)."""
    n = len(value)
    buf = []
    while True:
        if i >= n:
            raise ValueError("unterminated quoted XFCC value")
        ch = value[i]
        if ch == "\\":
            if i + 1 >= n:
                raise ValueError("dangling escape in XFCC value")
            buf.append(value[i + 1])
            i += 2
        elif ch == '"':
            i += 1
            break
        else:
            buf.append(ch)
            i += 1
    if i < n and value[i] not in ",;":
        raise ValueError("garbage after quoted XFCC value")
    return "".join(buf), i


def _xfcc_token(value: str, i: int) -> tuple[str, int]:
    """An unquoted XFCC value starting at ``i``: (the text, where it ends)."""
    n = len(value)
    end = i
    while end < n and value[end] not in ",;":
        if value[end] in '="':
            raise ValueError("unquoted XFCC value contains a reserved character")
        end += 1
    return value[i:end], end


def parse_xfcc(value: str) -> tuple[XfccElement, ...]:
    """Parse an XFCC header value; raises ValueError when it is malformed."""
    elements: list[XfccElement] = []
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(value)
    while True:
        eq = value.find("=", i)
        if eq < 0:
            raise ValueError("XFCC pair without '='")
        key = value[i:eq].strip()
        if key not in _XFCC_KEYS:
            raise ValueError(f"unknown XFCC key {key!r}")
        i = eq + 1
        if i < n and value[i] == '"':
            text, i = _xfcc_quoted(value, i + 1)
        else:
            text, i = _xfcc_token(value, i)
        pairs.append((key, text))
        if i >= n:
            elements.append(tuple(pairs))
            return tuple(elements)
        if value[i] == ",":
            elements.append(tuple(pairs))
            pairs = []
        i += 1
