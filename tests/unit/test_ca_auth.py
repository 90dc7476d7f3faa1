"""Unit tests of ca/auth.py, ca/store.py, ca/spiffe.py, ca/duration.py: join tokens (hashed,
expiry, uses), the renewal certificate check, credential precedence, ID and duration parsing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from meshcar_ca import pki
from meshcar_ca.auth import (
    Authenticator,
    Credentials,
    check_renewal_certificate,
    hash_token,
    mint_token,
)
from meshcar_ca.duration import parse_duration
from meshcar_ca.errors import CAError, ConfigError, InvalidSpiffeId, Unauthenticated
from meshcar_ca.files import create_ca
from meshcar_ca.issuer import BuiltinIssuer
from meshcar_ca.spiffe import check_spiffe_id, check_trust_domain
from meshcar_ca.store import Store

TD = "meshcar.test"
API = f"spiffe://{TD}/svc/api"
NOW = datetime.now(UTC).replace(microsecond=0)
T = int(NOW.timestamp())


@pytest.fixture
def issuer(tmp_path: Path) -> BuiltinIssuer:
    create_ca(tmp_path / "ca", TD, 86400, NOW)
    return BuiltinIssuer.load(tmp_path / "ca", clock=lambda: NOW)


@pytest.fixture
def store(issuer: BuiltinIssuer, tmp_path: Path) -> Store:
    return Store(tmp_path / "ca" / "ca.db")


def leaf(
    issuer: BuiltinIssuer,
    uris: list[str],
    *,
    now: datetime = NOW,
    ttl: int = 3600,
    ca: bool = False,
) -> x509.Certificate:
    """A certificate signed by `issuer`'s intermediate with arbitrary URI SANs (for bad cases)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = pki.new_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "t")]))
        .issuer_name(issuer.intermediate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(seconds=10))
        .not_valid_after(now + timedelta(seconds=ttl))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .sign(issuer.intermediate_key, hashes.SHA256())
    )


def der(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.DER)


# --- join tokens -------------------------------------------------------------------------


def test_token_stored_hashed_only(issuer: BuiltinIssuer, store: Store) -> None:
    token = mint_token(store, TD, API, 3600, 1, T)
    assert len(token) >= 43
    wal = store.path.with_name(store.path.name + "-wal")  # WAL mode: recent commits are there
    raw = store.path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert token.encode() not in raw
    assert hash_token(token).encode() in raw
    record = store.token(hash_token(token))
    assert record is not None and record.spiffe_id == API and record.uses_left == 1
    assert record.expires_at == T + 3600


def test_token_uses_are_counted(store: Store) -> None:
    token = mint_token(store, TD, API, 3600, 2, T)
    assert store.consume_token(hash_token(token), T) == API
    assert store.consume_token(hash_token(token), T) == API
    with pytest.raises(Unauthenticated) as e:
        store.consume_token(hash_token(token), T)
    assert e.value.code == "token_used_up"


def test_token_expiry(store: Store) -> None:
    token = mint_token(store, TD, API, 60, 1, T)
    with pytest.raises(Unauthenticated) as e:
        store.consume_token(hash_token(token), T + 60)
    assert e.value.code == "token_expired"
    assert store.consume_token(hash_token(token), T + 59) == API  # not consumed by the failure


def test_unknown_token(store: Store) -> None:
    with pytest.raises(Unauthenticated) as e:
        store.consume_token(hash_token("nope"), T)
    assert e.value.code == "bad_token"


