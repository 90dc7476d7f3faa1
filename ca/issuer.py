"""The Issuer interface and the built-in backend that signs with the local intermediate.

An `Issuer` turns an already-checked CSR plus an already-authenticated SPIFFE ID into an
X509-SVID; it never decides who may get which identity (that is `auth.py`). The HTTPS API
only talks to this interface, so another backend (Vault/OpenBao PKI via hvac,
`vault_issuer.py`) is one more class with the same methods. `sign` may block (a remote
backend does network I/O): the API calls it from a worker thread.

`BuiltinIssuer.load` follows a root rotation (docs/ROTATION.md): in stage 2 it signs with
`next-intermediate.*`, and in stages 1-2 it accepts renewals from both intermediates.
After `renew-intermediate` (ca/intermediate.py) it signs with the new intermediate and
still accepts renewals from leaves of `previous-intermediate.pem` until that expires.
`LiveIssuer` lets a running `ca serve` pick up such changes without a restart: it re-loads
the directory whenever config.json (the commit point of every state change) is replaced.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
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
    issuer_id: str | None = None  # SKI (hex) of the signing CA certificate

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
    also_accepted: tuple[x509.Certificate, ...] = ()  # other intermediates renewals may come from

    @classmethod
    def load(cls, directory: Path, clock: Callable[[], datetime] = utcnow) -> BuiltinIssuer:
        paths, config = files.open_ca(directory)
        current = (files.load_cert(paths.intermediate_pem), paths.intermediate_key)
        accepted: tuple[x509.Certificate, ...] = ()
        if config.rotation is not None:
            following = (files.load_cert(paths.next_intermediate_pem), paths.next_intermediate_key)
            if config.rotation.stage == 2:
                current, following = following, current
            accepted = (following[0],)
        previous = paths.previous_intermediate_pem
        if previous.exists():  # replaced by renew-intermediate: its leaves may still renew
            prev = files.load_cert(previous)
            if prev.not_valid_after_utc > clock():
                accepted = (*accepted, prev)
        key = files.load_key(current[1])
        if (
            key.public_key() != current[0].public_key()
        ):  # a half-written change: keep the old issuer
            raise ValueError(f"{current[1]} does not match its certificate")
        return cls(
            trust_domain=config.trust_domain,
            max_ttl_seconds=config.max_ttl_seconds,
            intermediate=current[0],
            intermediate_key=key,
            roots=tuple(files.load_certs(paths.bundle_pem)),
            bundle_version=config.bundle_version,
            clock=clock,
            also_accepted=accepted,
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
        cert = pki.build_svid(
            public_key, spiffe_id, validity, self.intermediate, self.intermediate_key
        )
        return IssuedCert(
            spiffe_id=spiffe_id,
            serial=cert.serial_number,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            certificate_pem=(leaf := pki.cert_pem(cert)),
            chain_pem=leaf + self._intermediate_pem,
            issuer_id=self._issuer_id,
        )

    # encoded once per loaded issuer (a change of the CA directory loads a new one)
    @cached_property
    def _intermediate_pem(self) -> str:
        return pki.cert_pem(self.intermediate)

    @cached_property
    def _issuer_id(self) -> str:
        return key_id(self.intermediate)

    @cached_property
    def _bundle(self) -> Bundle:
        return Bundle(pem=pki.cert_pem(*self.roots), version=self.bundle_version)

    def bundle(self) -> Bundle:
        return self._bundle

    def issuing_certificates(self) -> tuple[x509.Certificate, ...]:
        return (self.intermediate, *self.also_accepted)


def key_id(cert: x509.Certificate) -> str:
    """The certificate's subject key identifier in hex (what issued-certificate records name)."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest.hex()  # type: ignore[arg-type]


class LiveIssuer:
    """An Issuer that re-loads itself when the CA directory changes (a root rotation).

    `current()` compares the identity of config.json (inode, mtime, size: every change
    replaces the file) with the one it loaded; on a change it loads afresh. If loading fails
    (a state change is half written), it keeps the previous issuer and tries again at the
    next call. Safe to call from worker threads.
    """

    def __init__(self, load: Callable[[], BuiltinIssuer], watch: Path) -> None:
        self._load = load
        self._watch = watch
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._issuer = load()
        self.generation = 0  # bumped on every successful re-load

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._watch)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def current(self) -> BuiltinIssuer:
        stamp = self._stat()
        if stamp == self._stamp or stamp is None:
            return self._issuer
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._issuer = self._load()
                except Exception:  # half-written change: keep serving, retry next time
                    return self._issuer
                self._stamp = stamp
                self.generation += 1
        return self._issuer

    @property
    def trust_domain(self) -> str:
        return self.current().trust_domain

    def sign(
        self, csr: x509.CertificateSigningRequest, spiffe_id: str, ttl_seconds: int | None
    ) -> IssuedCert:
        return self.current().sign(csr, spiffe_id, ttl_seconds)

    def bundle(self) -> Bundle:
        return self.current().bundle()

    def issuing_certificates(self) -> tuple[x509.Certificate, ...]:
        return self.current().issuing_certificates()
