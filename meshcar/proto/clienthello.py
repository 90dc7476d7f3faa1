"""Peek a TLS ClientHello (SNI, ALPN, versions) from raw bytes, without decrypting.

Theory of operation
-------------------
The edge must decide where a TLS connection goes (terminate, bridge, passthrough) before
any TLS library has touched it, so it reads the first bytes off the socket and asks this
module what they contain. The module is sans-IO: it never reads or writes anything, it is
handed *all bytes received so far* and answers with one of three values:

* :class:`Incomplete` -- the bytes so far are a valid beginning of a ClientHello; call again
  once more bytes have arrived (``at_least`` is a lower bound on how many more are needed);
* :class:`ClientHello` -- the whole hello has been received and parsed;
* :class:`Rejected` -- the bytes are not a TLS ClientHello, are malformed, or too large.

The parser is a pure function of its input, so callers simply re-run it on the growing
buffer; a hello is at most a few KiB, so re-parsing costs nothing worth optimising. Two
layers of framing are undone:

1. TLS records (RFC 8446 section 5.1): 5-byte headers ``type(1) version(2) length(2)``. Only
   handshake records (type 22) may carry the hello, and a handshake message may be split
   over several records; records of any other type before the hello is complete are an
   error (the RFC forbids interleaving).
2. The handshake message ``msg_type(1) length(3) body`` with msg_type 1 (client_hello).

Every length is checked against the bytes that actually remain before it is used, so no
read ever runs past a bound: the body is walked with an integer cursor ``p`` and the end
``end`` of the enclosing structure (the body, an extension, a list), and each field is read
only after checking that it ends at or before ``end``. Header fields are validated as soon
as they arrive (the first byte of plain HTTP is rejected at once), and the function is
*prefix-monotone*: any prefix of a valid hello yields ``Incomplete``, never ``Rejected``,
and the result for a complete hello does not depend on how its bytes were split into reads
or records.

Limits: the handshake body may be at most ``max_size`` bytes (16 KiB by default) and may be
spread over at most ``max_records`` records (16), so at most about 16.5 KiB is ever peeked.

The hello body (RFC 8446 section 4.1.2, RFC 5246 section 7.4.1.2) is parsed strictly:
session id <= 32 bytes, a non-empty even-length cipher list, at least one compression
method, then extensions (optional before TLS 1.3) with no trailing bytes and no duplicate
extension types. Three extensions are decoded: server_name (RFC 6066: exactly one entry, of
type host_name, a valid DNS name, returned lower-cased (an IP literal counts as no SNI);
trailing dots, bad labels and undecodable ``xn--`` labels are rejected), ALPN (RFC 7301:
non-empty names) and supported_versions (RFC 8446). The SSLv2-compatible hello format is
rejected.

Staying fast
------------
The edge parses a hello on every new TLS connection, so the parser avoids per-field Python
calls and copies; a typical 200-500 byte hello parses in 6-11 us on CPython 3.11 (30-55 us
with the earlier reader-object version; figures in ``docs/PARSER.md``):

* no copy while the hello sits in one record (the usual case): the body is parsed in place
  in the input ``bytes``; only a hello split over records is joined into a new buffer;
* no reader object and no per-field function calls: fields are read with plain indexing
  and ``struct`` on ``(bytes, offset)``; the cipher-suite and version lists are each
  decoded by one ``struct.unpack_from`` call, extension headers by one call each;
* error messages are formatted only once a check has failed (``_short`` and friends build
  the exception), never on the success path;
* host names are checked by one regular expression over the whole name, and ``ipaddress``
  is consulted only for a name that failed it (to tell an IP literal from garbage).

The results, including every ``Rejected`` reason, are the same as those of the earlier
reader-object implementation (checked by a differential fuzz run when this was rewritten).
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from dataclasses import dataclass

__all__ = [
    "ClientHello",
    "ClientHelloResult",
    "Incomplete",
    "Rejected",
    "RejectKind",
    "MAX_HELLO_SIZE",
    "MAX_RECORDS",
    "is_probably_tls",
    "parse_client_hello",
    "validate_hostname",
]

RECORD_HEADER = 5
HANDSHAKE_HEADER = 4
CONTENT_TYPE_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
MAX_RECORD_PAYLOAD = 1 << 14
MAX_HELLO_SIZE = 16 * 1024
MAX_RECORDS = 16

EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43
SNI_HOST_NAME = 0

_U16_PAIR = struct.Struct(">HH").unpack_from  # (buffer, offset) -> two big-endian u16


class RejectKind(enum.Enum):
    """Why bytes were rejected."""

    NOT_TLS = "not_tls"  # the bytes are not a TLS handshake record at all
    MALFORMED = "malformed"  # TLS framing, but a length or field is invalid
    TOO_LARGE = "too_large"  # over max_size / max_records


@dataclass(frozen=True)
class Incomplete:
    """The bytes so far are a valid prefix; at least ``at_least`` more bytes are needed."""

    at_least: int


@dataclass(frozen=True)
class Rejected:
    """The bytes are not (or cannot become) a valid ClientHello."""

    kind: RejectKind
    reason: str


@dataclass(frozen=True)
class ClientHello:
    """A parsed ClientHello.

    ``consumed`` is the number of input bytes up to the end of the last record carrying the
    hello (the caller replays every peeked byte to the next hop anyway).
    """

    sni: str | None
    alpn: tuple[str, ...]
    legacy_version: int
    record_version: int
    supported_versions: tuple[int, ...]
    cipher_suites: tuple[int, ...]
    extension_types: tuple[int, ...]
    session_id: bytes
    consumed: int
    records: int

    @property
    def offers_tls13(self) -> bool:
        """True when the client offers TLS 1.3 (via supported_versions)."""
        return 0x0304 in self.supported_versions

    @property
    def max_version(self) -> int:
        """Highest non-GREASE version offered (supported_versions, else legacy_version)."""
        real = [v for v in self.supported_versions if not _is_grease(v)]
        return max(real) if real else self.legacy_version


ClientHelloResult = Incomplete | ClientHello | Rejected


class _Malformed(Exception):
    """Internal: raised inside body parsing, turned into ``Rejected`` at the boundary."""


def _is_grease(value: int) -> bool:
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


def is_probably_tls(first_bytes: bytes) -> bool:
    """Whether a connection's first bytes look like the start of a TLS handshake record.

    Meant for protocol detection (TLS vs plain HTTP on one port): checks only what has
    arrived (content type 22, then major version 3, then minor version <= 4). An empty
    input is not TLS. One byte (0x16) is enough for a guess: no HTTP method starts with it.
    """
    if not first_bytes:
        return False
    if first_bytes[0] != CONTENT_TYPE_HANDSHAKE:
        return False
    if len(first_bytes) >= 2 and first_bytes[1] != 3:
        return False
    return not (len(first_bytes) >= 3 and first_bytes[2] > 4)


def _record_header(
    buf: bytes, pos: int, n: int, records: int, max_records: int
) -> Incomplete | Rejected | tuple[int, int]:
    """The next record header at ``pos``: (version, length), or why parsing stops here."""
    left = n - pos
    if left < 1:
        return Incomplete(RECORD_HEADER)
    ctype = buf[pos]
    if ctype != CONTENT_TYPE_HANDSHAKE:
        return _not_handshake(ctype, records)
    if left >= 2 and buf[pos + 1] != 3:
        kind = RejectKind.NOT_TLS if records == 0 else RejectKind.MALFORMED
        return Rejected(kind, f"record major version {buf[pos + 1]} is not 3")
    if left >= 3 and buf[pos + 2] > 4:
        kind = RejectKind.NOT_TLS if records == 0 else RejectKind.MALFORMED
        return Rejected(kind, f"record minor version {buf[pos + 2]} is unknown")
    if left < RECORD_HEADER:
        return Incomplete(RECORD_HEADER - left)
    version, length = _U16_PAIR(buf, pos + 1)
    if length == 0:
        return Rejected(RejectKind.MALFORMED, "empty handshake record")
    if length > MAX_RECORD_PAYLOAD:
        return Rejected(RejectKind.MALFORMED, f"record length {length} exceeds 2^14")
    if records + 1 > max_records:
        return Rejected(
            RejectKind.TOO_LARGE, f"ClientHello spread over more than {max_records} records"
        )
    return version, length


def _not_handshake(ctype: int, records: int) -> Rejected:
    if records == 0:
        if ctype & 0x80:
            return Rejected(RejectKind.NOT_TLS, "SSLv2-format hello is not supported")
        return Rejected(RejectKind.NOT_TLS, f"first byte 0x{ctype:02x} is not a TLS handshake")
    return Rejected(
        RejectKind.MALFORMED,
        f"record of type {ctype} interleaved with the ClientHello",
    )


def _handshake_problem(
    hs: bytes | bytearray, hs_start: int, hs_len: int, hello_len: int, max_size: int
) -> Rejected | None:
    """What is wrong with the handshake bytes so far (type, announced size, trailing data)."""
    if hs_len >= 1 and hs[hs_start] != HANDSHAKE_CLIENT_HELLO:
        return Rejected(RejectKind.MALFORMED, f"handshake type {hs[hs_start]} is not client_hello")
    if hello_len > max_size:
        return Rejected(
            RejectKind.TOO_LARGE, f"ClientHello of {hello_len} bytes exceeds {max_size}"
        )
    if hello_len >= 0 and hs_len > HANDSHAKE_HEADER + hello_len:
        return Rejected(RejectKind.MALFORMED, "trailing handshake data after the ClientHello")
    return None


def parse_client_hello(
    data: bytes | bytearray | memoryview,
    *,
    max_size: int = MAX_HELLO_SIZE,
    max_records: int = MAX_RECORDS,
) -> ClientHelloResult:
    """Parse a ClientHello from all bytes received so far. Never raises on any input."""
    buf = data if type(data) is bytes else bytes(data)
    n = len(buf)
    pos = 0
    records = 0
    record_version = 0
    hello_len = -1  # body length, once the 4-byte handshake header is in
    # The handshake bytes so far are hs[hs_start : hs_start + hs_len]. While they sit in
    # one record, hs is the input itself (no copy); from the second record on, a bytearray.
    hs: bytes | bytearray = buf
    hs_start = 0
    hs_len = 0

    while True:
        # --- record header -----------------------------------------------------------
        head = _record_header(buf, pos, n, records, max_records)
        if type(head) is not tuple:
            return head  # type: ignore[return-value]
        version, length = head
        records += 1
        pos += RECORD_HEADER

        # --- record payload: validate the handshake header as soon as it arrives -------
        avail = min(length, n - pos)
        if records == 1:
            record_version = version
            hs_start = pos
            hs_len = avail
        else:
            if records == 2:
                hs = bytearray(hs[hs_start : hs_start + hs_len])
                hs_start = 0
            hs += buf[pos : pos + avail]
            hs_len += avail
        if hello_len < 0 and hs_len >= HANDSHAKE_HEADER:
            hello_len = (hs[hs_start + 1] << 16) | (hs[hs_start + 2] << 8) | hs[hs_start + 3]
        problem = _handshake_problem(hs, hs_start, hs_len, hello_len, max_size)
        if problem is not None:
            return problem
        if avail < length:
            return Incomplete(length - avail)
        pos += length
        if hello_len >= 0 and hs_len == HANDSHAKE_HEADER + hello_len:
            break

    # one record: parse in place; several: freeze the joined copy, so slices are ``bytes``
    body = buf if records == 1 else bytes(hs)
    try:
        return _parse_body(
            body,
            hs_start + HANDSHAKE_HEADER,
            hs_start + hs_len,
            record_version=record_version,
            consumed=pos,
            records=records,
        )
    except _Malformed as exc:
        return Rejected(RejectKind.MALFORMED, str(exc))


# Body parsing works on ``(b, p, end)``: the bytes, a cursor and the end of the enclosing
# structure. Every read is preceded by a check that it ends at or before ``end``; the error
# messages are built only once a check has failed.


def _short(what: str, count: int, left: int) -> _Malformed:
    return _Malformed(f"{what}: needs {count} bytes, {left} left")


def _out_of_range(what: str, length: int) -> _Malformed:
    return _Malformed(f"{what}: length {length} out of range")


def _trailing(what: str, count: int) -> _Malformed:
    return _Malformed(f"{what}: {count} trailing bytes")


def _vector(b: bytes, p: int, end: int, width: int, what: str, lo: int, hi: int) -> tuple[int, int]:
    """Read the ``width``-byte length of a vector at ``p``: (where its contents start, its
    length), the length checked against ``lo..hi`` and against ``end``."""
    if end - p < width:
        raise _short(f"{what} length", width, end - p)
    k = b[p] if width == 1 else (b[p] << 8) | b[p + 1]
    p += width
    if k < lo or k > hi:
        raise _out_of_range(what, k)
    if end - p < k:
        raise _short(what, k, end - p)
    return p, k


def _parse_body(
    b: bytes, p: int, end: int, *, record_version: int, consumed: int, records: int
) -> ClientHello:
    if end - p < 2:
        raise _short("legacy_version", 2, end - p)
    legacy_version = (b[p] << 8) | b[p + 1]
    if legacy_version >> 8 != 3:
        raise _Malformed(f"legacy_version 0x{legacy_version:04x} is not TLS")
    p += 2
    if end - p < 32:
        raise _short("random", 32, end - p)
    p += 32

    p, k = _vector(b, p, end, 1, "legacy_session_id", 0, 32)
    session_id = b[p : p + k]
    p += k

    # cipher_suites<2..2^16-2>: one unpack for the whole list
    p, k = _vector(b, p, end, 2, "cipher_suites", 2, 0xFFFF)
    if k & 1:
        raise _Malformed("cipher_suites: odd length")
    cipher_suites: tuple[int, ...] = struct.unpack_from(f">{k >> 1}H", b, p)
    p += k

    p, k = _vector(b, p, end, 1, "legacy_compression_methods", 1, 0xFF)
    p += k

    sni: str | None = None
    alpn: tuple[str, ...] = ()
    supported_versions: tuple[int, ...] = ()
    ext_types: list[int] = []
    if p < end:  # extensions are optional before TLS 1.3
        sni, alpn, supported_versions = _parse_extensions(b, p, end, ext_types)
    return ClientHello(
        sni=sni,
        alpn=alpn,
        legacy_version=legacy_version,
        record_version=record_version,
        supported_versions=supported_versions,
        cipher_suites=cipher_suites,
        extension_types=tuple(ext_types),
        session_id=session_id,
        consumed=consumed,
        records=records,
    )


def _parse_extensions(
    b: bytes, p: int, end: int, ext_types: list[int]
) -> tuple[str | None, tuple[str, ...], tuple[int, ...]]:
    """The extensions block: (sni, alpn, supported_versions); every type seen goes to ``ext_types``."""
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    supported_versions: tuple[int, ...] = ()
    p, k = _vector(b, p, end, 2, "extensions", 0, 0xFFFF)
    if end - p > k:
        raise _trailing("ClientHello", end - p - k)
    seen: set[int] = set()
    while p < end:
        ext_type, ext_end = _extension_header(b, p, end)
        p += 4
        if ext_type in seen:
            raise _Malformed(f"duplicate extension {ext_type}")
        seen.add(ext_type)
        ext_types.append(ext_type)
        if ext_type == EXT_SERVER_NAME:
            sni = _parse_sni(b, p, ext_end)
        elif ext_type == EXT_ALPN:
            alpn = _parse_alpn(b, p, ext_end)
        elif ext_type == EXT_SUPPORTED_VERSIONS:
            supported_versions = _parse_supported_versions(b, p, ext_end)
        p = ext_end
    return sni, alpn, supported_versions


def _extension_header(b: bytes, p: int, end: int) -> tuple[int, int]:
    """An extension's type and where its data ends (its data starts at ``p + 4``)."""
    if end - p < 4:
        if end - p < 2:
            raise _short("extension type", 2, end - p)
        ext_type = (b[p] << 8) | b[p + 1]
        raise _short(f"extension {ext_type} length", 2, end - p - 2)
    ext_type, k = _U16_PAIR(b, p)
    ext_end = p + 4 + k
    if ext_end > end:
        raise _short(f"extension {ext_type}", k, end - p - 4)
    return ext_type, ext_end


