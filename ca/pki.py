"""Key and certificate building for the CA: pure functions, no files, no clock of their own.

Theory of operation: `init` builds a root (10 years, pathlen 1) and an intermediate (1 year,
pathlen 0) and a server certificate for the API.
Workload certificates are X509-SVIDs: exactly one URI SAN `spiffe://TD/...`, CA:false,
keyUsage digitalSignature (critical), EKU serverAuth + clientAuth, random serial, AKI/SKI,
lifetime clamped to the CA's maximum and never beyond the issuer's own not-after.
Every function takes `now` explicitly so tests can build expired or future certificates.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshcar_x509 import ca_builder, leaf_builder
from meshcar_x509 import key_pem as key_pem  # the CA's other modules take these from pki
from meshcar_x509 import new_key as new_key

from .errors import BadCSR, Unavailable, UnsupportedKey

ROOT_LIFETIME = timedelta(days=3650)
INTERMEDIATE_LIFETIME = timedelta(days=365)
SERVER_LIFETIME = timedelta(days=90)
DEFAULT_TTL_SECONDS = 3600
BACKDATE = timedelta(seconds=10)  # tolerate small clock skew between CA and workloads
MAX_CSR_BYTES = 16 * 1024


def _name(*pairs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


def _aki(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def build_root(
    key: ec.EllipticCurvePrivateKey, trust_domain: str, now: datetime, label: str = ""
) -> x509.Certificate:
    """Self-signed root CA: 10 years, CA:true pathlen 1, keyCertSign + cRLSign. `label`
    (e.g. " v2" for a rotated root) keeps successive roots' names distinct."""
    name = _name(
        (NameOID.ORGANIZATION_NAME, "meshcar"),
        (NameOID.COMMON_NAME, f"meshcar root CA {trust_domain}{label}"),
    )
    builder = ca_builder(name, name, key.public_key(), now - BACKDATE, now + ROOT_LIFETIME, 1)
    return builder.sign(key, hashes.SHA256())


def build_intermediate(
    public_key: ec.EllipticCurvePublicKey,
    trust_domain: str,
    root_cert: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    now: datetime,
    lifetime: timedelta = INTERMEDIATE_LIFETIME,
    label: str = "",
) -> x509.Certificate:
    """Issuing CA: 1 year (never past the root), pathlen 0.

    No URI name constraints: OpenSSL honours them, but cryptography's X.509 verifier (which
    a workload may use to check SVIDs) rejects any chain carrying one ("unsupported name
    constraint"), so they would break peers rather than protect them.
    """
    name = _name(
        (NameOID.ORGANIZATION_NAME, "meshcar"),
        (NameOID.COMMON_NAME, f"meshcar intermediate CA {trust_domain}{label}"),
    )
    not_after = min(now + lifetime, root_cert.not_valid_after_utc)
    builder = ca_builder(
        name, root_cert.subject, public_key, now - BACKDATE, not_after, 0
    ).add_extension(_aki(root_cert), critical=False)
    return builder.sign(root_key, hashes.SHA256())


def _leaf_builder(
    public_key: ec.EllipticCurvePublicKey,
    serial: int,
    not_before: datetime,
    not_after: datetime,
    issuer_cert: x509.Certificate,
    server_only: bool,
) -> x509.CertificateBuilder:
    usages = [ExtendedKeyUsageOID.SERVER_AUTH]
    if not server_only:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    return (
        leaf_builder(issuer_cert.subject, public_key, not_before, not_after, usages, serial)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(issuer_cert), critical=False)
    )


def build_server_cert(
    public_key: ec.EllipticCurvePublicKey,
    names: list[str],
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    now: datetime,
) -> x509.Certificate:
    """The CA API's TLS certificate: DNS/IP SANs from `names`, serverAuth, <= 90 days."""
    sans: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    not_after = min(now + SERVER_LIFETIME, issuer_cert.not_valid_after_utc)
    builder = (
        _leaf_builder(
            public_key, x509.random_serial_number(), now - BACKDATE, not_after, issuer_cert, True
        )
        .subject_name(
            _name((NameOID.ORGANIZATION_NAME, "meshcar"), (NameOID.COMMON_NAME, "meshcar CA API"))
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class Validity:
    not_before: datetime
    not_after: datetime


def svid_validity(
    now: datetime, ttl_seconds: int | None, max_ttl_seconds: int, issuer_not_after: datetime
) -> Validity:
    """Lifetime of a new SVID: `ttl_seconds` (default 1 h) clamped to the maximum and to the
    issuer's not-after. Raises Unavailable if the issuer has expired."""
    ttl = DEFAULT_TTL_SECONDS if ttl_seconds is None else ttl_seconds
    ttl = max(1, min(ttl, max_ttl_seconds))
    if issuer_not_after <= now:
        raise Unavailable("the issuing intermediate has expired; the CA cannot issue")
    not_after = min(now + timedelta(seconds=ttl), issuer_not_after)
    return Validity(not_before=now - BACKDATE, not_after=not_after)


def build_svid(
    public_key: ec.EllipticCurvePublicKey,
    spiffe_id: str,
    validity: Validity,
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    serial: int | None = None,
) -> x509.Certificate:
    """An X509-SVID for `spiffe_id` (which the caller has already authorised)."""
    builder = (
        _leaf_builder(
            public_key,
            serial or x509.random_serial_number(),
            validity.not_before,
            validity.not_after,
            issuer_cert,
            False,
        )
        .subject_name(_name((NameOID.ORGANIZATION_NAME, "meshcar")))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
    )
    return builder.sign(issuer_key, hashes.SHA256())


def load_csr(text: str) -> x509.CertificateSigningRequest:
    """Parse a PEM (or base64 DER) CSR and check it: P-256 key, valid self-signature.

    Raises BadCSR for anything malformed or a bad signature, UnsupportedKey for any key that is
    not ECDSA P-256. The CSR's subject and SANs are never looked at.
    """
    if len(text) > MAX_CSR_BYTES:
        raise BadCSR("the CSR is too large")
    data = text.strip().encode("ascii", "replace")
    try:
        if data.startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(base64.b64decode(data, validate=True))
    except (ValueError, TypeError, binascii.Error) as exc:
        raise BadCSR("the CSR is not a valid PEM certificate request") from exc
    try:
        key = csr.public_key()
    except Exception as exc:  # unknown or unsupported algorithms
        raise UnsupportedKey("the CSR's key type is not supported: use ECDSA P-256") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise UnsupportedKey(
            f"the CSR's key is {type(key).__name__.removesuffix('PublicKey') or 'unknown'}: use ECDSA P-256"
        )
    if not isinstance(key.curve, ec.SECP256R1):
        raise UnsupportedKey(f"the CSR's key is on curve {key.curve.name}: use ECDSA P-256")
    try:
        valid = csr.is_signature_valid
    except Exception as exc:
        raise BadCSR("the CSR's signature cannot be checked") from exc
    if not valid:
        raise BadCSR("the CSR's signature does not verify")
    return csr


def uri_sans(cert: x509.Certificate) -> list[str]:
    """All URI SANs of `cert` (empty if it has no SAN extension)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def cert_pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certs)