@pytest.mark.parametrize(
    "spiffe_id",
    [
        "spiffe://other.test/svc/api",
        f"spiffe://{TD}",
        f"spiffe://{TD}/",
        f"http://{TD}/svc/api",
        f"spiffe://{TD}/svc/../admin",
        f"spiffe://{TD}/svc//api",
        f"spiffe://{TD}/svc/a?b",
    ],
)
def test_token_rejects_ids_outside_trust_domain_or_malformed(store: Store, spiffe_id: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        mint_token(store, TD, spiffe_id, 3600, 1, T)


def test_token_repr_hides_secrets() -> None:
    creds = Credentials(token="s3cret-token", k8s_token="jwt-secret", peer_cert_der=b"x")
    assert "s3cret" not in repr(creds) and "jwt-secret" not in repr(creds)


# --- renewal certificate check ---------------------------------------------------------------


def test_renewal_accepts_own_svid(issuer: BuiltinIssuer) -> None:
    assert (
        check_renewal_certificate(der(leaf(issuer, [API])), issuer.issuing_certificates(), TD, NOW)
        == API
    )


@pytest.mark.parametrize(
    "uris",
    [[], [API, f"spiffe://{TD}/svc/web"], ["spiffe://other.test/svc/api"], ["https://x.test/"]],
)
def test_renewal_rejects_bad_sans(issuer: BuiltinIssuer, uris: list[str]) -> None:
    with pytest.raises(Unauthenticated) as e:
        check_renewal_certificate(der(leaf(issuer, uris)), issuer.issuing_certificates(), TD, NOW)
    assert e.value.code == "bad_client_certificate"


def test_renewal_rejects_expired_and_ca(issuer: BuiltinIssuer) -> None:
    expired = leaf(issuer, [API], now=NOW - timedelta(hours=2))
    with pytest.raises(Unauthenticated, match="expired"):
        check_renewal_certificate(der(expired), issuer.issuing_certificates(), TD, NOW)
    with pytest.raises(Unauthenticated, match="CA certificate"):
        check_renewal_certificate(
            der(leaf(issuer, [API], ca=True)), issuer.issuing_certificates(), TD, NOW
        )
    with pytest.raises(Unauthenticated):
        check_renewal_certificate(b"garbage", issuer.issuing_certificates(), TD, NOW)


def test_renewal_rejects_other_ca(issuer: BuiltinIssuer, tmp_path: Path) -> None:
    create_ca(tmp_path / "other", TD, 86400, NOW)
    other = BuiltinIssuer.load(tmp_path / "other")
    with pytest.raises(Unauthenticated, match="not issued by this CA"):
        check_renewal_certificate(der(leaf(other, [API])), issuer.issuing_certificates(), TD, NOW)


# --- credential precedence and the k8s hook -----------------------------------------------------


def test_authenticator_precedence(issuer: BuiltinIssuer, store: Store) -> None:
    auth = Authenticator(store, issuer)
    web = f"spiffe://{TD}/svc/web"
    token = mint_token(store, TD, web, 3600, 1, T)
    got = auth.authenticate(Credentials(token=token, peer_cert_der=der(leaf(issuer, [API]))), NOW)
    assert (got.spiffe_id, got.method) == (web, "token")
    got = auth.authenticate(Credentials(peer_cert_der=der(leaf(issuer, [API]))), NOW)
    assert (got.spiffe_id, got.method) == (API, "renewal")
    with pytest.raises(Unauthenticated) as e:
        auth.authenticate(Credentials(), NOW)
    assert e.value.code == "no_credential"


def test_k8s_token_not_configured(issuer: BuiltinIssuer, store: Store) -> None:
    with pytest.raises(Unauthenticated, match="not configured") as e:
        Authenticator(store, issuer).authenticate(Credentials(k8s_token="x.y.z"), NOW)
    assert e.value.code == "bad_k8s_token"


def test_k8s_verifier_result_is_checked(issuer: BuiltinIssuer, store: Store) -> None:
    ok = Authenticator(store, issuer, k8s_verifier=lambda t: API)
    assert ok.authenticate(Credentials(k8s_token="x.y.z"), NOW).spiffe_id == API
    foreign = Authenticator(store, issuer, k8s_verifier=lambda t: "spiffe://evil.test/svc/api")
    with pytest.raises(Unauthenticated) as e:
        foreign.authenticate(Credentials(k8s_token="x.y.z"), NOW)
    assert e.value.code == "bad_k8s_token"

    def broken(token: str) -> str:
        raise RuntimeError(f"bad signature on {token}")

    with pytest.raises(Unauthenticated) as e:
        Authenticator(store, issuer, k8s_verifier=broken).authenticate(
            Credentials(k8s_token="secret.jwt"), NOW
        )
    assert "secret.jwt" not in e.value.message


# --- SPIFFE IDs and durations ------------------------------------------------------------------------


def test_spiffe_ids() -> None:
    assert check_spiffe_id(API, TD) == API
    assert check_trust_domain("meshcar.demo") == "meshcar.demo"
    # "a..b", ".x", "-x" are valid per the SPIFFE ID spec (tests/unit/test_spiffe_id.py)
    for bad in ["Meshcar.demo", "", "x/y", "td:443", "us@td", "a" * 256, "td\n"]:
        with pytest.raises(InvalidSpiffeId):
            check_trust_domain(bad)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("24h", 86400), ("7d", 604800), ("1h30m", 5400), ("3600", 3600)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "1x", "h", "-5m", "1h 30m", "1.5h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_errors_carry_status_and_code() -> None:
    e = Unauthenticated("x", code="bad_token")
    assert (e.status, e.code) == (401, "bad_token") and isinstance(e, CAError)