def _parse_sni(b: bytes, p: int, end: int) -> str | None:
    # server_name_list<1..2^16-1>, filling the extension
    p, k = _vector(b, p, end, 2, "server_name_list", 1, 0xFFFF)
    if end - p > k:
        raise _trailing("server_name extension", end - p - k)
    name_type = b[p]
    p += 1
    if name_type != SNI_HOST_NAME:
        raise _Malformed(f"server_name type {name_type} is not host_name")
    # host_name<1..2^16-1>, the list's only entry
    p, k = _vector(b, p, end, 2, "host_name", 1, 0xFFFF)
    if p + k != end:
        raise _Malformed("server_name_list must hold exactly one host_name")
    raw = b[p:end]
    host = validate_hostname(raw)
    if host is None:
        if _is_ip_literal(raw):
            # RFC 6066 forbids IP literals here, but real clients (wrk, some SDKs) send them:
            # treat the hello as one without SNI (the default route, if any, applies).
            return None
        raise _Malformed("server_name is not a valid DNS host name")
    return host


def _is_ip_literal(raw: bytes) -> bool:
    try:
        ipaddress.ip_address(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def _parse_alpn(b: bytes, p: int, end: int) -> tuple[str, ...]:
    # protocol_name_list<2..2^16-1>, filling the extension, of protocol_name<1..2^8-1>
    p, k = _vector(b, p, end, 2, "protocol_name_list", 2, 0xFFFF)
    if end - p > k:
        raise _trailing("ALPN extension", end - p - k)
    out = []
    while p < end:
        p, k = _vector(b, p, end, 1, "protocol_name", 1, 0xFF)
        out.append(b[p : p + k].decode("latin-1"))
        p += k
    return tuple(out)


def _parse_supported_versions(b: bytes, p: int, end: int) -> tuple[int, ...]:
    # versions<2..254>, filling the extension
    p, k = _vector(b, p, end, 1, "supported_versions", 2, 254)
    if end - p > k:
        raise _trailing("supported_versions extension", end - p - k)
    if k & 1:
        raise _Malformed("supported_versions: odd length")
    versions: tuple[int, ...] = struct.unpack_from(f">{k >> 1}H", b, p)
    return versions


_LABEL = rb"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rb"\A%s(?:\.%s)*\Z" % (_LABEL, _LABEL))  # dot-separated labels


def validate_hostname(raw: bytes) -> str | None:
    """Return ``raw`` as a lower-case DNS host name, or None when it is not a valid one.

    Accepts LDH labels (plus ``_``) of 1-63 bytes, at most 253 bytes in all, no trailing
    dot, no IP literal; an ``xn--`` label must be well-formed Punycode that decodes to
    non-ASCII text and encodes back to the same label.
    """
    if not raw or len(raw) > 253:
        return None
    host = raw.lower()
    if not _HOSTNAME.match(host):
        return None
    if b"--" in host:
        for label in host.split(b"."):
            if label[2:4] == b"--" and not (label.startswith(b"xn--") and _valid_a_label(label)):
                return None  # "ab--" labels are reserved except valid IDNA A-labels
    if host.rpartition(b".")[2].isdigit():
        return None  # a TLD is never all-numeric; catches IPv4 literals like 10.0.0.1
    # No IP literal gets this far: an IPv4 address ends in an all-digit label and an IPv6
    # address contains ":", which no label may hold (so ``ipaddress`` is not consulted).
    return host.decode("ascii")


def _valid_a_label(label: bytes) -> bool:
    try:
        decoded = label[4:].decode("punycode")
    except (UnicodeError, ValueError, IndexError, OverflowError):
        return False
    if not decoded or decoded.isascii():
        return False
    if any(not ch.isprintable() or ch.isspace() or ch == "." for ch in decoded):
        return False
    try:
        return decoded.encode("punycode") == label[4:]
    except UnicodeError:
        return False
