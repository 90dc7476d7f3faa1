"""The edge's public TLS listener: peek the ClientHello, then hand the connection on by SNI.

Theory of operation: connections come from `net/acceptor.py` as bare non-blocking sockets.
The ClientHello is read with `MSG_PEEK` (not consumed, not decrypted) until
`parse_client_hello` has a complete hello, rejects the bytes, or the size/time bound is hit;
while the hello is incomplete, `SO_RCVLOWAT` makes the socket readable only once the bytes
the parser still needs are there (a hello split over TCP segments costs no busy loop).
Garbage and timeouts close the connection cleanly. The route is chosen by SNI (or the
default route). A passthrough route relays every byte, the peeked ones included (they are
still in the socket), to the backend's own TLS server, optionally after a PROXY v1/v2 header
with the real client address; only a TCP entry is logged. terminate/bridge routes get
OpenSSL on the socket itself (`net/tls_bare_socket.py`: it reads the hello it was shown) with the
route's own certificate (Mozilla "intermediate" profile) and optional client-certificate
verification, then the L7 handler. Keeping Python off the handshake path is what makes the
edge's new-connection rate close to nginx's (docs/PERFORMANCE.md).

Handshake outcomes (`meshcar_tls_handshakes_total{direction="edge",result}`): full, resumed,
failure (a TLS error: alert, protocol, certificate), aborted (the client reset or closed
mid-handshake), timeout, no_client_hello, unknown_sni.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable

import trio

from meshcar.admin.metrics import Metrics
from meshcar.common.accesslog import log_entry
from meshcar.edge.config import EdgeConfig, Mode, Route
from meshcar.edge.http import ClientConn, TerminatingProxy
from meshcar.edge.policy import Balancer
from meshcar.errors import ConfigError, UpstreamError
from meshcar.net.acceptor import serve_sockets
from meshcar.net.connect import open_tcp
from meshcar.net.errors import HANDSHAKE_ERRORS
from meshcar.net.limits import ConnectionLimit
from meshcar.net.relay import RelayStats, relay
from meshcar.net.tls_bare_socket import SocketTLSStream
from meshcar.proto import proxy_protocol as pp
from meshcar.proto.clienthello import ClientHello, Incomplete, parse_client_hello
from meshcar_tlsprofile import apply_profile

log = logging.getLogger("meshcar.edge")

MAX_PEEK = 16 * 1024 + 5 * 16  # the parser's bound plus record headers
HANDSHAKE_RESULTS = (
    "full",
    "resumed",
    "failure",
    "aborted",
    "timeout",
    "no_client_hello",
    "unknown_sni",
)

# Mozilla "intermediate" (TLS 1.2 ciphers; TLS 1.3 suites are all allowed by OpenSSL). The
# DHE suites are in Mozilla's list but need DH parameters, which the edge does not load:
# in practice TLS 1.2 key exchange is ECDHE only.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)


def public_server_context(route: Route) -> ssl.SSLContext:
    """The TLS server context of a terminate/bridge host (Mozilla intermediate profile)."""
    assert route.cert_file and route.key_file
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION
    apply_profile(ctx)  # X25519/P-256/P-384 only; the client's cipher order, as Mozilla advises
    # TLS 1.2 client-initiated renegotiation: refused (a cheap way to make a server do
    # handshakes, and nothing a client needs). OpenSSL 3 refuses it by default; the option
    # keeps it so with OpenSSL 1.1.1 too.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(str(route.cert_file), str(route.key_file))
    ctx.set_alpn_protocols(["h2", "http/1.1"] if route.http2 else ["http/1.1"])  # edge/h2.py
    if route.client_auth is not None:
        ctx.load_verify_locations(cafile=str(route.client_auth.ca_file))
        ctx.verify_mode = (
            ssl.CERT_REQUIRED if route.client_auth.mode == "required" else ssl.CERT_OPTIONAL
        )
    return ctx


class TLSListener:
    def __init__(
        self,
        cfg: EdgeConfig,
        proxy: TerminatingProxy,
        balancers: dict[str, Balancer],
        metrics: Metrics,
    ) -> None:
        self.cfg = cfg
        self.proxy = proxy
        self.balancers = balancers
        self.metrics = metrics
        self.contexts = {
            r.host: public_server_context(r) for r in cfg.routes if r.mode is not Mode.PASSTHROUGH
        }
        self._outcome = {
            result: metrics.handshakes.labels("edge", result) for result in HANDSHAKE_RESULTS
        }
        self.conn_limit = ConnectionLimit(
            "https", cfg.limits.max_connections, lambda n: metrics.listener_refusals.labels(n).inc()
        )

    def reconfigure(self, cfg: EdgeConfig) -> Callable[[dict[str, Balancer]], None]:
        """A config reload: every terminate/bridge host's SSLContext built again from its
        certificate files, read now (an unreadable or mismatched file raises OSError or
        ssl.SSLError, a ValueError: nothing is swapped). The returned function swaps routes,
        contexts and the passthrough balancers it is given in: new handshakes use the new
        certificates; an established connection keeps the context it was accepted with."""
        contexts = {}
        for r in cfg.routes:
            if r.mode is Mode.PASSTHROUGH:
                continue
            try:
                contexts[r.host] = public_server_context(r)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ConfigError(
                    [f"routes: {r.host}: tls: cannot load {r.cert_file} / {r.key_file}: {exc}"]
                ) from None

        def commit(balancers: dict[str, Balancer]) -> None:
            self.cfg, self.contexts, self.balancers = cfg, contexts, balancers

        return commit

    async def serve(
        self,
        host: str,
        port: int,
        *,
        handler_nursery: trio.Nursery | None = None,
        reuse_port: bool = False,
        task_status: trio.TaskStatus[list[socket.socket]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on (host, port) until cancelled; started with the listening sockets.
        Connections run in `handler_nursery` if given (they outlive a drain's closed listener).
        `reuse_port`: one of `workers: N`, sharing the port with the other workers."""
        await serve_sockets(
            self.handle_socket,
            host,
            port,
            task_status=task_status,
            on_error=self.metrics.count_connection_error,
            handler_nursery=handler_nursery,
            reuse_port=reuse_port,
        )

    async def peek_hello(self, sock: socket.socket) -> tuple[ClientHello | None, str]:
        """(the hello or None, why not), leaving every byte in the socket."""
        seen = 0
        lowat = False
        try:
            while True:
                try:
                    buf = sock.recv(MAX_PEEK, socket.MSG_PEEK)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                except OSError:
                    return None, "connection broke before a ClientHello"
                if len(buf) <= seen:  # readable without new bytes: the client closed (FIN)
                    return None, "closed before a complete ClientHello"
                seen = len(buf)
                result = parse_client_hello(buf)
                if isinstance(result, ClientHello):
                    return result, ""
                if not isinstance(result, Incomplete):
                    return None, f"not a TLS ClientHello: {result.reason}"
                if seen >= MAX_PEEK:
                    return None, "ClientHello too large"
                # readable again only once the bytes the parser still needs are in
                try:
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_RCVLOWAT, min(seen + result.at_least, MAX_PEEK)
                    )
                    lowat = True
                except OSError:
                    return None, "connection broke before a ClientHello"
                await trio.lowlevel.wait_readable(sock)
        finally:
            if lowat:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                except OSError:
                    pass

    def _refuse(self, sock: socket.socket, result: str, **fields: object) -> None:
        self._outcome[result].inc()
        log_entry("connection", event="refused", **fields)
        try:  # consume the peeked bytes: closing with unread data would send a reset
            sock.recv(MAX_PEEK)
        except OSError:
            pass

    async def handle_socket(self, sock: socket.socket, addr: tuple) -> None:
        """One accepted connection. Whatever this leaves open of `sock`, the acceptor closes.
        Over the listener's connection limit it is closed at once, before the ClientHello
        is read: no TLS work for a connection that cannot be served."""
        if not self.conn_limit.try_enter():
            return
        try:
            await self._handle_socket(sock, addr)
        finally:
            self.conn_limit.leave()

    async def _handle_socket(self, sock: socket.socket, addr: tuple) -> None:
        start = time.perf_counter()
        client_ip = addr[0]
        hello: ClientHello | None = None
        why = ""
        with trio.move_on_after(self.cfg.hello_timeout):
            hello, why = await self.peek_hello(sock)
        if hello is None:
            self._refuse(
                sock,
                "no_client_hello",
                client=client_ip,
                sni=None,
                reason=why or "no complete ClientHello in time",
            )
            return
        route = self.cfg.route_for(hello.sni)
        if route is None:
            self._refuse(
                sock,
                "unknown_sni",
                client=client_ip,
                sni=hello.sni,
                reason="no route for this SNI" if hello.sni else "no SNI and no default route",
            )
            return
        if route.mode is Mode.PASSTHROUGH:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            await self.passthrough(stream, route, client_ip, hello.sni, start)  # closes the stream
            return
        sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )  # as trio's streams: no Nagle delay
        tls = SocketTLSStream(sock, self.contexts[route.host])  # takes the descriptor over
        try:
            result, error = await self._handshake(tls)
            self._outcome[result].inc()
            if error is not None:
                log_entry(
                    "connection",
                    client=client_ip,
                    sni=hello.sni,
                    event="tls_failed",
                    result=result,
                    reason=error,
                )
                return
            client = ClientConn(client_ip, hello.sni, route, tls.getpeercert(binary_form=True))
            await self.proxy.serve(tls, client)
        finally:
            tls.close_now()

    async def _handshake(self, tls: SocketTLSStream) -> tuple[str, str | None]:
        """(result label, error or None)."""
        with trio.move_on_after(self.cfg.handshake_timeout):
            try:
                await tls.do_handshake()
            except OSError as exc:  # ssl.SSLError included
                tls_error = isinstance(exc, ssl.SSLError) and not isinstance(
                    exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)
                )
                # a TLS error is a failure; a reset, broken pipe or EOF: the client went away
                return ("failure" if tls_error else "aborted"), f"{type(exc).__name__}: {exc}"[:200]
            return ("resumed" if tls.session_reused else "full"), None
        return "timeout", f"no TLS handshake within {self.cfg.handshake_timeout:g} s"

    async def passthrough(
        self, tcp: trio.SocketStream, route: Route, client_ip: str, sni: str | None, start: float
    ) -> None:
        """Relay the connection, the peeked ClientHello included (still unread), to the backend."""
        balancer = self.balancers[route.host]
        state = balancer.pick()
        backend_ep = str(state.endpoint) if state else None
        up: trio.abc.Stream | None = None
        stats = None
        error = None
        counted = False
        try:
            if state is None:
                raise UpstreamError(f"no healthy endpoint for {route.host}", 503)
            self._check_upstream_limit(route, balancer)
            state.active += 1
            counted = True
            up = await open_tcp(
                state.endpoint.host, state.endpoint.port, local_address=route.source_address
            )
            if route.proxy_protocol is not None:
                await up.send_all(_proxy_header(tcp, route.proxy_protocol))
            stats = await relay(tcp, up)
        except UpstreamError as exc:
            error = str(exc)
        except HANDSHAKE_ERRORS as exc:
            error = repr(exc)
        finally:
            if counted and state is not None:
                state.active -= 1
            with trio.CancelScope(shield=True):  # both close, even when cancelled
                if up is not None:
                    await trio.aclose_forcefully(up)
                await trio.aclose_forcefully(tcp)
            self._record_passthrough(route, client_ip, sni, backend_ep, stats, error, start)

    def _check_upstream_limit(self, route: Route, balancer: Balancer) -> None:
        if sum(s.active for s in balancer.states) >= self.cfg.limits.max_upstream_connections:
            self.metrics.upstream_refusals.labels(route.host).inc()
            raise UpstreamError(
                f"upstream connection limit ({self.cfg.limits.max_upstream_connections}) reached",
                503,
            )

    def _record_passthrough(
        self,
        route: Route,
        client_ip: str,
        sni: str | None,
        backend_ep: str | None,
        stats: RelayStats | None,
        error: str | None,
        start: float,
    ) -> None:
        """Metrics and the access log line of one passthrough connection."""
        dur = time.perf_counter() - start
        up_bytes = stats.a_to_b if stats else 0
        down_bytes = stats.b_to_a if stats else 0
        # a connection, not a request: no status (meshcar_edge_connections_total)
        self.metrics.observe_passthrough(route.host, error, up_bytes, down_bytes, dur)
        log_entry(
            "connection",
            client=client_ip,
            sni=sni,
            mode="passthrough",
            backend=backend_ep,
            bytes_up=up_bytes,
            bytes_down=down_bytes,
            duration_ms=round(dur * 1000, 3),
            spliced=stats.spliced if stats else False,
            error=error,
        )


def _proxy_header(tcp: trio.SocketStream, version: str) -> bytes:
    """The PROXY protocol header (v1 or v2) naming the client and the address it reached."""
    src = tcp.socket.getpeername()[:2]
    dst = tcp.socket.getsockname()[:2]
    return pp.encode_v2(src, dst) if version == "v2" else pp.encode_v1(src, dst)
