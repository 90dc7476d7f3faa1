"""The /v1/sign use case, free of HTTP: parse the JSON body, authenticate, issue, record.

`parse_sign_request` validates the body completely (JSON shape, CSR, key type, signature)
before any credential is touched, so a bad CSR never consumes a join token. `SignService`
is blocking (SQLite, and a remote issuer may do network I/O): the API runs it in a thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from . import pki
from .auth import Authenticator, Credentials, Identity
from .errors import BadRequest
from .issuer import IssuedCert, Issuer, utcnow
from .store import CertificateRecord, Store

MAX_TTL_FIELD = 10 * 365 * 24 * 3600


@dataclass(frozen=True)
class SignRequest:
    csr: x509.CertificateSigningRequest = field(repr=False)
    token: str | None = field(default=None, repr=False)
    k8s_token: str | None = field(default=None, repr=False)
    ttl_seconds: int | None = None
    bundle_version: int | None = None


def _optional_int(body: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{key} must be an integer between {lo} and {hi}")
    return value


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string")
    return value


def parse_sign_request(raw: bytes) -> SignRequest:
    """Parse and check a /v1/sign body. Raises BadRequest, BadCSR or UnsupportedKey."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("the body is not valid JSON") from exc
    except RecursionError:
        raise BadRequest("the body's JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    csr_text = body.get("csr")
    if not isinstance(csr_text, str) or not csr_text.strip():
        raise BadRequest("missing field: csr (a PEM certificate request)")
    token = _optional_str(body, "token")
    k8s_token = _optional_str(body, "k8s_token")
    if token is not None and k8s_token is not None:
        raise BadRequest("send exactly one credential: token or k8s_token, not both")
    ttl = _optional_int(body, "ttl_seconds", 1, MAX_TTL_FIELD)
    bundle_version = _optional_int(body, "bundle_version", 0, 2**31 - 1)
    csr = pki.load_csr(csr_text)
    return SignRequest(csr, token, k8s_token, ttl, bundle_version)


@dataclass(frozen=True)
class SignResult:
    identity: Identity
    issued: IssuedCert
    response: dict[str, Any]


@dataclass(frozen=True)
class SignService:
    issuer: Issuer
    authenticator: Authenticator
    store: Store
    clock: Callable[[], datetime] = utcnow

    def sign(self, req: SignRequest, peer_cert_der: bytes | None) -> SignResult:
        """Authenticate `req` (the TLS client certificate counts only if the body has no
        credential), issue for the credential's identity, record it, build the response."""
        creds = Credentials(token=req.token, k8s_token=req.k8s_token, peer_cert_der=peer_cert_der)
        now = self.clock()
        identity = self.authenticator.authenticate(creds, now)
        issued = self.issuer.sign(req.csr, identity.spiffe_id, req.ttl_seconds)
        self.store.record_certificate(
            CertificateRecord(
                serial=issued.serial_hex,
                spiffe_id=issued.spiffe_id,
                not_before=rfc3339(issued.not_before),
                not_after=rfc3339(issued.not_after),
                issued_at=int(now.timestamp()),
                auth=identity.method,
                client_bundle_version=req.bundle_version,
                issuer=issued.issuer_id,
                renewed_from=identity.renewed_serial,
            )
        )
        bundle = self.issuer.bundle()
        response = {
            "spiffe_id": issued.spiffe_id,
            "serial": issued.serial_hex,
            "not_before": rfc3339(issued.not_before),
            "not_after": rfc3339(issued.not_after),
            "certificate": issued.certificate_pem,
            "chain": issued.chain_pem,
            "bundle": bundle.pem,
            "bundle_version": bundle.version,
        }
        return SignResult(identity, issued, response)


def rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
