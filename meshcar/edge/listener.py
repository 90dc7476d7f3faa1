"""The edge's public TLS listener: peek the ClientHello, then hand the connection on by SNI.

Theory of operation: bytes are read (not decrypted) until `parse_client_hello` has a
complete hello, rejects the bytes, or the size/time bound is hit; garbage and timeouts
close the connection cleanly. The route is chosen by SNI (or the default route). A
passthrough route relays every byte, the peeked ones first, to the backend's own TLS
server, optionally after a PROXY v1/v2 header with the real client address; only a TCP
entry is logged. terminate/bridge routes get a TLS server over a stream that replays the
peeked bytes, with the route's own certificate (Mozilla "intermediate" profile) and
optional client-certificate verification, then the L7 handler.
"""

from __future__ import annotations

import json
import logging
import ssl
import time

import trio

from meshcar.admin.metrics import Metrics
from meshcar.edge.config import EdgeConfig, Route
from meshcar.edge.http import L7, ClientConn
from meshcar.edge.policy import Balancer
from meshcar.errors import UpstreamError
from meshcar.net.connect import open_tcp
from meshcar.net.direct import DirectStream
from meshcar.net.errors import HANDSHAKE_ERRORS
from meshcar.net.prefixed import PrefixedStream
from meshcar.net.relay import relay
from meshcar.net.tlsstream import TLSStream
from meshcar.proto import proxy_protocol as pp
from meshcar.proto.clienthello import ClientHello, Incomplete, parse_client_hello
from meshcar.sidecar.accesslog import log_entry

log = logging.getLogger("meshcar.edge")

MAX_PEEK = 16 * 1024 + 5 * 16  # the parser's bound plus record headers

# Mozilla "intermediate" (TLS 1.2 ciphers; TLS 1.3 suites are all allowed by OpenSSL). The
# DHE suites are in Mozilla's list but need DH parameters, which the edge does not load:
# in practice TLS 1.2 key exchange is ECDHE only.
INTERMEDIATE_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
])


def public_server_context(route: Route) -> ssl.SSLContext:
    """The TLS server context of a terminate/bridge host (Mozilla intermediate profile)."""
    assert route.cert_file and route.key_file
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION  # the client's cipher order counts, as Mozilla advises
    ctx.load_cert_chain(str(route.cert_file), str(route.key_file))
    ctx.set_alpn_protocols(["http/1.1"])
    if route.client_auth is not None:
        ctx.load_verify_locations(cafile=str(route.client_auth.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if route.client_auth.mode == "required" else ssl.CERT_OPTIONAL
    return ctx


class TLSListener:
    def __init__(self, cfg: EdgeConfig, l7: L7, balancers: dict[str, Balancer], metrics: Metrics) -> None:
        self.cfg = cfg
        self.l7 = l7
        self.balancers = balancers
        self.metrics = metrics
        self.contexts = {r.host: public_server_context(r) for r in cfg.routes if r.mode != "passthrough"}
        self.handshake_timeout = 10.0

    async def peek_hello(self, tcp: trio.abc.Stream) -> tuple[bytes, ClientHello | None, str]:
        """(bytes read, the hello or None, why not)."""
        buf = b""
        with trio.move_on_after(self.cfg.hello_timeout):
            while len(buf) < MAX_PEEK:
                data = await tcp.receive_some(MAX_PEEK - len(buf))
                if not data:
                    return buf, None, "closed before a complete ClientHello"
                buf += data
                result = parse_client_hello(buf)
                if isinstance(result, ClientHello):
                    return buf, result, ""
                if not isinstance(result, Incomplete):
                    return buf, None, f"not a TLS ClientHello: {result.reason}"
            return buf, None, "ClientHello too large"
        return buf, None, "no complete ClientHello in time"

    async def handle_connection(self, tcp: trio.SocketStream) -> None:
        start = time.perf_counter()
        try:
            client_ip = tcp.socket.getpeername()[0]
        except OSError:
            await trio.aclose_forcefully(tcp)
            return
        direct = DirectStream(tcp)
        try:
            peeked, hello, why = await self.peek_hello(direct)
        except HANDSHAKE_ERRORS:
            peeked, hello, why = b"", None, "connection broke before a ClientHello"
        if hello is None:
            self.metrics.handshakes.labels("edge", "no_client_hello").inc()
            log_entry("connection", client=client_ip, sni=None, event="refused", reason=why)
            await trio.aclose_forcefully(tcp)
            return
        route = self.cfg.route_for(hello.sni)
        if route is None:
            self.metrics.handshakes.labels("edge", "unknown_sni").inc()
            log_entry("connection", client=client_ip, sni=hello.sni, event="refused",
                      reason="no route for this SNI" if hello.sni else "no SNI and no default route")
            await trio.aclose_forcefully(tcp)
            return
        if route.mode == "passthrough":
            await self.passthrough(tcp, peeked, route, client_ip, hello.sni, start)
            return
        tls = TLSStream(PrefixedStream(direct, peeked), self.contexts[route.host], server_side=True)
        try:
            with trio.fail_after(self.handshake_timeout):
                await tls.do_handshake()
        except HANDSHAKE_ERRORS as exc:
            self.metrics.handshakes.labels("edge", "failure").inc()
            log_entry("connection", client=client_ip, sni=hello.sni, event="tls_failed",
                      reason=f"{type(exc).__name__}: {exc}"[:200])
            await trio.aclose_forcefully(tcp)
            return
        self.metrics.handshakes.labels("edge", "resumed" if tls.session_reused else "full").inc()
        client = ClientConn(client_ip, hello.sni, route, tls.getpeercert(binary_form=True))
        await self.l7.serve(tls, client)

    async def passthrough(self, tcp: trio.SocketStream, peeked: bytes, route: Route, client_ip: str,
                          sni: str | None, start: float) -> None:
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
            state.active += 1
            counted = True
            up = await open_tcp(state.endpoint.host, state.endpoint.port)
            header = b""
            if route.proxy_protocol is not None:
                src = tcp.socket.getpeername()[:2]
                dst = tcp.socket.getsockname()[:2]
                header = pp.encode_v2(src, dst) if route.proxy_protocol == "v2" else pp.encode_v1(src, dst)
            await up.send_all(header + peeked)
            stats = await relay(tcp, up)
        except UpstreamError as exc:
            error = str(exc)
        except HANDSHAKE_ERRORS as exc:
            error = repr(exc)
        finally:
            if counted and state is not None:
                state.active -= 1
            if up is not None:
                await trio.aclose_forcefully(up)
            await trio.aclose_forcefully(tcp)
            dur = time.perf_counter() - start
            self.metrics.observe_request("edge-passthrough", 0 if error is None else 502, dur)
            self.metrics.observe_edge(route.host, "passthrough", 0 if error is None else 502,
                                      len(peeked) + (stats.a_to_b if stats else 0),
                                      stats.b_to_a if stats else 0)
            log_entry("connection", client=client_ip, sni=sni, mode="passthrough", backend=backend_ep,
                      bytes_up=len(peeked) + (stats.a_to_b if stats else 0),
                      bytes_down=stats.b_to_a if stats else 0, duration_ms=round(dur * 1000, 3),
                      spliced=stats.spliced if stats else False, error=error)


def _event(name: str, **fields: object) -> None:
    log.info(json.dumps({"event": name, **fields}, default=str))
