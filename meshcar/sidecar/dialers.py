"""Dialers for the sidecar's pools: mTLS to peer sidecars, plain TCP to the local app.

Mesh connections are dialed with the credential store's current client context (so a
renewed certificate is used from the next dial on), resume the last TLS session seen for
that endpoint, and are checked against the upstream's expected SPIFFE ID before any
request is sent on them.
"""

from __future__ import annotations

import itertools

import trio

from meshcar.admin.metrics import Metrics
from meshcar.errors import IdentityError, UpstreamError
from meshcar.net.connect import open_tcp, open_tls
from meshcar.net.httpconn import HttpConn
from meshcar.net.pool import Pooled
from meshcar.net.tlsstream import TLSStream
from meshcar.sidecar.config import HostPort, Upstream
from meshcar.tls.sessions import SessionCache
from meshcar.tls.store import CredentialStore
from meshcar.tls.svid import svid_from_der


class MeshDialer:
    """Dial peer sidecars over mTLS (TLS 1.3) and verify their SPIFFE ID."""

    def __init__(self, store: CredentialStore, upstreams: dict[str, Upstream], metrics: Metrics,
                 connect_timeout: float = 5.0) -> None:
        self.store = store
        self.upstreams = upstreams
        self.metrics = metrics
        self.connect_timeout = connect_timeout
        self._rr = {name: itertools.cycle(u.endpoints) for name, u in upstreams.items()}
        self._sessions = SessionCache()

    async def dial(self, name: str) -> Pooled:
        up = self.upstreams[name]
        ep = next(self._rr[name])
        try:
            ctx = self.store.client_context()
            stream = await open_tls(ep.host, ep.port, ctx, session=self._sessions.get(ep, ctx),
                                    timeout=self.connect_timeout)
        except UpstreamError:
            self.metrics.handshakes.labels("outbound", "failure").inc()
            raise
        self.metrics.handshakes.labels("outbound", "resumed" if stream.session_reused else "full").inc()
        try:
            peer = svid_from_der(stream.getpeercert(binary_form=True))
            if peer.spiffe_id != up.spiffe_id:
                raise IdentityError(f"peer at {ep} is {peer.spiffe_id}, expected {up.spiffe_id}")
        except IdentityError as exc:
            await trio.aclose_forcefully(stream)
            raise UpstreamError(f"upstream {name}: {exc}", 502) from None
        self.metrics.pool_connections.labels(name).inc()
        return Pooled(HttpConn(stream, "response"), name, ep, peer)

    def remember_session(self, p: Pooled) -> None:
        """Keep the TLS session of a new connection for the next dial (once per connection:
        TLS 1.3 tickets arrive with the first response, and reading `.session` is costly)."""
        stream = p.conn.stream
        if p.requests == 0 and isinstance(stream, TLSStream):
            self._sessions.put(p.endpoint, stream.context, stream.session)


class AppDialer:
    """Dial the local app over plain TCP (it is on localhost, inside the pod)."""

    def __init__(self, app: HostPort, connect_timeout: float = 5.0) -> None:
        self.app = app
        self.connect_timeout = connect_timeout

    async def dial(self, key: str) -> Pooled:
        stream = await open_tcp(self.app.host, self.app.port, self.connect_timeout)
        return Pooled(HttpConn(stream, "response", quickack=True), key, self.app)  # app-facing
