"""Opaque TCP through the mesh: `protocol: tcp` upstreams (outbound) and `inbound.tcp` ports.

Theory of operation
-------------------
Outbound: each `protocol: tcp` upstream has its own loopback listener (`local_port`). Every
accepted connection is one tunnel: the sidecar dials the upstream's endpoints over mTLS with
a client context that offers only the ALPN id `meshcar-tcp/1` (`tls/contexts.py`), checks
the peer's SPIFFE ID as for HTTP (`common/mtls.py`), and refuses a peer that did not select
`meshcar-tcp/1` (an older sidecar would serve HTTP). It then sends the one-line preamble
`meshcar-tcp/1 <target_port>\\n` and relays bytes both ways. Nothing waits for the app to
speak first, so server-speaks-first protocols (MySQL/MariaDB, SMTP) work.

Inbound: the mesh listener offers `http/1.1` then `meshcar-tcp/1`; a connection that
selected `meshcar-tcp/1` comes here after the handshake. The caller's SPIFFE ID is checked
against `inbound.allow` *before* anything is read or the app is dialed: a caller not on
the list (or with an unusable SVID) gets the TLS connection closed, a `denied` access-log
line and `meshcar_authz_denials_total` / `meshcar_tcp_connections_total{result="denied"}`.
Then the preamble names the app port, which must be one of `inbound.tcp` (never an open
proxy: another port is refused and logged); with `proxy_protocol: v2` the app first gets
a PROXY v2 header (source: the calling sidecar's address, destination: our mesh listener)
with TLV type 0xE0 (`TLV_SPIFFE_ID`, in the spec's custom range) carrying the verified
caller SPIFFE ID as UTF-8.

The relay (`net/relay.py`) keeps half-close both ways: an app's FIN becomes a TLS
close_notify (TLS 1.3 allows reading on after it), and a close_notify received becomes a
FIN to the app. A tunnel with no byte in either direction for `idle_seconds` is closed.
Each tunnel writes one access-log line of type `tcp` when it ends (bytes each way,
duration, how it ended) and is counted apart from HTTP requests:
`meshcar_tcp_connections_total{direction,target,result}`,
`meshcar_tcp_bytes_total{direction,target,way}` (way `up` = caller to server) and
`meshcar_tcp_connection_duration_seconds{direction}`.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import time

import trio

from meshcar.admin.metrics import Metrics
from meshcar.common.accesslog import log_entry
from meshcar.errors import UpstreamError
from meshcar.net.connect import open_tcp
from meshcar.net.errors import CONNECTION_ERRORS, HANDSHAKE_ERRORS
from meshcar.net.limits import ConnectionLimit
from meshcar.net.pool import Pooled
from meshcar.net.relay import relay
from meshcar.net.tls_memory_bio import TLSStream
from meshcar.proto.proxy_protocol import encode_v2
from meshcar.sidecar.config import SidecarConfig, TcpPort, Upstream
from meshcar.sidecar.dialers import MeshDialer
from meshcar.tls.contexts import ALPN_TCP
from meshcar.tls.store import CredentialStore
from meshcar.tls.svid import PeerIdentity

log = logging.getLogger("meshcar.tcp")

PREAMBLE = b"meshcar-tcp/1 "
MAX_PREAMBLE = 32
TLV_SPIFFE_ID = 0xE0  # PROXY v2 TLV: the verified caller SPIFFE ID (UTF-8), custom range


def preamble(port: int) -> bytes:
    return PREAMBLE + b"%d\n" % port


def parse_preamble(line: bytes) -> int | None:
    """The app port a preamble line (without its newline) names, or None if malformed."""
    if not line.startswith(PREAMBLE):
        return None
    digits = line[len(PREAMBLE) :]
    if not digits.isdigit() or len(digits) > 5 or digits.startswith(b"0"):
        return None
    port = int(digits)
    return port if 1 <= port <= 65535 else None


class _Activity:
    """When a byte last moved in either direction, and how many moved each way."""

    def __init__(self) -> None:
        self.last = trio.current_time()
        self.up = 0  # caller -> server
        self.down = 0  # server -> caller


class _Tracked(trio.abc.HalfCloseableStream):
    """A stream whose reads count as tunnel activity; `send_eof` half-closes it (a TCP
    socket: shutdown(SHUT_WR); a TLSStream: close_notify, reading goes on)."""

    def __init__(self, inner: trio.abc.Stream, act: _Activity, *, up: bool) -> None:
        self.inner = inner
        self.act = act
        self.up = up  # bytes read from this stream travel caller -> server

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        if data:
            self.act.last = trio.current_time()
            if self.up:
                self.act.up += len(data)
            else:
                self.act.down += len(data)
        return bytes(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        inner = self.inner
        if isinstance(inner, TLSStream):
            await _tls_send_eof(inner)
        elif isinstance(inner, trio.abc.HalfCloseableStream):
            await inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _tls_send_eof(tls: TLSStream) -> None:
    """Send close_notify and keep reading (TLS 1.3 half-close).

    CPython's `unwrap()` calls SSL_shutdown twice; the second call would take records
    already received (not yet decrypted) as data after close_notify and fail the
    connection. So those raw bytes are held aside for the call and put back after it.
    When the peer's EOF is already in the buffer (it closed its side) nothing is sent:
    the tunnel is ending anyway."""
    incoming = tls._incoming
    try:
        incoming.write(b"")  # raises once write_eof() was called
    except ssl.SSLError:
        return
    held = incoming.read()
    try:
        tls._obj.unwrap()
    except ssl.SSLError:  # SSLWantReadError: sent, the peer's close_notify not seen yet
        pass
    finally:
        if held:
            incoming.write(held)
    try:
        await tls._flush()
    except trio.BrokenResourceError:
        pass


async def _tunnel(
    caller: trio.abc.Stream, server: trio.abc.Stream, idle_seconds: float, up: int = 0
) -> tuple[_Activity, str]:
    """Relay caller <-> server until both directions end ("closed") or nothing moved for
    `idle_seconds` ("idle"). `up`: caller bytes already passed on (read with the preamble)."""
    act = _Activity()
    act.up = up
    a = _Tracked(caller, act, up=True)
    b = _Tracked(server, act, up=False)
    with trio.CancelScope() as scope:

        async def watch() -> None:
            while True:
                deadline = act.last + idle_seconds
                if trio.current_time() >= deadline:
                    scope.cancel()
                    return
                await trio.sleep_until(deadline)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await relay(a, b, use_splice=False)
            nursery.cancel_scope.cancel()
    return act, "idle" if scope.cancelled_caught else "closed"


class TcpStats:
    """The metric children of one (direction, target), resolved once."""

    def __init__(self, metrics: Metrics, direction: str) -> None:
        self.metrics = metrics
        self.direction = direction
        self.duration = metrics.tcp_duration.labels(direction)

    def done(self, target: str, result: str, act: _Activity | None, seconds: float) -> None:
        m = self.metrics
        m.tcp_connections.labels(self.direction, target, result).inc()
        if act is not None:
            if act.up:
                m.tcp_bytes.labels(self.direction, target, "up").inc(act.up)
            if act.down:
                m.tcp_bytes.labels(self.direction, target, "down").inc(act.down)
        self.duration.observe(seconds)


def _log(direction: str, event: str, **fields: object) -> None:
    log_entry("tcp", direction=direction, event=event, **fields)


def _short(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}"[:200]


class TcpOutbound:
    """The local listeners of `protocol: tcp` upstreams: one mTLS tunnel per connection."""

    def __init__(
        self, cfg: SidecarConfig, store: CredentialStore, metrics: Metrics, upstreams: dict
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.upstreams: dict[str, Upstream] = upstreams
        self.dialer = MeshDialer(store, upstreams, metrics, context=store.tcp_client_context)
        self.stats = TcpStats(metrics, "outbound")
        self._listener_limits = {
            n: ConnectionLimit(
                f"outbound:{n}",
                cfg.limits.max_connections,
                lambda name: metrics.listener_refusals.labels(name).inc(),
            )
            for n in upstreams
        }
        self._upstream_limits = {
            n: ConnectionLimit(
                n,
                cfg.limits.max_upstream_connections,
                lambda name: metrics.upstream_refusals.labels(name).inc(),
            )
            for n in upstreams
        }

    async def _dial(self, name: str) -> Pooled:
        """A verified tunnel connection, trying each endpoint once (round robin start)."""
        up = self.upstreams[name]
        last: UpstreamError | None = None
        for _ in up.endpoints:
            try:
                pooled = await self.dialer.dial(name)
            except UpstreamError as exc:
                last = exc
                continue
            stream = pooled.conn.stream
            assert isinstance(stream, TLSStream)
            if stream.selected_alpn_protocol() != ALPN_TCP:
                await trio.aclose_forcefully(stream)
                last = UpstreamError(
                    f"upstream {name}: peer did not select ALPN {ALPN_TCP} "
                    "(not a meshcar sidecar with opaque TCP)",
                    502,
                )
                continue
            return pooled
        assert last is not None
        raise last

    async def handle_connection(self, app: trio.SocketStream, name: str) -> None:
        limit = self._listener_limits[name]
        if not limit.try_enter():
            await trio.aclose_forcefully(app)
            return
        try:
            await self._serve(app, name)
        finally:
            limit.leave()

    async def _serve(self, app: trio.SocketStream, name: str) -> None:
        up = self.upstreams[name]
        start = time.perf_counter()
        ulimit = self._upstream_limits[name]
        if not ulimit.try_enter():
            _log("outbound", "refused", upstream=name, error="upstream connection limit")
            self.stats.done(name, "refused", None, time.perf_counter() - start)
            await trio.aclose_forcefully(app)
            return
        try:
            try:
                pooled = await self._dial(name)
            except UpstreamError as exc:
                _log("outbound", "dial_failed", upstream=name, error=str(exc))
                self.stats.done(name, "dial_failed", None, time.perf_counter() - start)
                await trio.aclose_forcefully(app)
                return
            mesh = pooled.conn.stream
            assert up.target_port is not None and isinstance(mesh, TLSStream)
            try:
                await mesh.send_all(preamble(up.target_port))
                act, how = await _tunnel(app, mesh, up.idle_seconds)
                self.dialer.remember_session(pooled)  # the next tunnel resumes (1-RTT, no cert)
            except CONNECTION_ERRORS as exc:
                _log("outbound", "failed", upstream=name, error=_short(exc))
                self.stats.done(name, "failed", None, time.perf_counter() - start)
                return
            finally:
                try:
                    await trio.aclose_forcefully(app)  # raises Cancelled after closing
                finally:
                    await mesh.aclose()
            dur = time.perf_counter() - start
            self.stats.done(name, how, act, dur)
            _log(
                "outbound",
                how,
                upstream=name,
                target_port=up.target_port,
                bytes_in=act.up,
                bytes_out=act.down,
                duration_ms=round(dur * 1000, 3),
            )
        finally:
            ulimit.leave()


def _proxy_v2(tcp: trio.SocketStream, spiffe_id: str) -> bytes:
    """PROXY v2: the calling sidecar's address -> our mesh listener, TLV 0xE0 = SPIFFE ID."""
    tlvs = [(TLV_SPIFFE_ID, spiffe_id.encode())]
    try:
        src = tcp.socket.getpeername()[:2]
        dst = tcp.socket.getsockname()[:2]
        if ipaddress.ip_address(src[0]).version == ipaddress.ip_address(dst[0]).version:
            return encode_v2((src[0], src[1]), (dst[0], dst[1]), tlvs=tlvs)
    except (OSError, ValueError):
        pass
    return encode_v2(None, None, tlvs=tlvs)  # family UNSPEC, the TLV still carries the ID


