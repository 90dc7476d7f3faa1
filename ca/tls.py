"""The TLS server context of the CA API.

Client certificates are OPTIONAL: a first-time workload has none and authenticates with a
token; a renewing workload presents its current SVID. OpenSSL checks that a presented
certificate chains to the bundle; the *time* check is switched off at the TLS layer
(X509_V_FLAG_NO_CHECK_TIME) on purpose, so an expired SVID still completes the handshake
and gets a clear 401 `bad_client_certificate` from `auth.check_renewal_certificate`, which
re-checks everything (validity period included) before any certificate is issued.
A certificate from a foreign CA still fails the handshake.

`ServerTLS` keeps the context current while `serve` runs: when config.json changes (a root
rotation) it rebuilds it, so the trusted roots follow bundle.pem, and when
`intermediate.pem` changed (the end of a rotation) it first re-issues the API certificate
from it. During stages 1 and 2 of a rotation the API certificate therefore still chains to
the old root, which every client holds; it moves to the new root only when the old one is
retired, by which time every workload has received the new bundle.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from datetime import datetime

from meshcar_tlsprofile import apply_profile

from . import files
from .files import CAPaths
from .issuer import key_id, utcnow

X509_V_FLAG_NO_CHECK_TIME = 0x200000  # OpenSSL's x509_vfy.h; not exported by the ssl module


def server_context(paths: CAPaths, extra_roots_pem: str | None = None) -> ssl.SSLContext:
    """The API's context: server.pem/server.key; client certificates verified against
    bundle.pem plus `extra_roots_pem` (the roots of a Vault/OpenBao backend)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(paths.server_pem, paths.server_key)
    ctx.load_verify_locations(cafile=str(paths.bundle_pem))
    if extra_roots_pem:
        ctx.load_verify_locations(cadata=extra_roots_pem)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.verify_flags |= X509_V_FLAG_NO_CHECK_TIME  # type: ignore[assignment]
    # no session resumption: every renewal is authenticated by the certificate it presents
    # now, and issuing tickets nobody redeems (clients open a new context per request) cost
    # ~0.35 ms of CPU per client-certificate handshake (docs/PERFORMANCE.md)
    ctx.num_tickets = 0  # TLS 1.3
    ctx.options |= ssl.OP_NO_TICKET  # TLS 1.2
    ctx.set_alpn_protocols(["http/1.1"])
    return apply_profile(ctx)  # X25519/P-256/P-384 only; the client's cipher order


class ServerTLS:
    """The API's server context, rebuilt when the CA directory changes (see above)."""

    def __init__(
        self,
        paths: CAPaths,
        sans: list[str],
        extra_roots: Callable[[], str] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.paths = paths
        self.sans = list(sans)
        self.extra_roots = extra_roots
        self.clock = clock
        self._stamp: tuple[object, ...] | None = None
        self._api_issuer: str | None = None
        self._ctx: ssl.SSLContext | None = None
        # False in the other processes of `ca serve --workers N`: one process re-issues the
        # API certificate, the others load it when server.pem changes (part of the stamp)
        self.reissue = True

    def context(self) -> ssl.SSLContext:
        st = os.stat(self.paths.config)
        extra = self.extra_roots() if self.extra_roots else None
        try:
            pem = os.stat(self.paths.server_pem)
            served: tuple[int, int, int] | None = (pem.st_ino, pem.st_mtime_ns, pem.st_size)
        except OSError:
            served = None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size, served, extra)
        if stamp == self._stamp and self._ctx is not None:
            return self._ctx
        try:
            inter = files.load_cert(self.paths.intermediate_pem)
            if self.reissue and key_id(inter) != self._api_issuer:
                key = files.load_key(self.paths.intermediate_key)
                files.write_server_cert(self.paths, inter, key, self.sans, self.clock())
                self._api_issuer = key_id(inter)
            self._ctx = server_context(self.paths, extra)
            self._stamp = stamp
        except (OSError, ValueError, ssl.SSLError):
            if self._ctx is None:
                raise
        return self._ctx
