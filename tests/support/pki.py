"""A throw-away PKI for tests of the sidecar that do not involve the CA package.

It builds real certificates with `cryptography` (root -> intermediate -> SVID leaves), so
the sidecar's TLS and SPIFFE checks run against the real thing; only the issuing process
is replaced. Tests of the CA itself use the real `meshcar ca` instead.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshcar.tls.store import Credential


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@dataclass
class ThrowawayCA:
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    inter: x509.Certificate
    inter_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, name: str = "test") -> ThrowawayCA:
        now = dt.datetime.now(dt.UTC)
        rk = ec.generate_private_key(ec.SECP256R1())
        root = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{name} root"))
            .issuer_name(_name(f"{name} root"))
            .public_key(rk.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(rk, hashes.SHA256())
        )
        ik = ec.generate_private_key(ec.SECP256R1())
        inter = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{name} intermediate"))
            .issuer_name(root.subject)
            .public_key(ik.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=10))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(rk, hashes.SHA256())
        )
        return cls(root, rk, inter, ik)

    @property
    def bundle_pem(self) -> str:
        return _pem(self.root)

    def leaf(
        self,
        uris: list[str],
        *,
        ttl: dt.timedelta = dt.timedelta(hours=1),
        ca: bool = False,
        not_before: dt.datetime | None = None,
        dns: list[str] | None = None,
        key_usage: x509.KeyUsage | None = None,
    ) -> tuple[str, str]:
        """(chain PEM, key PEM) for a leaf with these URI SANs."""
        now = dt.datetime.now(dt.UTC)
        nb = not_before or now - dt.timedelta(minutes=1)
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(_name("workload"))
            .issuer_name(self.inter.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(nb + ttl)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if key_usage is not None:
            b = b.add_extension(key_usage, critical=True)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.DNSName(d) for d in dns or []]
        if names:
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = b.sign(self.inter_key, hashes.SHA256())
        return _pem(cert) + _pem(self.inter), _key_pem(key)

    def credential(self, spiffe_id: str, **kw) -> Credential:
        chain, key = self.leaf([spiffe_id], **kw)
        return Credential(spiffe_id, chain, key, self.bundle_pem)