class TcpInbound:
    """Opaque TCP tunnels arriving on the mesh listener (ALPN meshcar-tcp/1)."""

    def __init__(self, cfg: SidecarConfig, metrics: Metrics, allow: frozenset[str]) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.allow = allow
        self.ports: dict[int, TcpPort] = {p.port: p for p in cfg.tcp_ports}
        self.stats = TcpStats(metrics, "inbound")
        self.preamble_timeout = cfg.timeouts.request_head
        self.connect_timeout = 5.0

    async def serve(
        self, mesh: TLSStream, tcp: trio.SocketStream, peer: PeerIdentity | None, problem: str
    ) -> None:
        start = time.perf_counter()
        try:
            await self._serve(mesh, tcp, peer, problem, start)
        finally:
            await mesh.aclose()

    async def _serve(
        self,
        mesh: TLSStream,
        tcp: trio.SocketStream,
        peer: PeerIdentity | None,
        problem: str,
        start: float,
    ) -> None:
        if peer is None or peer.spiffe_id not in self.allow:
            peer_id = peer.spiffe_id if peer else None
            self.metrics.authz_denials.labels(peer_id or "invalid").inc()
            why = (
                f"caller certificate rejected: {problem}"
                if peer is None
                else f"{peer.spiffe_id} is not allowed to call {self.cfg.identity.spiffe_id}"
            )
            _log("inbound", "denied", peer=peer_id, error=why)
            self.stats.done("-", "denied", None, time.perf_counter() - start)
            return
        try:
            with trio.fail_after(self.preamble_timeout):
                port, rest = await self._read_preamble(mesh)
        except HANDSHAKE_ERRORS as exc:  # timed out, closed, broken
            _log("inbound", "bad_preamble", peer=peer.spiffe_id, error=_short(exc))
            self.stats.done("-", "bad_preamble", None, time.perf_counter() - start)
            return
        target = self.ports.get(port) if port is not None else None
        if target is None:
            _log(
                "inbound",
                "unknown_port",
                peer=peer.spiffe_id,
                target_port=port,
                error="not an inbound.tcp port of this sidecar",
            )
            self.stats.done("-", "unknown_port", None, time.perf_counter() - start)
            return
        label = str(target.port)
        try:
            app = await open_tcp(target.host, target.port, self.connect_timeout)
        except UpstreamError as exc:
            _log("inbound", "app_failed", peer=peer.spiffe_id, target_port=port, error=str(exc))
            self.stats.done(label, "app_failed", None, time.perf_counter() - start)
            return
        try:
            first = _proxy_v2(tcp, peer.spiffe_id) if target.proxy_protocol == "v2" else b""
            if first or rest:
                await app.send_all(first + rest)
            act, how = await _tunnel(mesh, app, target.idle_seconds, len(rest))
        except CONNECTION_ERRORS as exc:
            _log("inbound", "failed", peer=peer.spiffe_id, target_port=port, error=_short(exc))
            self.stats.done(label, "failed", None, time.perf_counter() - start)
            return
        finally:
            await trio.aclose_forcefully(app)
        dur = time.perf_counter() - start
        self.stats.done(label, how, act, dur)
        _log(
            "inbound",
            how,
            peer=peer.spiffe_id,
            target_port=port,
            bytes_in=act.up,
            bytes_out=act.down,
            duration_ms=round(dur * 1000, 3),
        )

    @staticmethod
    async def _read_preamble(mesh: TLSStream) -> tuple[int | None, bytes]:
        """(port named by the preamble or None, bytes received after its newline)."""
        buf = b""
        while b"\n" not in buf:
            if len(buf) > MAX_PREAMBLE:
                return None, b""
            data = await mesh.receive_some(MAX_PREAMBLE + 1)
            if not data:
                raise trio.BrokenResourceError("closed before the tunnel preamble")
            buf += data
        line, _, rest = buf.partition(b"\n")
        return parse_preamble(line), rest


__all__ = [
    "ALPN_TCP",
    "TLV_SPIFFE_ID",
    "TcpInbound",
    "TcpOutbound",
    "parse_preamble",
    "preamble",
]
