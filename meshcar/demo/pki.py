"""Public (non-mesh) certificates of the demo: the edge CA, payments' partner endpoint, a partner.

The mesh certificates come from meshcar's own CA over its API; this module only makes the
certificates a public PKI would provide in real life, so that `meshcar demo` runs offline:

- `edge-ca.pem`: the CA that signs the public server certificates (edge hosts and
  `payments.demo.test`);
- `payments-public.pem/.key`: payments' own server certificate for its partner endpoint;
- `edge.pem/.key`: the edge's certificate for the terminate/bridge hosts (used by the edge);
- `partner-ca.pem`, `partner.pem/.key`: the partner PKI; payments requires a client
  certificate chaining to `partner-ca.pem`.

Files are reused when present and still valid for at least a day, so a user who trusted
`edge-ca.pem` once keeps it across runs.  Keys are written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshcar_x509 import ca_builder, key_pem, leaf_builder, new_key

_MIN_REMAINING = dt.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as loaded objects and as the files they live in."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class PublicPki:
    """Paths of the demo's public certificates."""

    edge_ca: Path
    partner_ca: Path
    payments_cert: Path
    payments_key: Path
    edge_cert: Path
    edge_key: Path
    partner_cert: Path
    partner_key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file 0600, atomically (the key never exists with wider permissions)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load(cert_path: Path, key_path: Path) -> Issued | None:
    if not (cert_path.is_file() and key_path.is_file()):
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError:
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        return None
    if cert.not_valid_after_utc - _now() < _MIN_REMAINING:
        return None
    return Issued(cert, key, cert_path, key_path)


def make_ca(
    common_name: str, *, days: int = 3650
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed ECDSA P-256 CA certificate."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    builder = ca_builder(name, name, key.public_key(), start, end, 0, digital_signature=True)
    cert = builder.sign(key, hashes.SHA256())
    return cert, key


def make_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    dns_names: tuple[str, ...] = (),
    uris: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    server: bool = True,
    client: bool = False,
    days: int = 365,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An ECDSA P-256 end-entity certificate signed by `ca_key`."""
    key = new_key()
    now = _now()
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    start = now - dt.timedelta(minutes=5)
    end = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        leaf_builder(ca_cert.subject, key.public_key(), start, end, usages)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _ensure_ca(cert_path: Path, key_path: Path, common_name: str) -> Issued:
    found = _load(cert_path, key_path)
    if found is not None:
        return found
    cert, key = make_ca(common_name)
    write_private(key_path, key_pem(key))
    cert_path.write_bytes(_cert_pem(cert))
    return Issued(cert, key, cert_path, key_path)


def _ensure_leaf(
    ca: Issued, cert_path: Path, key_path: Path, common_name: str, **kw: object
) -> None:
    found = _load(cert_path, key_path)
    if found is not None and found.cert.issuer == ca.cert.subject:
        try:
            found.cert.verify_directly_issued_by(ca.cert)
            return
        except (ValueError, TypeError, InvalidSignature):
            pass  # not ours any more: reissue
    cert, key = make_leaf(ca.cert, ca.key, common_name, **kw)  # type: ignore[arg-type]
    write_private(key_path, key_pem(key))
    cert_path.write_bytes(_cert_pem(cert))


def ensure_public_pki(
    directory: Path, *, payments_host: str, edge_hosts: tuple[str, ...]
) -> PublicPki:
    """Create (or reuse) every public certificate of the demo under `directory`."""
    pki_dir = directory / "pki"
    pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = PublicPki(
        edge_ca=directory / "edge-ca.pem",
        partner_ca=directory / "partner-ca.pem",
        payments_cert=pki_dir / "payments-public.pem",
        payments_key=pki_dir / "payments-public.key",
        edge_cert=pki_dir / "edge.pem",
        edge_key=pki_dir / "edge.key",
        partner_cert=directory / "partner.pem",
        partner_key=directory / "partner.key",
    )
    edge_ca = _ensure_ca(paths.edge_ca, pki_dir / "edge-ca.key", "meshcar demo edge CA")
    partner_ca = _ensure_ca(paths.partner_ca, pki_dir / "partner-ca.key", "meshcar demo partner CA")
    _ensure_leaf(
        edge_ca, paths.payments_cert, paths.payments_key, payments_host, dns_names=(payments_host,)
    )
    _ensure_leaf(
        edge_ca,
        paths.edge_cert,
        paths.edge_key,
        edge_hosts[0] if edge_hosts else "edge",
        dns_names=edge_hosts,
    )
    _ensure_leaf(
        partner_ca,
        paths.partner_cert,
        paths.partner_key,
        "partner.example",
        server=False,
        client=True,
    )
    return paths
