"""PROXY protocol v1 (text) and v2 (binary): encoders and a sans-IO decoder.

Theory of operation
-------------------
A proxy that forwards a TCP connection untouched (the edge in passthrough mode) tells the
backend who the real client is by sending one PROXY header before the first byte of the
client's stream (HAProxy's "PROXY protocol" specification, versions 1 and 2).

Encoding is a pure function of the two endpoints. Decoding is sans-IO, like
:mod:`meshcar.proto.clienthello`: :func:`parse_proxy_header` is handed all bytes received so
far and answers

* :class:`Incomplete` -- a valid prefix of a header; read more (``at_least`` is a lower bound);
* :class:`ProxyHeader` -- a whole header; ``consumed`` bytes belong to it, the rest is the
  client's stream and must be passed on;
* :class:`Rejected` -- not a PROXY header (``kind`` NOT_PROXY: the caller decides whether a
  header was mandatory), malformed, or over the size limit.

The version is told by the first byte ('P' for v1, CR for v2's 12-byte signature). Fields
are checked as soon as they arrive so that garbage is refused early, yet any prefix of a
valid header is ``Incomplete`` and never ``Rejected``.

v1 is strict: at most 107 bytes including CRLF, single spaces, ``TCP4`` with dotted-quad
IPv4 addresses (no leading zeros), ``TCP6`` with IPv6 addresses (no zone id), decimal ports
0-65535 without leading zeros; ``UNKNOWN`` ignores the rest of its line, as the spec asks.

v2: version nibble 2; commands LOCAL (addresses discarded; the receiver uses the real
connection's endpoints) and PROXY; families UNSPEC/INET/INET6/UNIX with STREAM/DGRAM
transports; the declared length must cover the address block; TLVs (type, 16-bit length,
value) must tile the rest exactly; a PP2_TYPE_CRC32C TLV, when present, is verified. The
total size is bounded by ``max_v2_size`` (4 KiB by default; the format allows 64 KiB).

Trust: :class:`ProxyPolicy` says which peers may send a header (configured CIDRs, loopback
by default) and whether those must; :meth:`ProxyPolicy.verdict` turns (peer, parse result)
into accept / direct / refuse, so every listener that accepts PROXY decides the same way.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "Command",
    "Family",
    "Incomplete",
    "ProxyHeader",
    "ProxyResult",
    "Rejected",
    "RejectKind",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "MAX_V2_SIZE",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_UNIQUE_ID",
    "PP2_TYPE_SSL",
    "PP2_TYPE_NETNS",
    "crc32c",
    "encode_v1",
    "encode_v2",
    "parse_proxy_header",
    "ProxyPolicy",
    "Verdict",
]

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = 16
MAX_V2_SIZE = 4096

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30


class Command(enum.StrEnum):
    PROXY = "PROXY"
    LOCAL = "LOCAL"


class Family(enum.StrEnum):
    TCP4 = "TCP4"
    TCP6 = "TCP6"
    UDP4 = "UDP4"
    UDP6 = "UDP6"
    UNIX_STREAM = "UNIX_STREAM"
    UNIX_DGRAM = "UNIX_DGRAM"
    UNKNOWN = "UNKNOWN"


class RejectKind(enum.Enum):
    NOT_PROXY = "not_proxy"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"


@dataclass(frozen=True)
class Incomplete:
    """A valid prefix of a PROXY header; at least ``at_least`` more bytes are needed."""

    at_least: int


@dataclass(frozen=True)
class Rejected:
    kind: RejectKind
    reason: str


@dataclass(frozen=True)
class ProxyHeader:
    """A decoded PROXY header. Addresses and ports are None for LOCAL and UNKNOWN."""

    version: int
    command: Command
    family: Family
    src_addr: str | None
    src_port: int | None
    dst_addr: str | None
    dst_port: int | None
    tlvs: tuple[tuple[int, bytes], ...]
    consumed: int

    def tlv(self, tlv_type: int) -> bytes | None:
        """The value of the first TLV of this type, or None."""
        for t, value in self.tlvs:
            if t == tlv_type:
                return value
        return None


ProxyResult = Incomplete | ProxyHeader | Rejected

# --- CRC32C (Castagnoli), needed for PP2_TYPE_CRC32C ------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C (Castagnoli) of ``data``, as used by PP2_TYPE_CRC32C."""
    crc = 0xFFFFFFFF
    for byte in bytes(data):
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- encoders --------------------------------------------------------------------------

Endpoint = tuple[str, int]


