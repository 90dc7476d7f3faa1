"""SSLContext builders for the mesh: TLS 1.3 only, mutual authentication, SPIFFE trust bundle.

Key exchange over X25519, P-256 and P-384 only (Mozilla "modern"; `meshcar_tlsprofile`).

Hostname checks are off on purpose: mesh peers are identified by the SPIFFE ID in their URI
SAN, which callers check after the handshake (`meshcar.tls.svid`). Chain, dates and
signatures are still verified by OpenSSL against the trust bundle.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from meshcar_tlsprofile import apply_profile

# ALPN id of an opaque TCP connection between sidecars (`protocol: tcp`, docs/CONFIG.md):
# the inbound offers it after http/1.1, so only a dialer offering nothing else selects it.
ALPN_TCP = "meshcar-tcp/1"


def _common(
    ctx: ssl.SSLContext,
    chain_file: Path,
    key_file: Path,
    bundle_pem: str,
    alpn: tuple[str, ...] = ("http/1.1",),
) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(chain_file), str(key_file))
    ctx.load_verify_locations(cadata=bundle_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(list(alpn))
    return apply_profile(ctx)  # X25519/P-256/P-384 only; the client's suite order


def mesh_server_context(chain_file: Path, key_file: Path, bundle_pem: str) -> ssl.SSLContext:
    """Inbound mesh listener: requires a client certificate chaining to the bundle. ALPN is
    chosen in the server's order: h2 for an HTTP/2 dialer (it offers h2 first; an HTTP/1.1
    dialer offers only http/1.1), http/1.1 for HTTP clients, meshcar-tcp/1 for TCP tunnels."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    return _common(ctx, chain_file, key_file, bundle_pem, ("h2", "http/1.1", ALPN_TCP))


def mesh_tcp_client_context(chain_file: Path, key_file: Path, bundle_pem: str) -> ssl.SSLContext:
    """Outbound opaque TCP tunnels: as the client context, offering only meshcar-tcp/1."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    return _common(ctx, chain_file, key_file, bundle_pem, (ALPN_TCP,))


def mesh_client_context(chain_file: Path, key_file: Path, bundle_pem: str) -> ssl.SSLContext:
    """Outbound mesh connections: presents our SVID, verifies the peer's chain."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    return _common(ctx, chain_file, key_file, bundle_pem)
