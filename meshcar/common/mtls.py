"""The one mTLS dialer: the sidecar's outbound (to peer sidecars) and the edge's bridge routes
(to backend sidecars) both dial through it.

Theory of operation: `dial(peer)` opens TCP, then TLS with the credential store's *current*
client context (so a renewed certificate or trust bundle is used from the next dial on),
offering the last TLS session seen for that endpoint *with that context* (`tls/sessions.py`:
a session never outlives the context that made it, so a credential swap means one full
handshake). Connect and handshake are each bounded by `connect_timeout` (`net/connect.py`:
504 on timeout, 502 on failure). The peer's SVID must carry the SPIFFE ID the `MeshPeer`
names, else the connection is closed and the dial fails with 502 before any request is
sent. Handshakes are counted in `meshcar_tls_handshakes_total{direction,result}` (full,
resumed, failure) and connections in `meshcar_upstream_connections_total{upstream}`.
`remember_session` (the pool's `on_release`) keeps a new connection's session once.

Everything a dial needs is in a `MeshPeer` the caller builds once per endpoint, and metric
children are resolved once per label, so a dial allocates nothing beyond the connection.
The dialer does not know pools: the caller wraps `dial` in its `Pool(dial(key))` callable,
and per-upstream connection limits stay the pool's job.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from meshcar.admin.metrics import Metrics
from meshcar.errors import IdentityError, UpstreamError
from meshcar.net.connect import open_tls
from meshcar.net.httpconn import HttpConn
from meshcar.net.pool import Pooled
from meshcar.net.tls_memory_bio import TLSStream
from meshcar.tls.sessions import SessionCache
from meshcar.tls.store import CredentialStore
from meshcar.tls.svid import svid_from_der


@dataclass(frozen=True, slots=True)
class MeshPeer:
    """One endpoint to dial, and who must answer there."""

    host: str
    port: int
    spiffe_id: str  # the SPIFFE ID the peer's certificate must carry
    upstream: str  # metrics label (the sidecar's upstream name, the edge's route host)
    endpoint: Any  # carried into `Pooled.endpoint`; also the session-cache key


class MTLSDialer:
    """Dial mTLS peers (TLS 1.3, SPIFFE ID checked) for a pool."""

    def __init__(
        self,
        store: CredentialStore,
        metrics: Metrics,
        direction: str,
        connect_timeout: float = 5.0,
        *,
        context: Callable[[], ssl.SSLContext] | None = None,
    ) -> None:
        self.store = store
        # the current client context (opaque TCP tunnels pass store.tcp_client_context)
        self._context = context or store.client_context
        self.metrics = metrics
        self.connect_timeout = connect_timeout
        self._sessions = SessionCache()
        hs = metrics.handshakes
        self._full = hs.labels(direction, "full")
        self._resumed = hs.labels(direction, "resumed")
        self._failure = hs.labels(direction, "failure")
        self._opened: dict[str, Any] = {}  # upstream -> its pool_connections child

    async def dial(self, key: str, peer: MeshPeer, timeout: float | None = None) -> Pooled:
        """A verified mTLS connection to `peer`, wrapped for pool `key`. Raises UpstreamError
        (502 refused/failed/wrong identity, 504 timed out); `timeout`: else connect_timeout."""
        try:
            ctx = self._context()
            stream = await open_tls(
                peer.host,
                peer.port,
                ctx,
                timeout=self.connect_timeout if timeout is None else timeout,
                session=self._sessions.get(peer.endpoint, ctx),
            )
        except UpstreamError:
            self._failure.inc()
            raise
        (self._resumed if stream.session_reused else self._full).inc()
        try:
            svid = svid_from_der(stream.getpeercert(binary_form=True))
            if svid.spiffe_id != peer.spiffe_id:
                raise IdentityError(
                    f"peer at {peer.endpoint} is {svid.spiffe_id}, expected {peer.spiffe_id}"
                )
        except IdentityError as exc:
            await trio.aclose_forcefully(stream)
            raise UpstreamError(f"upstream {peer.upstream}: {exc}", 502) from None
        opened = self._opened.get(peer.upstream)
        if opened is None:
            opened = self._opened[peer.upstream] = self.metrics.pool_connections.labels(
                peer.upstream
            )
        opened.inc()
        return Pooled(HttpConn(stream, "response"), key, peer.endpoint, svid)

    def remember_session(self, p: Pooled) -> None:
        """Keep the TLS session of a new connection for the next dial to its endpoint (once
        per connection: TLS 1.3 tickets arrive with the first response, and reading
        `.session` is costly)."""
        stream = p.conn.stream
        if p.requests == 0 and isinstance(stream, TLSStream):
            self._sessions.put(p.endpoint, stream.context, stream.session)
