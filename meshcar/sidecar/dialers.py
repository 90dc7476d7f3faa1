"""Dialers for the sidecar's pools: mTLS to peer sidecars, plain TCP to the local app.

Mesh connections go through the one mTLS dialer both roles share (`common/mtls.py`: current
client context, session resumption per context, SPIFFE ID check, connect timeouts); this
module only picks the upstream's next endpoint (round robin).
"""

from __future__ import annotations

import itertools
import ssl
from collections.abc import Awaitable, Callable

from meshcar.admin.metrics import Metrics
from meshcar.common.mtls import MeshPeer, MTLSDialer
from meshcar.net.connect import open_tcp
from meshcar.net.httpconn import HttpConn
from meshcar.net.pool import Pooled
from meshcar.sidecar.config import HostPort, Upstream
from meshcar.tls.store import CredentialStore


class MeshDialer:
    """Dial an upstream's endpoints in turn over mTLS (direction "outbound")."""

    def __init__(
        self,
        store: CredentialStore,
        upstreams: dict[str, Upstream],
        metrics: Metrics,
        connect_timeout: float = 5.0,
        *,
        context: Callable[[], ssl.SSLContext] | None = None,  # opaque TCP: its own ALPN
    ) -> None:
        self.mtls = MTLSDialer(store, metrics, "outbound", connect_timeout, context=context)
        self.remember_session = self.mtls.remember_session
        self._rr = {
            name: itertools.cycle(
                [MeshPeer(ep.host, ep.port, u.spiffe_id, name, ep) for ep in u.endpoints]
            )
            for name, u in upstreams.items()
        }

    def dial(self, name: str) -> Awaitable[Pooled]:
        # returns the shared dialer's coroutine itself: no extra frame per dial
        return self.mtls.dial(name, next(self._rr[name]))


class AppDialer:
    """Dial the local app over plain TCP (it is on localhost, inside the pod)."""

    def __init__(self, app: HostPort, connect_timeout: float = 5.0) -> None:
        self.app = app
        self.connect_timeout = connect_timeout

    async def dial(self, key: str) -> Pooled:
        stream = await open_tcp(self.app.host, self.app.port, self.connect_timeout)
        return Pooled(HttpConn(stream, "response", quickack=True), key, self.app)  # app-facing
