"""X509-SVID checks on a peer certificate that OpenSSL has already chain-verified.

OpenSSL verifies the chain to the trust bundle, validity dates and signatures during the
handshake; this module applies the SPIFFE rules on top: a leaf (not a CA, and no
keyCertSign or cRLSign key usage, as X509-SVID section 4.3 requires) with exactly one URI
SAN that is a valid SPIFFE ID, in the expected trust domain.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from cryptography import x509

import meshcar_spiffe
from meshcar.errors import IdentityError


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    spiffe_id: str
    cert_sha256: str  # hex digest of the DER certificate, for XFCC Hash=
    not_after: dt.datetime


def svid_from_der(
    der: bytes | None, *, trust_domain: str | None = None, now: dt.datetime | None = None
) -> PeerIdentity:
    """Validate a leaf certificate as an X509-SVID and return the identity it proves."""
    if not der:
        raise IdentityError("peer presented no certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise IdentityError(f"peer certificate is not valid DER: {exc}") from None
    return svid_from_cert(cert, der, trust_domain=trust_domain, now=now)


def svid_from_cert(
    cert: x509.Certificate,
    der: bytes,
    *,
    trust_domain: str | None = None,
    now: dt.datetime | None = None,
) -> PeerIdentity:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise IdentityError("peer certificate is a CA certificate, not a workload SVID")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if ku.key_cert_sign or ku.crl_sign:
            raise IdentityError(
                "peer certificate has keyCertSign or cRLSign key usage, which an "
                "X509-SVID leaf must not have"
            )
    except x509.ExtensionNotFound:
        pass
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("peer certificate has no SAN, so no SPIFFE ID") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise IdentityError(f"an X509-SVID has exactly one URI SAN; this one has {len(uris)}")
    try:
        sid = meshcar_spiffe.parse(uris[0])
    except meshcar_spiffe.InvalidSpiffeId as exc:
        raise IdentityError(f"peer certificate's URI SAN: {exc}") from None
    if trust_domain is not None and sid.trust_domain != trust_domain:
        raise IdentityError(f"peer {sid} is not in trust domain {trust_domain}")
    now = now or dt.datetime.now(dt.UTC)
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise IdentityError(f"peer certificate for {sid} is not valid now")
    return PeerIdentity(str(sid), hashlib.sha256(der).hexdigest(), cert.not_valid_after_utc)
