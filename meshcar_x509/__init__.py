"""meshcar_x509: the certificate builders shared by meshcar_ca (its root, intermediate, API and
SVID certificates), meshcar inject's webhook certificate and the demo's public PKI. It imports
neither meshcar nor meshcar_ca (both import it; test_layering checks), and knows no policy:
names, lifetimes, SANs and which identifiers to add stay with the callers.

All keys are ECDSA P-256 and every certificate is signed with SHA-256.
"""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_usage(*, cert_sign: bool, digital_signature: bool) -> x509.KeyUsage:
    """keyUsage with digitalSignature and/or keyCertSign + cRLSign, nothing else."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: datetime,
    not_after: datetime,
    path_length: int,
    *,
    digital_signature: bool = False,
) -> x509.CertificateBuilder:
    """A CA certificate, unsigned: random serial, CA:true with path_length and keyUsage
    keyCertSign + cRLSign (both critical), its SubjectKeyIdentifier."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            key_usage(cert_sign=True, digital_signature=digital_signature), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def leaf_builder(
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: datetime,
    not_after: datetime,
    usages: list[x509.ObjectIdentifier],
    serial: int | None = None,
) -> x509.CertificateBuilder:
    """An end-entity certificate, unsigned and without subject: CA:false and keyUsage
    digitalSignature (both critical), extendedKeyUsage `usages`; a random serial unless one
    is given. The caller adds its names and key identifiers."""
    return (
        x509.CertificateBuilder()
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number() if serial is None else serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(cert_sign=False, digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
