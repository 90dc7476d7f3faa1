"""HTTP/2 abuse protections, each with a raw h2 client (frames built with h2's hyperframe and
hpack) against the outbound's h2c listener of a sidecar pair: rapid reset, CONTINUATION
flood, SETTINGS flood, PING flood, too many concurrent streams, an oversized header block.
Each ends in GOAWAY, and a second connection opened before the attack still gets its gRPC
call answered through the whole pair afterwards (other connections unaffected)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
import trio
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from meshcar.proto.h2guard import PREFACE, FrameGuard, H2Limits
from tests.integration.test_grpc import GRPC_FRAME, SERVICE, grpc_mesh

__all__ = ["grpc_mesh"]
pytest.importorskip("grpc")

ENHANCE_YOUR_CALM, PROTOCOL_ERROR = 0xB, 0x1


def request_headers(path: bytes = f"/{SERVICE}/Unary".encode()) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"api"),
        (b":path", path),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]


class Attacker:
    """Writes crafted frames; reads the server's frames until a GOAWAY (or EOF)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.encoder = Encoder()
        self.buf = b""

    @classmethod
    async def open(cls, port: int) -> Attacker:
        a = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await a.send(PREFACE + SettingsFrame(0).serialize())
        return a

    async def send(self, data: bytes) -> bool:
        try:
            await self.stream.send_all(data)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False  # the server closed on us: the GOAWAY is in what we read

    def block(self, headers=None) -> bytes:
        return self.encoder.encode(headers or request_headers())

    async def goaway(self, timeout: float = 20) -> tuple[int, bytes] | None:
        """(error code, debug data) of the server's GOAWAY; None if it closed without."""
        with trio.fail_after(timeout):
            while True:
                while len(self.buf) >= 9:
                    n = int.from_bytes(self.buf[:3], "big")
                    if len(self.buf) < 9 + n:
                        break
                    kind, payload = self.buf[3], self.buf[9 : 9 + n]
                    self.buf = self.buf[9 + n :]
                    if kind == 0x7:
                        return int.from_bytes(payload[4:8], "big"), payload[8:]
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return None
                if not data:
                    return None
                self.buf += data


async def healthy_call(conn_stream: trio.SocketStream) -> int:
    """One gRPC unary call with the h2 library on an already-open connection: grpc-status."""
    c = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    c.initiate_connection()
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, request_headers())
    c.send_data(sid, GRPC_FRAME, end_stream=True)
    await conn_stream.send_all(c.data_to_send())
    trailers: dict = {}
    with trio.fail_after(20):
        while True:
            data = await conn_stream.receive_some(65536)
            assert data, "healthy connection closed"
            for ev in c.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    trailers.update(dict(ev.headers))
                if isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    return int(trailers.get(b"grpc-status", b"-1"))
            out = c.data_to_send()
            if out:
                await conn_stream.send_all(out)


async def attack_and_check(port: int, attack) -> tuple[int, bytes] | None:
    bystander = await trio.open_tcp_stream("127.0.0.1", port)  # opened before the attack
    attacker = await Attacker.open(port)
    await attack(attacker)
    result = await attacker.goaway()
    await attacker.stream.aclose()
    assert await healthy_call(bystander) == 0  # other connections unaffected
    await bystander.aclose()
    return result


async def test_rapid_reset_gets_goaway(grpc_mesh) -> None:
    web, *_ = grpc_mesh

    async def attack(a: Attacker) -> None:
        for sid in range(1, 4000, 2):
            frames = HeadersFrame(sid, a.block(), flags=["END_HEADERS"]).serialize()
            frames += RstStreamFrame(sid, error_code=8).serialize()
            if not await a.send(frames):
                return

    start = trio.current_time()
    code, debug = await attack_and_check(web.outbound_port, attack)
    elapsed = trio.current_time() - start
    assert code == ENHANCE_YOUR_CALM and b"rapid reset" in debug
    # bounded work: the streams served are within the reset budget, not the 2000 sent
    lim = H2Limits()
    served = sum(
        s.value
        for m in web.metrics.registry.collect()
        if m.name == "meshcar_requests"
        for s in m.samples
        if s.name.endswith("_total") and s.labels.get("direction") == "outbound"
    )
    assert served <= lim.reset_burst + lim.reset_rate * elapsed + 2, (served, elapsed)


async def test_continuation_flood_gets_goaway(grpc_mesh) -> None:
    web, *_ = grpc_mesh

    async def attack(a: Attacker) -> None:
        block = a.block()
        frames = HeadersFrame(1, block[:5]).serialize()  # no END_HEADERS
        frames += b"".join(ContinuationFrame(1, b"").serialize() for _ in range(10_000))
        await a.send(frames)

    code, debug = await attack_and_check(web.outbound_port, attack)
    assert code == ENHANCE_YOUR_CALM and b"CONTINUATION flood" in debug


@pytest.mark.parametrize(
    "value, why",
    [
        (b"~" * 100_000, b"header block over"),  # 100 kB on the wire: the frame guard
        (b"a" * 100_000, b""),  # 62 kB in Huffman, 100 kB decoded: h2's header list limit
    ],
)
async def test_oversized_header_block_gets_goaway(grpc_mesh, value: bytes, why: bytes) -> None:
    web, *_ = grpc_mesh

    async def attack(a: Attacker) -> None:
        block = a.block(request_headers() + [(b"x-big", value)])
        chunks = [block[i : i + 16000] for i in range(0, len(block), 16000)]
        frames = HeadersFrame(1, chunks[0]).serialize()
        for i, c in enumerate(chunks[1:], 1):
            last = i == len(chunks) - 1
            frames += ContinuationFrame(1, c, flags=["END_HEADERS"] if last else []).serialize()
        await a.send(frames)

    code, debug = await attack_and_check(web.outbound_port, attack)
    assert code == ENHANCE_YOUR_CALM and why in debug


@pytest.mark.parametrize("kind", ["settings", "ping"])
async def test_settings_and_ping_floods_get_goaway(grpc_mesh, kind: str) -> None:
    web, *_ = grpc_mesh

    async def attack(a: Attacker) -> None:
        frame = SettingsFrame(0) if kind == "settings" else PingFrame(0, b"12345678")
        await a.send(frame.serialize() * 5000)

    code, debug = await attack_and_check(web.outbound_port, attack)
    assert code == ENHANCE_YOUR_CALM and f"{kind.upper()} flood".encode() in debug


async def test_too_many_concurrent_streams_gets_goaway(grpc_mesh) -> None:
    web, *_ = grpc_mesh

    async def attack(a: Attacker) -> None:
        # 150 open streams (no END_STREAM: each waits for its request message) against
        # the 100 the server advertised
        frames = b"".join(
            HeadersFrame(sid, a.block(), flags=["END_HEADERS"]).serialize()
            for sid in range(1, 301, 2)
        )
        await a.send(frames)

    code, _ = await attack_and_check(web.outbound_port, attack)
    assert code == PROTOCOL_ERROR


def test_guard_state_is_bounded_whatever_the_split() -> None:
    """The scanner finds the same frames however the bytes are split (1-byte reads too)."""
    frames = PREFACE + b"".join(PingFrame(0, b"12345678").serialize() for _ in range(60))
    for step in (1, 7, 9, 17, 4096):
        g = FrameGuard(H2Limits(ping_burst=50, ping_rate=0.001), skip=len(PREFACE))
        verdicts = [g.feed(frames[i : i + step], 1.0) for i in range(0, len(frames), step)]
        assert "PING flood" in verdicts, step
        assert len(g._head) < 9
