"""Inbound: the mTLS mesh listener in front of the app.

Each connection: TLS 1.3 handshake requiring a client certificate that chains to the trust
bundle (OpenSSL checks chain and dates), then the SPIFFE rules on the leaf (`tls.svid`),
then per request: the request target normalised (`proto.path`; 400 when it cannot be,
and the app receives the normalised target), the caller's identity against the allow list
(403 with a clear body otherwise), client-sent identity headers removed, our own XFCC
added, and the request forwarded to the app on localhost over a keep-alive pool.

Permissive mode (`inbound.permissive`, off by default; migration to the mesh): the first
byte of each connection is peeked (left in the socket). 0x16, a TLS handshake record, goes
the mTLS path above unchanged; anything else is served as plaintext HTTP/1.1 from a caller
without identity: the caller `unauthenticated` in the access log (`peer`), the metrics'
peer label and the authorizer, where only a policy naming `unauthenticated` in its `from`
admits it (common/authz.py; the allow list and `*` never do: 403, deny reason
`unauthenticated`). The app gets no XFCC but `X-Meshcar-Authenticated: false`; client-sent
identity headers are removed as always. Opaque TCP tunnels (ALPN) stay mTLS only.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import trio

from meshcar.admin.metrics import Metrics
from meshcar.common.accesslog import log_request
from meshcar.common.authz import UNAUTHENTICATED, Authorizer, Verdict
from meshcar.errors import IdentityError
from meshcar.net.drain import Drain
from meshcar.net.errors import HANDSHAKE_ERRORS
from meshcar.net.forward import request_bytes
from meshcar.net.httpconn import HttpConn
from meshcar.net.httpserver import serve_http
from meshcar.net.limits import ConnectionLimit
from meshcar.net.pipeline import Decision, Forward, Outcome, carry_out
from meshcar.net.pool import Pool
from meshcar.net.respond import Refuse, reason_of
from meshcar.net.tls_memory_bio import TLSStream
from meshcar.proto.headers import IDENTITY_HEADERS, UNAUTHENTICATED_MARKER, clean_headers
from meshcar.proto.http1 import RequestHead
from meshcar.proto.path import PathError, normalise_target
from meshcar.proto.trace import stamp
from meshcar.sidecar.config import SidecarConfig
from meshcar.sidecar.dialers import AppDialer
from meshcar.sidecar.tcp import ALPN_TCP, TcpInbound
from meshcar.tls.store import CredentialStore
from meshcar.tls.svid import PeerIdentity, svid_from_der

log = logging.getLogger("meshcar.inbound")


def xfcc_value(by: str, peer: PeerIdentity) -> bytes:
    """Envoy's X-Forwarded-Client-Cert format: By=<us>;Hash=<sha256 of peer DER>;URI=<peer>."""
    return f"By={by};Hash={peer.cert_sha256};URI={peer.spiffe_id}".encode()