def _ip_pair(
    src: Endpoint, dst: Endpoint
) -> tuple[
    ipaddress.IPv4Address | ipaddress.IPv6Address, ipaddress.IPv4Address | ipaddress.IPv6Address
]:
    s = ipaddress.ip_address(src[0])
    d = ipaddress.ip_address(dst[0])
    if s.version != d.version:
        raise ValueError("source and destination must be of the same address family")
    for port in (src[1], dst[1]):
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
    return s, d


def encode_v1(src: Endpoint | None, dst: Endpoint | None) -> bytes:
    """``PROXY TCP4|TCP6 src dst sport dport\\r\\n``; ``PROXY UNKNOWN\\r\\n`` if either is None."""
    if src is None or dst is None:
        return b"PROXY UNKNOWN\r\n"
    s, d = _ip_pair(src, dst)
    proto = "TCP4" if s.version == 4 else "TCP6"
    line = f"PROXY {proto} {s} {d} {src[1]} {dst[1]}\r\n".encode("ascii")
    assert len(line) <= V1_MAX_LENGTH
    return line


def encode_v2(
    src: Endpoint | None,
    dst: Endpoint | None,
    *,
    tlvs: Iterable[tuple[int, bytes]] = (),
    local: bool = False,
    with_crc32c: bool = False,
) -> bytes:
    """A v2 header. The family (TCP4/TCP6) follows the addresses; ``None`` addresses give
    family UNSPEC; ``local=True`` gives the LOCAL command (health checks, no client)."""
    if local or src is None or dst is None:
        fam, addr = 0x00, b""
    else:
        s, d = _ip_pair(src, dst)
        fam = 0x11 if s.version == 4 else 0x21
        addr = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    body = bytearray(addr)
    for t, value in tlvs:
        if not 0 <= t <= 255 or len(value) > 0xFFFF:
            raise ValueError(f"invalid TLV type {t} or length {len(value)}")
        if t == PP2_TYPE_CRC32C:
            raise ValueError("use with_crc32c=True instead of a CRC32C TLV")
        body += struct.pack("!BH", t, len(value)) + value
    crc_at = -1
    if with_crc32c:
        crc_at = V2_HEADER + len(body) + 3
        body += struct.pack("!BH", PP2_TYPE_CRC32C, 4) + b"\x00" * 4
    if len(body) > 0xFFFF:
        raise ValueError("PROXY v2 header too long")
    ver_cmd = 0x20 if local else 0x21
    out = bytearray(V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, len(body)) + body)
    if with_crc32c:
        out[crc_at : crc_at + 4] = struct.pack("!I", crc32c(out))
    return bytes(out)


# --- decoder ---------------------------------------------------------------------------


def parse_proxy_header(
    data: bytes | bytearray | memoryview, *, max_v2_size: int = MAX_V2_SIZE
) -> ProxyResult:
    """Decode a PROXY v1 or v2 header from all bytes received so far. Never raises."""
    buf = bytes(data)
    if not buf:
        return Incomplete(1)
    if buf[0] == V1_PREFIX[0]:
        return _parse_v1(buf)
    if buf[0] == V2_SIGNATURE[0]:
        return _parse_v2(buf, max_v2_size)
    return Rejected(RejectKind.NOT_PROXY, "no PROXY protocol signature")


def _v1_line(buf: bytes) -> Incomplete | Rejected | tuple[str, int]:
    """The v1 header's line (without CRLF) and the bytes it takes, or why it is not one yet."""
    head = buf[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(head):
        return Rejected(RejectKind.NOT_PROXY, "no PROXY protocol signature")
    if len(head) < len(V1_PREFIX):
        return Incomplete(len(V1_PREFIX) - len(head))
    window = buf[:V1_MAX_LENGTH]
    end = window.find(b"\r\n")
    line = window if end < 0 else window[:end]
    for i, byte in enumerate(line):
        if byte == 0x0D and end < 0 and i == len(line) - 1:
            continue  # a CR at the very end may be the start of CRLF
        if not 0x20 <= byte <= 0x7E:
            return Rejected(RejectKind.MALFORMED, f"byte 0x{byte:02x} in v1 header")
    if end < 0:
        if len(buf) >= V1_MAX_LENGTH:
            return Rejected(RejectKind.TOO_LARGE, "v1 header longer than 107 bytes")
        return Incomplete(2 if not buf.endswith(b"\r") else 1)
    return line.decode("ascii"), end + 2


def _v1_addresses(proto: str, src: str, dst: str) -> Rejected | list[str]:
    want = 4 if proto == "TCP4" else 6
    addrs = []
    for a in (src, dst):
        if "%" in a:
            return Rejected(RejectKind.MALFORMED, "zone id in v1 address")
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            return Rejected(RejectKind.MALFORMED, f"bad v1 address {a!r}")
        if ip.version != want:
            return Rejected(RejectKind.MALFORMED, f"{proto} with address {a!r}")
        addrs.append(str(ip))
    return addrs


def _v1_ports(sport: str, dport: str) -> Rejected | list[int]:
    ports = []
    for p in (sport, dport):
        if not p.isascii() or not p.isdigit() or (len(p) > 1 and p[0] == "0") or int(p) > 65535:
            return Rejected(RejectKind.MALFORMED, f"bad v1 port {p!r}")
        ports.append(int(p))
    return ports


def _parse_v1(buf: bytes) -> ProxyResult:
    got = _v1_line(buf)
    if not isinstance(got, tuple):
        return got
    text, consumed = got
    parts = text.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, Command.PROXY, Family.UNKNOWN, None, None, None, None, (), consumed)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        return Rejected(RejectKind.MALFORMED, "v1 header is not PROXY TCP4|TCP6|UNKNOWN ...")
    _, proto, src, dst, sport, dport = parts
    addrs = _v1_addresses(proto, src, dst)
    if isinstance(addrs, Rejected):
        return addrs
    ports = _v1_ports(sport, dport)
    if isinstance(ports, Rejected):
        return ports
    family = Family.TCP4 if proto == "TCP4" else Family.TCP6
    return ProxyHeader(
        1, Command.PROXY, family, addrs[0], ports[0], addrs[1], ports[1], (), consumed
    )


