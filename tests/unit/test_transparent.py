"""Transparent capture: sockaddr_in parsing and original-destination -> upstream mapping."""

from __future__ import annotations

import socket
import struct

import pytest

from meshcar.errors import ConfigError
from meshcar.net.origdst import original_dst, parse_sockaddr_in
from meshcar.sidecar.config import parse_config
from meshcar.sidecar.transparent import upstream_for


def sockaddr(ip: str, port: int, family: int = socket.AF_INET) -> bytes:
    return struct.pack("=H", family) + struct.pack("!H", port) + socket.inet_aton(ip) + b"\0" * 8


def test_parse_sockaddr_in() -> None:
    assert parse_sockaddr_in(sockaddr("10.77.0.3", 9002)) == ("10.77.0.3", 9002)
    assert parse_sockaddr_in(sockaddr("255.255.255.255", 65535)) == ("255.255.255.255", 65535)
    with pytest.raises(ValueError, match="too short"):
        parse_sockaddr_in(b"\x02\x00")
    with pytest.raises(ValueError, match="not an AF_INET"):
        parse_sockaddr_in(sockaddr("1.2.3.4", 1, family=socket.AF_INET6))


CFG = {
    "identity": {
        "spiffe_id": "spiffe://td/svc/web",
        "ca_url": "https://ca:1",
        "ca_bundle": "b",
        "state_dir": "s",
    },
    "app": {"port": 9001},
    "inbound": {"listen": "0.0.0.0:7001"},
    "admin": {"listen": "127.0.0.1:7201"},
    "outbound": {
        "transparent_listen": "127.0.0.1:15001",
        "upstreams": {
            "api": {
                "endpoints": ["10.77.0.3:7002"],
                "spiffe_id": "spiffe://td/svc/api",
                "match": ["10.77.0.3:9002", "10.96.0.10:80"],
            },
            "pay": {"endpoints": ["10.77.0.4:7003"], "spiffe_id": "spiffe://td/svc/pay"},
        },
    },
}


def test_original_destination_maps_to_its_upstream_only() -> None:
    cfg = parse_config(CFG, "s.yaml")
    assert cfg.transparent_listen is not None and cfg.transparent_listen.port == 15001
    assert upstream_for(cfg, ("10.77.0.3", 9002)) == "api"
    assert upstream_for(cfg, ("10.96.0.10", 80)) == "api"
    assert upstream_for(cfg, ("10.77.0.3", 9003)) is None  # right IP, wrong port
    assert upstream_for(cfg, ("10.77.0.4", 7003)) is None  # no match list: never captured
    assert upstream_for(cfg, ("8.8.8.8", 443)) is None


def test_bad_match_entries_are_reported() -> None:
    bad = {
        **CFG,
        "outbound": {
            "transparent_listen": "nope",
            "upstreams": {
                "api": {
                    "endpoints": ["10.77.0.3:7002"],
                    "spiffe_id": "spiffe://td/svc/api",
                    "match": ["x"],
                }
            },
        },
    }
    with pytest.raises(ConfigError) as err:
        parse_config(bad, "s.yaml")
    text = str(err.value)
    assert "outbound.transparent_listen" in text and "outbound.upstreams.api.match[0]" in text


class FakeSock:
    def __init__(self, answer: bytes | OSError) -> None:
        self.answer = answer
        self.asked: tuple[int, int, int] | None = None

    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes:
        self.asked = (level, optname, buflen)
        if isinstance(self.answer, OSError):
            raise self.answer
        return self.answer


def test_original_dst_asks_netfilter_and_tolerates_unredirected_sockets() -> None:
    sock = FakeSock(sockaddr("10.77.0.3", 9002))
    assert original_dst(sock) == ("10.77.0.3", 9002)
    assert sock.asked == (socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST, sizeof(struct sockaddr_in)
    assert (
        original_dst(FakeSock(OSError(2, "No such file or directory"))) is None
    )  # no conntrack entry
    assert original_dst(FakeSock(sockaddr("1.2.3.4", 1, family=socket.AF_INET6))) is None


def test_transparent_listener_must_be_loopback() -> None:
    # it sends with this sidecar's identity: reachable from other pods it would lend it out
    bad = {**CFG, "outbound": {**CFG["outbound"], "transparent_listen": "0.0.0.0:15001"}}
    with pytest.raises(ConfigError, match="outbound.transparent_listen"):
        parse_config(bad, "s.yaml")
