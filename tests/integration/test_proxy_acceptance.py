"""PROXY protocol acceptance on the demo's partner endpoint (the listener that accepts PROXY),
with real sockets (issue 10 item 10): headers only from trusted sources, required from them,
reads that survive any segmentation, every refusal closed and counted, and the listener
serving afterwards. Trusted is 127.0.0.1; the untrusted client binds 127.0.0.2."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from meshcar.demo.app import AppConfig, DemoServer, parse_args
from meshcar.proto import proxy_protocol as pp

TRUSTED = pp.ProxyPolicy.parse(["127.0.0.1/32"])
REQUEST = b"GET /who HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n"
V1 = pp.encode_v1(("203.0.113.7", 40000), ("127.0.0.1", 9443))
V2 = pp.encode_v2(
    ("203.0.113.7", 40000),
    ("127.0.0.1", 9443),
    tlvs=[(pp.PP2_TYPE_AUTHORITY, b"payments.demo.test")],
    with_crc32c=True,
)
V2_6 = pp.encode_v2(("2001:db8::7", 40000), ("::1", 9443))


@contextmanager
def serve(policy: pp.ProxyPolicy | None = TRUSTED) -> Iterator[DemoServer]:
    server = DemoServer(AppConfig("payments", "127.0.0.1", 0, None, None, proxy_protocol=policy))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def exchange(server: DemoServer, pieces: list[bytes], source: str = "127.0.0.1") -> bytes:
    """Send each piece as its own write (TCP_NODELAY, a short pause between them so they
    arrive as separate segments), then read until the server closes."""
    with socket.socket() as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind((source, 0))
        s.settimeout(10)
        s.connect(server.server_address)
        for i, piece in enumerate(pieces):
            if i:
                time.sleep(0.003)  # not synchronisation: only makes a split on the wire likely
            s.sendall(piece)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def answer(raw: bytes) -> dict:
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


def source_of(raw: bytes) -> str | None:
    doc = answer(raw)
    return doc["proxy_protocol"]["source"] if "proxy_protocol" in doc else None


@pytest.mark.parametrize("header", [V1, V2, V2_6], ids=["v1", "v2", "v2-inet6"])
def test_header_one_byte_per_segment(header: bytes) -> None:
    with serve() as server:
        raw = exchange(server, [header[i : i + 1] for i in range(len(header))] + [REQUEST])
        assert source_of(raw) in ("203.0.113.7:40000", "2001:db8::7:40000")
        assert server.proxy_refusals == {}


@pytest.mark.parametrize("header", [V1, V2], ids=["v1", "v2"])
def test_header_split_in_two_at_every_point(header: bytes) -> None:
    with serve() as server:
        data = header + REQUEST
        for cut in range(1, len(header) + 1):
            raw = exchange(server, [data[:cut], data[cut:]])
            assert source_of(raw) == "203.0.113.7:40000", cut
        assert server.proxy_refusals == {}


def test_untrusted_source_sending_a_header_is_refused_and_counted() -> None:
    with serve() as server:
        for header in (V1, V2):
            assert exchange(server, [header + REQUEST], source="127.0.0.2") == b""
        assert exchange(server, [b"PROXY TCP4 garbage\r\n" + REQUEST], source="127.0.0.2") == b""
        assert server.proxy_refusals == {"untrusted_source": 3}
        # the same source without a header is a direct client; a trusted proxy still works
        assert source_of(exchange(server, [REQUEST], source="127.0.0.2")) is None
        assert source_of(exchange(server, [V2 + REQUEST])) == "203.0.113.7:40000"


def test_trusted_source_without_a_header_is_refused_when_required() -> None:
    with serve() as server:
        assert exchange(server, [REQUEST]) == b""
        assert server.proxy_refusals == {"missing_header": 1}
        assert source_of(exchange(server, [V1 + REQUEST])) == "203.0.113.7:40000"
    with serve(pp.ProxyPolicy.parse(["127.0.0.1/32"], required=False)) as server:
        assert source_of(exchange(server, [REQUEST])) is None  # optional: served as direct
        assert server.proxy_refusals == {}


V2_HEAD = pp.V2_SIGNATURE + b"\x21\x11"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PROXY TCP4 garbage here 1 2\r\n", "malformed"),
        (b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 99999\r\n", "malformed"),
        (b"PROXY TCP4 " + b"1" * 200 + b"\r\n", "too_large"),  # an oversize v1 line
        (b"PROXY \x00\x01", "malformed"),
        (V2_HEAD + b"\xff\xff" + b"\x00" * 64, "too_large"),  # a v2 length far over the bound
        (V2_HEAD + b"\x00\x04" + b"\x00" * 4, "malformed"),  # a v2 length under the address block
        (pp.V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12, "malformed"),  # version 3
        (V2[:-2] + b"\x00\x00", "malformed"),  # CRC32C mismatch
    ],
)
def test_bad_headers_are_refused_and_the_listener_keeps_serving(data: bytes, reason: str) -> None:
    with serve() as server:
        assert exchange(server, [data + REQUEST]) == b""
        assert server.proxy_refusals == {reason: 1}
        assert source_of(exchange(server, [V2 + REQUEST])) == "203.0.113.7:40000"


def test_a_header_cut_short_by_close_is_refused() -> None:
    with serve() as server:
        for cut in (3, 20, len(V2) - 1):
            with socket.create_connection(server.server_address, timeout=10) as s:
                s.sendall(V2[:cut])
                s.shutdown(socket.SHUT_WR)
                assert s.recv(100) == b""
        assert server.proxy_refusals == {"incomplete_header": 3}
        assert source_of(exchange(server, [V1 + REQUEST])) == "203.0.113.7:40000"


def test_cli_policy() -> None:
    args = parse_args(["--name", "p", "--port", "1", "--proxy-protocol"])
    assert args.proxy_policy == pp.ProxyPolicy()  # loopback only, required
    assert args.proxy_policy.trusts("::1") and not args.proxy_policy.trusts("10.0.0.1")
    args = parse_args(
        [
            "--name",
            "p",
            "--port",
            "1",
            "--proxy-protocol",
            "--proxy-trusted",
            "10.1.0.0/16",
            "--proxy-trusted",
            "127.0.0.2",
            "--proxy-optional",
        ]
    )
    assert args.proxy_policy.trusts("10.1.2.3") and args.proxy_policy.trusts("127.0.0.2")
    assert not args.proxy_policy.trusts("127.0.0.1") and not args.proxy_policy.required
    for bad in (
        ["--proxy-protocol", "--proxy-trusted", "10.1.0.1/16"],
        ["--proxy-trusted", "127.0.0.1"],
    ):
        with pytest.raises(SystemExit) as exc:
            parse_args(["--name", "p", "--port", "1", *bad])
        assert exc.value.code == 2


# --- the demo's arrangement: the edge's passthrough comes from 127.0.0.2, the only trusted source


async def test_edge_passthrough_from_its_source_address_to_the_partner_endpoint(
    tmp_path, nursery
) -> None:  # noqa: ANN001
    import ssl

    import trio
    import trustme

    from meshcar.demo.app import build_tls
    from tests.integration.edge_fixtures import curl, resolve, start_edge

    public, partner_ca = trustme.CA(), trustme.CA()
    public.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    public.issue_cert("pay.test").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "pay.pem")
    )
    partner_ca.cert_pem.write_to_path(str(tmp_path / "partner-ca.pem"))
    partner_ca.issue_cert("partner").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "partner.pem")
    )
    tls = build_tls(
        str(tmp_path / "pay.pem"), str(tmp_path / "pay.pem"), str(tmp_path / "partner-ca.pem")
    )
    server = DemoServer(
        AppConfig(
            "payments",
            "127.0.0.1",
            0,
            None,
            tls,
            proxy_protocol=pp.ProxyPolicy.parse(["127.0.0.2/32"]),
        )
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        port = server.server_address[1]
        edge = await start_edge(
            nursery,
            tmp_path,
            [
                {
                    "host": "pay.test",
                    "mode": "passthrough",
                    "proxy_protocol": "v2",
                    "source_address": "127.0.0.2",
                    "backend": {"endpoints": [f"127.0.0.1:{port}"]},
                }
            ],
        )
        partner = str(tmp_path / "partner.pem")
        rc, out, err = await curl(
            *resolve(tmp_path / "ca.pem", "pay.test", edge.https),
            "--cert",
            partner,
            f"https://pay.test:{edge.https}/who",
        )
        assert rc == 0, err
        assert json.loads(out)["proxy_protocol"]["source"].startswith(
            "127.0.0.1:"
        )  # the real client
        # a direct client on 127.0.0.1 forging a header is refused before TLS
        forged = pp.encode_v2(("198.51.100.1", 1), ("127.0.0.1", port))
        assert await trio.to_thread.run_sync(exchange, server, [forged + b"\x16\x03\x01"]) == b""
        assert server.proxy_refusals == {"untrusted_source": 1}
        # a direct client without a header is served as itself (no proxy_protocol in the answer)
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        ctx.load_cert_chain(partner)

        def direct() -> bytes:
            with (
                socket.create_connection(server.server_address, timeout=10) as raw,
                ctx.wrap_socket(raw, server_hostname="pay.test") as s,
            ):
                s.sendall(REQUEST)
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
                return out

        assert source_of(await trio.to_thread.run_sync(direct)) is None
        await edge.aclose()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_source_address_config() -> None:
    from meshcar.edge.config import parse_edge_config
    from meshcar.errors import ConfigError

    def cfg(route: dict) -> object:
        return parse_edge_config(
            {
                "listen": {"https": "127.0.0.1:1"},
                "admin": {"listen": "127.0.0.1:2"},
                "routes": [route],
            },
            "edge.yaml",
        )

    base = {"host": "p.test", "mode": "passthrough", "backend": {"endpoints": ["127.0.0.1:3"]}}
    assert cfg({**base, "source_address": "127.0.0.2"}).routes[0].source_address == "127.0.0.2"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"routes\[0\]\.source_address: must be an IP address"):
        cfg({**base, "source_address": "edge.local"})
    with pytest.raises(ConfigError, match=r"routes\[0\]\.source_address: only passthrough"):
        cfg(
            {
                "host": "w.test",
                "mode": "terminate",
                "tls": {"cert": "x", "key": "x"},
                "backend": {"endpoints": ["127.0.0.1:3"]},
                "source_address": "127.0.0.2",
            }
        )