_FAMILIES = {
    0x00: (Family.UNKNOWN, 0),
    0x01: (Family.UNKNOWN, 0),
    0x02: (Family.UNKNOWN, 0),
    0x10: (Family.UNKNOWN, 12),
    0x11: (Family.TCP4, 12),
    0x12: (Family.UDP4, 12),
    0x20: (Family.UNKNOWN, 36),
    0x21: (Family.TCP6, 36),
    0x22: (Family.UDP6, 36),
    0x30: (Family.UNKNOWN, 216),
    0x31: (Family.UNIX_STREAM, 216),
    0x32: (Family.UNIX_DGRAM, 216),
}


def _v2_fixed(buf: bytes, max_size: int) -> Incomplete | Rejected | tuple[int, int]:
    """The v2 fixed header checked: (total header bytes, address block length), or why not."""
    head = buf[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(head):
        return Rejected(RejectKind.NOT_PROXY, "no PROXY protocol signature")
    if len(head) < len(V2_SIGNATURE):
        return Incomplete(len(V2_SIGNATURE) - len(head))
    if len(buf) >= 13:
        ver_cmd = buf[12]
        if ver_cmd >> 4 != 2:
            return Rejected(RejectKind.MALFORMED, f"v2 version nibble {ver_cmd >> 4} is not 2")
        if ver_cmd & 0x0F not in (0, 1):
            return Rejected(RejectKind.MALFORMED, f"v2 command {ver_cmd & 0x0F} is unknown")
    if len(buf) >= 14 and buf[13] not in _FAMILIES:
        return Rejected(RejectKind.MALFORMED, f"v2 family/transport 0x{buf[13]:02x} is unknown")
    if len(buf) < V2_HEADER:
        return Incomplete(V2_HEADER - len(buf))
    addr_len = _FAMILIES[buf[13]][1]
    length = int.from_bytes(buf[14:16], "big")
    total = V2_HEADER + length
    if total > max_size:
        return Rejected(RejectKind.TOO_LARGE, f"v2 header of {total} bytes exceeds {max_size}")
    if length < addr_len:
        return Rejected(RejectKind.MALFORMED, f"v2 length {length} < address block {addr_len}")
    if len(buf) < total:
        return Incomplete(total - len(buf))
    return total, addr_len


def _v2_tlvs(buf: bytes, total: int, addr_len: int) -> Rejected | list[tuple[int, bytes]]:
    """The TLVs after the address block; a CRC32C TLV is checked against the header."""
    block = buf[V2_HEADER:total]
    length = total - V2_HEADER
    tlvs: list[tuple[int, bytes]] = []
    pos = addr_len
    crc_at = -1
    while pos < length:
        if length - pos < 3:
            return Rejected(RejectKind.MALFORMED, "truncated v2 TLV header")
        t = block[pos]
        tlen = int.from_bytes(block[pos + 1 : pos + 3], "big")
        if pos + 3 + tlen > length:
            return Rejected(RejectKind.MALFORMED, f"v2 TLV {t:#04x} overruns the header")
        value = block[pos + 3 : pos + 3 + tlen]
        if t == PP2_TYPE_CRC32C:
            if tlen != 4 or crc_at >= 0:
                return Rejected(RejectKind.MALFORMED, "bad or repeated CRC32C TLV")
            crc_at = V2_HEADER + pos + 3
        tlvs.append((t, value))
        pos += 3 + tlen
    if crc_at >= 0:
        zeroed = buf[:crc_at] + b"\x00" * 4 + buf[crc_at + 4 : total]
        if crc32c(zeroed) != int.from_bytes(buf[crc_at : crc_at + 4], "big"):
            return Rejected(RejectKind.MALFORMED, "v2 CRC32C mismatch")
    return tlvs


def _v2_addresses(
    family: Family, block: bytes
) -> tuple[str | None, int | None, str | None, int | None]:
    """(source address, source port, destination address, destination port) of the block."""
    if family in (Family.TCP4, Family.UDP4):
        src_port, dst_port = struct.unpack("!HH", block[8:12])
        return (
            str(ipaddress.IPv4Address(block[0:4])),
            src_port,
            str(ipaddress.IPv4Address(block[4:8])),
            dst_port,
        )
    if family in (Family.TCP6, Family.UDP6):
        src_port, dst_port = struct.unpack("!HH", block[32:36])
        return (
            str(ipaddress.IPv6Address(block[0:16])),
            src_port,
            str(ipaddress.IPv6Address(block[16:32])),
            dst_port,
        )
    if family in (Family.UNIX_STREAM, Family.UNIX_DGRAM):
        return (
            block[0:108].split(b"\x00", 1)[0].decode("latin-1"),
            None,
            block[108:216].split(b"\x00", 1)[0].decode("latin-1"),
            None,
        )
    return None, None, None, None


def _parse_v2(buf: bytes, max_size: int) -> ProxyResult:
    fixed = _v2_fixed(buf, max_size)
    if not isinstance(fixed, tuple):
        return fixed
    total, addr_len = fixed
    tlvs = _v2_tlvs(buf, total, addr_len)
    if isinstance(tlvs, Rejected):
        return tlvs
    if buf[12] & 0x0F == 0:  # LOCAL
        return ProxyHeader(
            2, Command.LOCAL, Family.UNKNOWN, None, None, None, None, tuple(tlvs), total
        )
    family = _FAMILIES[buf[13]][0]
    src_addr, src_port, dst_addr, dst_port = _v2_addresses(family, buf[V2_HEADER:total])
    return ProxyHeader(
        2, Command.PROXY, family, src_addr, src_port, dst_addr, dst_port, tuple(tlvs), total
    )


# --- who may send a header ---------------------------------------------------------------


class Verdict(enum.Enum):
    ACCEPT = "accept"  # a header from a trusted source: use its addresses
    DIRECT = "direct"  # no header, and none was expected: the socket's peer is the client
    REFUSE = "refuse"  # close the connection


@dataclass(frozen=True)
class ProxyPolicy:
    """Which peers may send a PROXY header, and whether they must.

    A header is accepted only from a peer inside ``trusted_sources``; from anyone else it is
    a spoofing attempt and the connection is refused. A trusted peer that sends none is
    refused when ``required`` (the default: a proxy that forgets the header would make every
    client look like the proxy) and served as a direct client otherwise. A peer outside
    ``trusted_sources`` that sends no header is a direct client: its socket address is the
    truth. The default trusts loopback only.
    """

    trusted_sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )
    required: bool = True

    @classmethod
    def parse(cls, sources: Iterable[str], required: bool = True) -> ProxyPolicy:
        """From CIDR strings (a bare address is a /32 or /128); ValueError names the bad one."""
        nets = []
        for s in sources:
            try:
                nets.append(ipaddress.ip_network(s, strict=True))
            except ValueError as exc:
                raise ValueError(f"{s!r} is not an IP network (CIDR): {exc}") from None
        return cls(tuple(nets), required)

    def trusts(self, peer_ip: str) -> bool:
        try:
            ip = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.trusted_sources)

    def verdict(self, peer_ip: str, result: ProxyHeader | Rejected) -> tuple[Verdict, str]:
        """What to do with a connection from ``peer_ip`` whose first bytes parsed as
        ``result`` (a whole header or a rejection, never Incomplete); the reason is for logs."""
        trusted = self.trusts(peer_ip)
        sent_none = isinstance(result, Rejected) and result.kind is RejectKind.NOT_PROXY
        if not trusted:
            if sent_none:
                return Verdict.DIRECT, ""
            return Verdict.REFUSE, "untrusted_source"  # a header (or a broken one) from a stranger
        if isinstance(result, ProxyHeader):
            return Verdict.ACCEPT, ""
        if sent_none:
            return (Verdict.REFUSE, "missing_header") if self.required else (Verdict.DIRECT, "")
        return Verdict.REFUSE, result.kind.value  # malformed / too_large
