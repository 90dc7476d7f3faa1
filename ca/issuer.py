"""The Issuer interface and the built-in backend that signs with the local intermediate.

An `Issuer` turns an already-checked CSR plus an already-authenticated SPIFFE ID into an
X509-SVID; it never decides who may get which identity (that is `auth.py`). The HTTPS API
only talks to this interface, so another backend (Vault/OpenBao PKI via hvac, issue 4) is
one more class with the same three methods. `sign` may block (a remote backend does network
I/O): the API calls it from a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from . import files, pki
from .errors import UnsupportedKey


@dataclass(frozen=True)
class IssuedCert:
    """A freshly issued SVID and the chain to send with it."""

    spiffe_id: str
    serial: int
    not_before: datetime
    not_after: datetime
    certificate_pem: str  # the leaf
    chain_pem: str  # leaf + intermediate(s), leaf first

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")


@dataclass(frozen=True)
class Bundle:
    """The trust bundle: every root a workload must trust, and its version number."""

    pem: str
    version: int


class Issuer(Protocol):
    @property
    def trust_domain(self) -> str:
        """The SPIFFE trust domain this issuer signs for."""
        ...

    def sign(
        self, csr: x509.CertificateSigningRequest, spiffe_id: str, ttl_seconds: int | None
    ) -> IssuedCert:
        """Issue an SVID for `spiffe_id` over the CSR's public key (default TTL if None)."""
        ...

    def bundle(self) -> Bundle:
        """The current trust bundle."""
        ...

    def issuing_certificates(self) -> tuple[x509.Certificate, ...]:
        """The CA certificates that directly sign leaves (used to accept renewals)."""
        ...


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class BuiltinIssuer:
    """Signs with the intermediate key held in the CA directory."""

    trust_domain: str
    max_ttl_seconds: int
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey = field(repr=False)
    roots: tuple[x509.Certificate, ...]
    bundle_version: int = 1
    clock: Callable[[], datetime] = utcnow

    @classmethod
    def load(cls, directory: Path, clock: Callable[[], datetime] = utcnow) -> BuiltinIssuer:
        paths, config = files.open_ca(directory)
        return cls(
            trust_domain=config.trust_domain,
            max_ttl_seconds=config.max_ttl_seconds,
            intermediate=files.load_cert(paths.intermediate_pem),
            intermediate_key=files.load_key(paths.intermediate_key),
            roots=tuple(files.load_certs(paths.bundle_pem)),
            bundle_version=config.bundle_version,
            clock=clock,
        )

    def sign(
        self, csr: x509.CertificateSigningRequest, spiffe_id: str, ttl_seconds: int | None
    ) -> IssuedCert:
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise UnsupportedKey("only ECDSA P-256 keys are accepted")
        validity = pki.svid_validity(
            self.clock(), ttl_seconds, self.max_ttl_seconds, self.intermediate.not_valid_after_utc
        )
        cert = pki.build_svid(public_key, spiffe_id, validity, self.intermediate, self.intermediate_key)
        return IssuedCert(
            spiffe_id=spiffe_id,
            serial=cert.serial_number,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            certificate_pem=pki.cert_pem(cert),
            chain_pem=pki.cert_pem(cert, self.intermediate),
        )

    def bundle(self) -> Bundle:
        return Bundle(pem=pki.cert_pem(*self.roots), version=self.bundle_version)

    def issuing_certificates(self) -> tuple[x509.Certificate, ...]:
        return (self.intermediate,)