class Inbound:
    def __init__(self, cfg: SidecarConfig, store: CredentialStore, metrics: Metrics) -> None:
        self.cfg = cfg
        self.store = store
        self.metrics = metrics
        self.allow = frozenset(cfg.allow)
        self.authz = Authorizer(cfg.allow, cfg.policies)  # compiled once (common/authz.py)
        self._decisions: dict[Verdict, Any] = {}  # metric children by verdict
        self.upgrades = metrics.upgrades("inbound")  # WebSocket etc. (net/upgrade.py)
        self.drain: Drain | None = None  # set by the process that owns the listeners
        self.response_timeout = (
            cfg.timeouts.response_head
        )  # seconds to wait for the app's response head
        self.pool = Pool(
            AppDialer(cfg.app).dial,
            max_connections=cfg.limits.max_upstream_connections,
            on_refused=lambda g: metrics.upstream_refusals.labels("app").inc(),
        )
        self.conn_limit = ConnectionLimit(
            "inbound",
            cfg.limits.max_connections,
            lambda n: metrics.listener_refusals.labels(n).inc(),
        )
        self.handshake_timeout = 10.0
        self.tcp = TcpInbound(cfg, metrics, self.allow)  # ALPN meshcar-tcp/1 (inbound.tcp)
        self.upstream_name = f"app at {cfg.app}"  # in the answer to an app error
        self._h2: Any = None  # sidecar/h2.py's H2Proxy, on the first h2 connection

    def reconfigure(self, cfg: SidecarConfig) -> Callable[[], None]:
        """A config reload (common/reload.py): the new allow list and policies, compiled
        now (this may raise ConfigError); the returned function swaps them in. A request
        reads them once, when it is decided; a TCP tunnel when it is opened."""
        allow, authz = frozenset(cfg.allow), Authorizer(cfg.allow, cfg.policies)

        def commit() -> None:
            self.cfg, self.allow, self.authz = cfg, allow, authz
            self.tcp.allow = allow

        return commit

    async def aclose(self) -> None:
        await self.pool.close_all()

    async def handle_connection(self, tcp: trio.SocketStream) -> None:
        """Over the listener's connection limit, close before the TLS handshake (a handshake
        costs the CPU the limit protects); else serve the connection."""
        if not self.conn_limit.try_enter():
            await trio.aclose_forcefully(tcp)
            return
        try:
            await self._serve_connection(tcp)
        finally:
            self.conn_limit.leave()

    async def _serve_connection(self, tcp: trio.SocketStream) -> None:
        if self.cfg.permissive:
            first = await self._first_byte(tcp)
            if not first:  # closed, or nothing within the handshake timeout
                await trio.aclose_forcefully(tcp)
                return
            if first != b"\x16":  # not a TLS handshake record: a plaintext caller
                await self._serve_plaintext(tcp)
                return
        ssl_stream = TLSStream(tcp, self.store.server_context(), server_side=True)
        try:
            with trio.fail_after(self.handshake_timeout):
                await ssl_stream.do_handshake()
        except HANDSHAKE_ERRORS as exc:
            self.metrics.handshakes.labels("inbound", "failure").inc()
            log.info(
                json.dumps(
                    {
                        "type": "connection",
                        "direction": "inbound",
                        "event": "tls_failed",
                        "error": _short(exc),
                    }
                )
            )
            await trio.aclose_forcefully(tcp)
            return
        self.metrics.handshakes.labels(
            "inbound", "resumed" if ssl_stream.session_reused else "full"
        ).inc()
        try:
            peer: PeerIdentity | None = svid_from_der(
                ssl_stream.getpeercert(binary_form=True), trust_domain=self.cfg.trust_domain
            )
            problem = ""
        except IdentityError as exc:
            peer, problem = None, str(exc)
        if ssl_stream.selected_alpn_protocol() == ALPN_TCP:
            await self.tcp.serve(ssl_stream, tcp, peer, problem)  # opaque TCP tunnel
            return
        if ssl_stream.selected_alpn_protocol() == "h2":  # HTTP/2 from a peer (sidecar/h2.py)
            who = {"peer": peer.spiffe_id if peer else None}
            decide = lambda req: self.decide(req, peer, problem)  # noqa: E731
            await self.h2().serve(ssl_stream, decide, who, self.drain)
            return
        conn = HttpConn(ssl_stream, "request", self.cfg.http.headers)
        await serve_http(
            conn,
            lambda req, c: self.handle_request(req, c, peer, problem),
            drain=self.drain,
            timeouts=self.cfg.timeouts,
        )

    async def _first_byte(self, tcp: trio.SocketStream) -> bytes:
        """inbound.permissive: the connection's first byte, peeked (it stays in the socket);
        b"" when the caller closed or sent nothing within the handshake timeout."""
        with trio.move_on_after(self.handshake_timeout):
            try:
                return bytes(await tcp.socket.recv(1, socket.MSG_PEEK))
            except OSError:
                return b""
        return b""

    async def _serve_plaintext(self, tcp: trio.SocketStream) -> None:
        """A plaintext HTTP/1.1 caller in permissive mode: no identity (module docstring)."""
        conn = HttpConn(tcp, "request", self.cfg.http.headers)
        await serve_http(
            conn,
            lambda req, c: self.handle_request(req, c, None, "", plain=True),
            drain=self.drain,
            timeouts=self.cfg.timeouts,
        )

    def h2(self) -> Any:
        """The HTTP/2 side, made (and h2 imported) when the first h2 connection arrives; to
        the app as `app.protocol` says (h2c, or HTTP/1.1)."""
        if self._h2 is None:
            from meshcar.sidecar.h2 import AppPicker, H2Proxy

            self._h2 = H2Proxy("inbound", AppPicker(self.cfg), self.metrics, "path")
        return self._h2

    async def handle_request(
        self,
        req: RequestHead,
        down: HttpConn,
        peer: PeerIdentity | None,
        problem: str,
        plain: bool = False,
    ) -> bool:
        """`plain`: a plaintext caller taken in permissive mode (no identity)."""
        start = time.perf_counter()
        out = Outcome()
        hop = stamp(req.headers)  # x-request-id kept, traceparent: this hop's span (proto/trace.py)
        decision, path, verdict = self._decide(req, peer, problem, plain)
        who = UNAUTHENTICATED if plain else peer.spiffe_id if peer else None
        try:
            out = await carry_out(down, req, decision, self.cfg.timeouts, "inbound")
            return out.keep
        finally:
            dur = time.perf_counter() - start
            self.metrics.observe_request("inbound", out.status, dur)
            self.metrics.observe_peer("inbound", who, out.status)
            log_request(
                direction="inbound",
                **hop.fields(),
                peer=who,
                method=req.method.decode("latin-1"),
                path=path,
                status=out.status,
                bytes_in=out.bytes_in,
                bytes_out=out.bytes_out,
                duration_ms=round(dur * 1000, 3),
                reason=reason_of(out.status, decision, out.error),
                **_authz_fields(verdict),
            )

    def decide(
        self, req: RequestHead, peer: PeerIdentity | None, problem: str
    ) -> tuple[Decision, str]:
        """Refuse (400: the target cannot be normalised; 403: the caller is not allowed) or
        forward to the app; and the path to log."""
        decision, path, _ = self._decide(req, peer, problem)
        return decision, path

    def _decide(
        self, req: RequestHead, peer: PeerIdentity | None, problem: str, plain: bool = False
    ) -> tuple[Decision, str, Verdict | None]:
        """decide(), and the authorization verdict (None: refused before it). `plain`: the
        caller is unauthenticated (permissive mode); only a rule naming it admits it."""
        try:
            norm = normalise_target(req.target, req.method, self.cfg.http.path)
        except PathError as exc:
            return Refuse(400, str(exc)), req.target.decode("latin-1"), None
        target = norm.target
        path = target.decode("ascii")
        me = self.cfg.identity.spiffe_id
        host = (req.header(b"host") or b"").decode("latin-1")
        caller = UNAUTHENTICATED if plain else peer.spiffe_id if peer else None
        verdict = self.authz.decide(caller, host, req.method.decode("latin-1"), norm.path)
        self._count(verdict)
        if plain and verdict.allowed:
            headers = clean_headers(req.headers, drop=IDENTITY_HEADERS)
            headers.append(UNAUTHENTICATED_MARKER)  # and no XFCC: no identity to assert
        elif peer is None or not verdict.allowed:
            if plain:
                msg = f"unauthenticated (plaintext) callers may not call {me}: {verdict.detail}"
            elif peer is None:
                msg = f"caller certificate rejected: {problem}"
            elif verdict.reason == "caller":
                msg = f"{peer.spiffe_id} is not allowed to call {me}"
            else:
                msg = f"{peer.spiffe_id} is not allowed to call {me}: {verdict.detail}"
            self.metrics.authz_denials.labels(caller or "invalid").inc()
            return Refuse(403, msg), path, verdict
        else:
            headers = clean_headers(req.headers, drop=IDENTITY_HEADERS)
            headers.append((b"X-Forwarded-Client-Cert", xfcc_value(me, peer)))
        forward = Forward(
            request_bytes(req, target, headers),
            self.pool,
            "app",
            self.upstream_name,
            response_timeout=self.response_timeout,
            upgrades=self.upgrades,
        )
        return forward, path, verdict

    def _count(self, verdict: Verdict) -> None:
        child = self._decisions.get(verdict)
        if child is None:
            child = self.metrics.authz_decisions.labels(
                verdict.decision, verdict.policy, verdict.reason
            )
            if len(self._decisions) < 1024:  # verdicts carry a detail string: keep it bounded
                self._decisions[verdict] = child
        child.inc()

    def explain(self, query: dict[str, str]) -> tuple[int, dict]:
        """GET /authz/explain (admin, loopback only): the rule table and, given caller, method,
        path (and host), the decision for that request with the rule that made it."""
        out: dict[str, Any] = {
            "service": self.cfg.identity.spiffe_id,
            "default": "deny",
            "policies": self.authz.table(),
        }
        if not query:
            return 200, out
        if set(query) == {"caller"}:  # what may this caller call: the rules naming it
            out["rules_naming_caller"] = [r.name for r in self.authz.candidates(query["caller"])]
            return 200, out
        missing = [k for k in ("caller", "method", "path") if not query.get(k)]
        if missing:
            return 400, {**out, "error": f"explain needs {', '.join(missing)} (host optional)"}
        try:
            norm = normalise_target(
                query["path"].encode("latin-1"), query["method"].encode(), self.cfg.http.path
            )
        except (PathError, UnicodeEncodeError) as exc:
            return 200, {**out, "request": query, "decision": "refused (400)", "detail": str(exc)}
        v = self.authz.decide(
            query["caller"], query.get("host", ""), query["method"].upper(), norm.path
        )
        out.update(
            request={**query, "normalised_path": norm.path},
            decision=v.decision,
            policy=v.policy,
            reason=v.reason,
            detail=v.detail,
        )
        return 200, out


def _authz_fields(verdict: Verdict | None) -> dict[str, str]:
    """The access log's authorization fields: deny_reason when refused or would be."""
    if verdict is None or verdict.decision == "allow":
        return {}
    return {
        "authz": verdict.decision,
        "authz_policy": verdict.policy,
        "deny_reason": verdict.reason,
    }


def _short(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}"[:200]
