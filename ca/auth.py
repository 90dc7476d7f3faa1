"""Who is asking: turn a request's credential into the one SPIFFE ID it may receive.

Three credentials, checked in this order of precedence:
- `token`: a join token minted by `meshcar ca token`. Only its sha256 is stored; using it
  consumes one use. Tokens are random (`secrets.token_urlsafe(32)`), so a plain sha256 is
  enough (no salt/stretching needed for 256-bit secrets).
- `k8s_token`: a projected Kubernetes service-account token, checked by a pluggable
  verifier `(token) -> spiffe_id` (`projected_token_verifier`, built on ca/k8s_token.py,
  enabled by `meshcar ca serve --k8s-issuer ...`); without one the CA answers
  401 bad_k8s_token "not configured".
- none in the body, but a client certificate on the TLS connection: renewal. The certificate
  must be an unexpired non-CA leaf signed directly by one of the issuer's current issuing
  certificates, with clientAuth and exactly one URI SAN in our trust domain.

The identity never comes from the CSR.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from . import pki
from .errors import BadRequest, CAError, InvalidSpiffeId, Unauthenticated
from .issuer import Issuer
from .spiffe import check_spiffe_id
from .store import Store

K8sVerifier = Callable[[str], str]
MAX_TOKEN_LENGTH = 8192  # projected k8s tokens are JWTs of a few KiB; join tokens are 43 chars


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def mint_token(
    store: Store, trust_domain: str, spiffe_id: str, ttl_seconds: int, uses: int, now: int
) -> str:
    """Create a join token for `spiffe_id`, store its hash, and return the token itself."""
    check_spiffe_id(spiffe_id, trust_domain)
    if uses < 1:
        raise BadRequest("--uses must be at least 1")
    token = new_token()
    store.add_token(hash_token(token), spiffe_id, now, now + ttl_seconds, uses)
    return token


@dataclass(frozen=True)
class Credentials:
    """What a sign request brought; secrets are kept out of the repr."""

    token: str | None = field(default=None, repr=False)
    k8s_token: str | None = field(default=None, repr=False)
    peer_cert_der: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Identity:
    spiffe_id: str
    method: str  # token | k8s_token | renewal
    renewed_serial: str | None = None  # renewal: serial (hex) of the certificate presented


def _bad_cert(message: str) -> Unauthenticated:
    return Unauthenticated(message, code="bad_client_certificate")


def check_renewal_certificate(
    der: bytes, issuing: tuple[x509.Certificate, ...], trust_domain: str, now: datetime
) -> str:
    """Return the SPIFFE ID of a client certificate presented for renewal, or raise 401."""
    try:
        cert = x509.load_der_x509_certificate(der)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise _bad_cert("the client certificate is not an SVID of this CA") from exc
    if bc.ca:
        raise _bad_cert("the client certificate is a CA certificate")
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise _bad_cert("the client certificate is not for client authentication")
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise _bad_cert("the client certificate is expired or not yet valid")
    for ca in issuing:
        if cert.issuer != ca.subject:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except Exception:  # wrong key type or bad signature
            continue
        break
    else:
        raise _bad_cert("the client certificate was not issued by this CA")
    uris = pki.uri_sans(cert)
    if len(uris) != 1:
        raise _bad_cert(f"the client certificate has {len(uris)} URI SANs, not exactly one")
    try:
        return check_spiffe_id(uris[0], trust_domain)
    except InvalidSpiffeId as exc:
        raise _bad_cert(f"the client certificate's identity is not valid here: {exc}") from exc


def projected_token_verifier(
    jwks: dict[str, Any], issuer: str, audience: str, trust_domain: str
) -> K8sVerifier:
    """A K8sVerifier backed by ca/k8s_token.py: the JWT is checked against `jwks` (the
    cluster's service-account issuer keys), `issuer` and `audience`; the result is
    `spiffe://TD/ns/NS/sa/SA`. Its error reasons never contain the token."""
    from .k8s_token import K8sTokenError, verify_projected_token

    def verify(token: str) -> str:
        try:
            return verify_projected_token(
                token, jwks=jwks, issuer=issuer, audience=audience, trust_domain=trust_domain
            )
        except K8sTokenError as exc:
            raise Unauthenticated(
                f"the Kubernetes token was rejected: {exc.reason}", code="bad_k8s_token"
            ) from None

    return verify


@dataclass(frozen=True)
class Authenticator:
    store: Store
    issuer: Issuer
    k8s_verifier: K8sVerifier | None = None

    def authenticate(self, creds: Credentials, now: datetime) -> Identity:
        """Resolve `creds` to an identity (consuming a join token), or raise Unauthenticated."""
        if creds.token is not None:
            if not creds.token or len(creds.token) > MAX_TOKEN_LENGTH:
                raise Unauthenticated("unknown join token", code="bad_token")
            spiffe_id = self.store.consume_token(hash_token(creds.token), int(now.timestamp()))
            return Identity(check_spiffe_id(spiffe_id, self.issuer.trust_domain), "token")
        if creds.k8s_token is not None:
            return Identity(self._k8s(creds.k8s_token), "k8s_token")
        if creds.peer_cert_der is not None:
            spiffe_id = check_renewal_certificate(
                creds.peer_cert_der,
                self.issuer.issuing_certificates(),
                self.issuer.trust_domain,
                now,
            )
            serial = format(x509.load_der_x509_certificate(creds.peer_cert_der).serial_number, "x")
            return Identity(spiffe_id, "renewal", serial)
        raise Unauthenticated(
            "no credential: send a join token, a k8s_token, or renew over mTLS with your current certificate",
            code="no_credential",
        )

    def _k8s(self, token: str) -> str:
        if self.k8s_verifier is None:
            raise Unauthenticated(
                "Kubernetes token authentication is not configured", code="bad_k8s_token"
            )
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated("invalid Kubernetes token", code="bad_k8s_token")
        try:
            spiffe_id = self.k8s_verifier(token)
            return check_spiffe_id(spiffe_id, self.issuer.trust_domain)
        except CAError as exc:
            raise Unauthenticated(exc.message, code="bad_k8s_token") from exc
        except Exception as exc:  # a verifier bug or its own error type: still a 401
            raise Unauthenticated(
                f"the Kubernetes token was rejected ({type(exc).__name__})", code="bad_k8s_token"
            ) from exc
