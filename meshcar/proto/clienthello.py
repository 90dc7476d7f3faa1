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
read ever runs past a bound; every slice is taken from a ``memoryview`` window whose end is
the enclosing structure's end. Header fields are validated as soon as they arrive (the
first byte of plain HTTP is rejected at once), and the function is *prefix-monotone*: any
prefix of a valid hello yields ``Incomplete``, never ``Rejected``, and the result for a
complete hello does not depend on how its bytes were split into reads or records.

Limits: the handshake body may be at most ``max_size`` bytes (16 KiB by default) and may be
spread over at most ``max_records`` records (16), so at most about 16.5 KiB is ever peeked.

The hello body (RFC 8446 section 4.1.2, RFC 5246 section 7.4.1.2) is parsed strictly:
session id <= 32 bytes, a non-empty even-length cipher list, at least one compression
method, then extensions (optional before TLS 1.3) with no trailing bytes and no duplicate
extension types. Three extensions are decoded: server_name (RFC 6066: exactly one entry, of
type host_name, a valid DNS name, returned lower-cased (an IP literal counts as no SNI); trailing dots, bad
labels and undecodable ``xn--`` labels are rejected), ALPN (RFC 7301: non-empty names) and
supported_versions (RFC 8446). The SSLv2-compatible hello format is rejected.
"""

from __future__ import annotations

import enum
import ipaddress
import re
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


def parse_client_hello(
    data: bytes | bytearray | memoryview,
    *,
    max_size: int = MAX_HELLO_SIZE,
    max_records: int = MAX_RECORDS,
) -> ClientHelloResult:
    """Parse a ClientHello from all bytes received so far. Never raises on any input."""
    buf = memoryview(bytes(data))
    n = len(buf)
    handshake = bytearray()
    pos = 0
    records = 0
    record_version = 0
    hello_len: int | None = None  # body length, once the 4-byte handshake header is in

    while True:
        # --- record header -----------------------------------------------------------
        if n - pos < 1:
            return Incomplete(RECORD_HEADER)
        ctype = buf[pos]
        if ctype != CONTENT_TYPE_HANDSHAKE:
            if records == 0:
                if ctype & 0x80:
                    return Rejected(RejectKind.NOT_TLS, "SSLv2-format hello is not supported")
                return Rejected(
                    RejectKind.NOT_TLS, f"first byte 0x{ctype:02x} is not a TLS handshake"
                )
            return Rejected(
                RejectKind.MALFORMED,
                f"record of type {ctype} interleaved with the ClientHello",
            )
        if n - pos >= 2 and buf[pos + 1] != 3:
            kind = RejectKind.NOT_TLS if records == 0 else RejectKind.MALFORMED
            return Rejected(kind, f"record major version {buf[pos + 1]} is not 3")
        if n - pos >= 3 and buf[pos + 2] > 4:
            kind = RejectKind.NOT_TLS if records == 0 else RejectKind.MALFORMED
            return Rejected(kind, f"record minor version {buf[pos + 2]} is unknown")
        if n - pos < RECORD_HEADER:
            return Incomplete(RECORD_HEADER - (n - pos))
        version = (buf[pos + 1] << 8) | buf[pos + 2]
        length = (buf[pos + 3] << 8) | buf[pos + 4]
        if length == 0:
            return Rejected(RejectKind.MALFORMED, "empty handshake record")
        if length > MAX_RECORD_PAYLOAD:
            return Rejected(RejectKind.MALFORMED, f"record length {length} exceeds 2^14")
        records += 1
        if records > max_records:
            return Rejected(
                RejectKind.TOO_LARGE, f"ClientHello spread over more than {max_records} records"
            )
        if records == 1:
            record_version = version
        pos += RECORD_HEADER

        # --- record payload: validate the handshake header as soon as it arrives -------
        avail = min(length, n - pos)
        handshake += buf[pos : pos + avail]
        if len(handshake) >= 1 and handshake[0] != HANDSHAKE_CLIENT_HELLO:
            return Rejected(
                RejectKind.MALFORMED, f"handshake type {handshake[0]} is not client_hello"
            )
        if hello_len is None and len(handshake) >= HANDSHAKE_HEADER:
            hello_len = int.from_bytes(handshake[1:4], "big")
            if hello_len > max_size:
                return Rejected(
                    RejectKind.TOO_LARGE, f"ClientHello of {hello_len} bytes exceeds {max_size}"
                )
        if hello_len is not None and len(handshake) > HANDSHAKE_HEADER + hello_len:
            return Rejected(RejectKind.MALFORMED, "trailing handshake data after the ClientHello")
        if avail < length:
            return Incomplete(length - avail)
        pos += length
        if hello_len is not None and len(handshake) == HANDSHAKE_HEADER + hello_len:
            break

    try:
        return _parse_body(
            memoryview(bytes(handshake))[HANDSHAKE_HEADER:],
            record_version=record_version,
            consumed=pos,
            records=records,
        )
    except _Malformed as exc:
        return Rejected(RejectKind.MALFORMED, str(exc))


class _Reader:
    """Bounds-checked cursor over a window of bytes."""

    __slots__ = ("_buf", "_pos")

    def __init__(self, buf: memoryview) -> None:
        self._buf = buf
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._buf) - self._pos

    def take(self, count: int, what: str) -> memoryview:
        if count > self.remaining:
            raise _Malformed(f"{what}: needs {count} bytes, {self.remaining} left")
        out = self._buf[self._pos : self._pos + count]
        self._pos += count
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        b = self.take(2, what)
        return (b[0] << 8) | b[1]

    def vector(
        self, len_bytes: int, what: str, *, min_len: int = 0, max_len: int | None = None
    ) -> _Reader:
        raw = self.take(len_bytes, what + " length")
        length = int.from_bytes(raw, "big")
        if length < min_len or (max_len is not None and length > max_len):
            raise _Malformed(f"{what}: length {length} out of range")
        return _Reader(self.take(length, what))

    def take_all(self) -> memoryview:
        return self.take(self.remaining, "rest")

    def end(self, what: str) -> None:
        if self.remaining:
            raise _Malformed(f"{what}: {self.remaining} trailing bytes")


def _parse_body(
    body: memoryview, *, record_version: int, consumed: int, records: int
) -> ClientHello:
    r = _Reader(body)
    legacy_version = r.u16("legacy_version")
    if legacy_version >> 8 != 3:
        raise _Malformed(f"legacy_version 0x{legacy_version:04x} is not TLS")
    r.take(32, "random")
    session_id = bytes(r.vector(1, "legacy_session_id", max_len=32).take_all())
    suites_r = r.vector(2, "cipher_suites", min_len=2)
    if suites_r.remaining % 2:
        raise _Malformed("cipher_suites: odd length")
    cipher_suites = tuple(suites_r.u16("cipher_suite") for _ in range(suites_r.remaining // 2))
    r.vector(1, "legacy_compression_methods", min_len=1)

    sni: str | None = None
    alpn: tuple[str, ...] = ()
    supported_versions: tuple[int, ...] = ()
    ext_types: list[int] = []
    if r.remaining:  # extensions are optional before TLS 1.3
        exts = r.vector(2, "extensions")
        r.end("ClientHello")
        seen: set[int] = set()
        while exts.remaining:
            ext_type = exts.u16("extension type")
            ext = exts.vector(2, f"extension {ext_type}")
            if ext_type in seen:
                raise _Malformed(f"duplicate extension {ext_type}")
            seen.add(ext_type)
            ext_types.append(ext_type)
            if ext_type == EXT_SERVER_NAME:
                sni = _parse_sni(ext)
            elif ext_type == EXT_ALPN:
                alpn = _parse_alpn(ext)
            elif ext_type == EXT_SUPPORTED_VERSIONS:
                supported_versions = _parse_supported_versions(ext)
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


def _parse_sni(ext: _Reader) -> str | None:
    names = ext.vector(2, "server_name_list", min_len=1)
    ext.end("server_name extension")
    name_type = names.u8("name_type")
    if name_type != SNI_HOST_NAME:
        raise _Malformed(f"server_name type {name_type} is not host_name")
    raw = bytes(names.vector(2, "host_name", min_len=1).take_all())
    if names.remaining:
        raise _Malformed("server_name_list must hold exactly one host_name")
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


def _parse_alpn(ext: _Reader) -> tuple[str, ...]:
    names = ext.vector(2, "protocol_name_list", min_len=2)
    ext.end("ALPN extension")
    out = []
    while names.remaining:
        proto = names.vector(1, "protocol_name", min_len=1)
        out.append(bytes(proto.take_all()).decode("latin-1"))
    return tuple(out)


def _parse_supported_versions(ext: _Reader) -> tuple[int, ...]:
    versions = ext.vector(1, "supported_versions", min_len=2, max_len=254)
    ext.end("supported_versions extension")
    if versions.remaining % 2:
        raise _Malformed("supported_versions: odd length")
    return tuple(versions.u16("version") for _ in range(versions.remaining // 2))


_LABEL = re.compile(rb"\A[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")


def validate_hostname(raw: bytes) -> str | None:
    """Return ``raw`` as a lower-case DNS host name, or None when it is not a valid one.

    Accepts LDH labels (plus ``_``) of 1-63 bytes, at most 253 bytes in all, no trailing
    dot, no IP literal; an ``xn--`` label must be well-formed Punycode that decodes to
    non-ASCII text and encodes back to the same label.
    """
    if not raw or len(raw) > 253:
        return None
    host = raw.lower()
    labels = host.split(b".")
    for label in labels:
        if not _LABEL.match(label):
            return None
        if label[2:4] == b"--" and not (label.startswith(b"xn--") and _valid_a_label(label)):
            return None  # "ab--" labels are reserved except valid IDNA A-labels
    text = host.decode("ascii")
    if labels[-1].isdigit():
        return None  # a TLD is never all-numeric; catches IPv4 literals like 10.0.0.1
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return text
    return None


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
