"""Unit tests of ca/pki.py: root/intermediate profiles, X509-SVID fields, TTL clamping, CSR checks."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from meshcar_ca import pki
from meshcar_ca.errors import BadCSR, Unavailable, UnsupportedKey

TD = "meshcar.test"
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SPIFFE_API = f"spiffe://{TD}/svc/api"


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey]:
    root_key = pki.new_key()
    root = pki.build_root(root_key, TD, NOW)
    inter_key = pki.new_key()
    inter = pki.build_intermediate(inter_key.public_key(), TD, root, root_key, NOW)
    return root, inter, inter_key


def make_csr(key=None, cn: str = "whatever", san: str | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def issue(
    ca, ttl: int | None = None, max_ttl: int = 86400, now: datetime = NOW
) -> x509.Certificate:
    _, inter, inter_key = ca
    csr = pki.load_csr(make_csr())
    validity = pki.svid_validity(now, ttl, max_ttl, inter.not_valid_after_utc)
    return pki.build_svid(csr.public_key(), SPIFFE_API, validity, inter, inter_key)


def test_root_profile(ca) -> None:
    root, _, _ = ca
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    ku = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"
    lifetime = root.not_valid_after_utc - root.not_valid_before_utc
    assert timedelta(days=3649) < lifetime <= timedelta(days=3651)
    root.verify_directly_issued_by(root)


def test_intermediate_profile(ca) -> None:
    root, inter, _ = ca
    bc = inter.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    inter.verify_directly_issued_by(root)
    lifetime = inter.not_valid_after_utc - inter.not_valid_before_utc
    assert timedelta(days=364) < lifetime <= timedelta(days=366)
    aki = inter.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest


def test_svid_fields(ca) -> None:
    _, inter, _ = ca
    cert = issue(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE_API]
    assert san.get_values_for_type(x509.DNSName) == []
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert (
        aki.key_identifier
        == inter.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    )
    cert.verify_directly_issued_by(inter)
    assert cert.serial_number > 0 and cert.serial_number != issue(ca).serial_number


def test_svid_chain_verifies_with_cryptography_verifier(ca) -> None:
    """Peers may verify SVIDs with cryptography's verifier: the chain must be acceptable to it."""
    root, inter, _ = ca
    cert = issue(ca)
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([root]))
        .time(NOW + timedelta(minutes=1))
        .build_client_verifier()
    )
    result = verifier.verify(cert, [inter])
    assert result.chain[-1] == root


def test_default_ttl_is_one_hour(ca) -> None:
    cert = issue(ca)
    assert cert.not_valid_after_utc - NOW == timedelta(hours=1)
    assert cert.not_valid_before_utc <= NOW


def test_ttl_requested_and_clamped(ca) -> None:
    assert issue(ca, ttl=60).not_valid_after_utc - NOW == timedelta(seconds=60)
    assert issue(ca, ttl=7 * 86400, max_ttl=86400).not_valid_after_utc - NOW == timedelta(days=1)


def test_ttl_never_beyond_intermediate(ca) -> None:
    _, inter, _ = ca
    late = inter.not_valid_after_utc - timedelta(minutes=5)
    cert = issue(ca, ttl=3600, now=late)
    assert cert.not_valid_after_utc == inter.not_valid_after_utc


def test_expired_intermediate_cannot_issue(ca) -> None:
    _, inter, _ = ca
    with pytest.raises(Unavailable):
        pki.svid_validity(
            inter.not_valid_after_utc + timedelta(seconds=1), None, 3600, inter.not_valid_after_utc
        )


def test_csr_p256_accepted_pem_and_base64_der() -> None:
    pem = make_csr()
    assert isinstance(pki.load_csr(pem).public_key(), ec.EllipticCurvePublicKey)
    der = x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)
    pki.load_csr(base64.b64encode(der).decode())


@pytest.mark.parametrize(
    "key",
    [
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec.generate_private_key(ec.SECP384R1()),
        ed25519.Ed25519PrivateKey.generate(),
    ],
    ids=["rsa2048", "p384", "ed25519"],
)
def test_csr_other_keys_rejected(key) -> None:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    pem = builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(UnsupportedKey):
        pki.load_csr(pem)


def tampered_csr() -> str:
    pem = make_csr(cn="aaaaaaaa")
    der = x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)
    assert der.count(b"aaaaaaaa") == 1
    bad = der.replace(b"aaaaaaaa", b"bbbbbbbb")
    return (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bad).decode()
        + "-----END CERTIFICATE REQUEST-----\n"
    )


def test_csr_bad_signature_rejected() -> None:
    with pytest.raises(BadCSR, match="signature"):
        pki.load_csr(tampered_csr())


@pytest.mark.parametrize(
    "text",
    [
        "not a csr",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "A" * (pki.MAX_CSR_BYTES + 1),
    ],
)
def test_csr_malformed_rejected(text: str) -> None:
    with pytest.raises(BadCSR):
        pki.load_csr(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode()))
def test_csr_parser_only_raises_its_own_errors(text: str) -> None:
    with pytest.raises((BadCSR, UnsupportedKey)):
        pki.load_csr(text)


def test_server_cert_names(ca) -> None:
    _, inter, inter_key = ca
    cert = pki.build_server_cert(
        pki.new_key().public_key(), ["localhost", "127.0.0.1", "ca.svc"], inter, inter_key, NOW
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "ca.svc"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert cert.not_valid_after_utc <= inter.not_valid_after_utc
