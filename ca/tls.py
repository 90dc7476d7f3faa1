"""The TLS server context of the CA API.

Client certificates are OPTIONAL: a first-time workload has none and authenticates with a
token; a renewing workload presents its current SVID. OpenSSL checks that a presented
certificate chains to the bundle; the *time* check is switched off at the TLS layer
(X509_V_FLAG_NO_CHECK_TIME) on purpose, so an expired SVID still completes the handshake
and gets a clear 401 `bad_client_certificate` from `auth.check_renewal_certificate`, which
re-checks everything (validity period included) before any certificate is issued.
A certificate from a foreign CA still fails the handshake.
"""

from __future__ import annotations

import ssl

from .files import CAPaths

X509_V_FLAG_NO_CHECK_TIME = 0x200000  # OpenSSL's x509_vfy.h; not exported by the ssl module


def server_context(paths: CAPaths) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(paths.server_pem, paths.server_key)
    ctx.load_verify_locations(cafile=str(paths.bundle_pem))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.verify_flags |= X509_V_FLAG_NO_CHECK_TIME  # type: ignore[assignment]
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
