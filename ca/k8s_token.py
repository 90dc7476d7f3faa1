"""Kubernetes projected service-account tokens as a CA credential.

Standalone on purpose (imports neither meshcar nor the rest of ca/): the CA's sign endpoint
calls `verify_projected_token` for a `k8s_token` credential and gets the SPIFFE ID to issue,
or a `K8sTokenError` whose `reason` is safe to return to the caller (it never contains the
token).

The CA verifies the JWT itself against the cluster's service-account issuer keys (a JWKS,
from a file or the issuer's OIDC discovery document), so it needs no TokenReview RBAC:

- the signature, with RS256 or ES256 only (never `none`, never HMAC), by the JWKS key named
  by the token's `kid` (a token without `kid` is accepted only if the JWKS holds one key);
- `iss` equal to the cluster issuer, `aud` containing the CA's audience;
- `exp` required, `nbf`/`iat` if present, each with a small leeway, against `now`;
- the claims of a projected token: `sub` = `system:serviceaccount:NS:SA` and
  `"kubernetes.io": {"namespace": NS, "serviceaccount": {"name": SA, "uid": ...}, ...}`,
  which must agree; NS and SA must be DNS labels/subdomains (they become a URI path).

The result is `spiffe://TD/ns/NS/sa/SA`.
"""

from __future__ import annotations

import json
import re
import ssl
import time
from typing import Any

import httpx
import jwt

ALLOWED_ALGORITHMS = ("RS256", "ES256")
LEEWAY_SECONDS = 30
MAX_TOKEN_BYTES = 16 * 1024
_NS_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SA_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_TD_RE = re.compile(r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$")


class K8sTokenError(Exception):
    """The token is not a valid projected service-account token for this CA."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _key_for(token: str, jwks: dict[str, Any]) -> tuple[Any, str]:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise K8sTokenError(f"malformed token: {exc}") from None
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise K8sTokenError(f"algorithm {alg!r} not allowed (RS256 or ES256 only)")
    try:
        keyset = jwt.PyJWKSet.from_dict(jwks)
    except (jwt.PyJWTError, KeyError, TypeError, ValueError) as exc:
        raise K8sTokenError(f"unusable JWKS: {exc}") from None
    kid = header.get("kid")
    if kid is None:
        if len(keyset.keys) != 1:
            raise K8sTokenError("token has no kid and the JWKS holds several keys")
        jwk = keyset.keys[0]
    else:
        matches = [k for k in keyset.keys if k.key_id == kid]
        if not matches:
            raise K8sTokenError(f"unknown signing key (kid {kid!r})")
        jwk = matches[0]
    key_alg = getattr(jwk, "algorithm_name", None)
    if key_alg and key_alg != alg:
        raise K8sTokenError(f"token algorithm {alg} does not match the key's {key_alg}")
    return jwk.key, alg


def _check_time(claims: dict[str, Any], now: float) -> None:
    def num(name: str) -> float | None:
        value = claims.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise K8sTokenError(f"claim {name} is not a number")
        return float(value)

    exp = num("exp")
    if exp is None:
        raise K8sTokenError("missing claim exp")
    if now > exp + LEEWAY_SECONDS:
        raise K8sTokenError("token expired")
    nbf = num("nbf")
    if nbf is not None and now + LEEWAY_SECONDS < nbf:
        raise K8sTokenError("token not yet valid (nbf)")
    iat = num("iat")
    if iat is not None and now + LEEWAY_SECONDS < iat:
        raise K8sTokenError("token issued in the future (iat)")


def _identity(claims: dict[str, Any]) -> tuple[str, str]:
    k8s = claims.get("kubernetes.io")
    if not isinstance(k8s, dict):
        raise K8sTokenError("missing claim kubernetes.io (not a projected service-account token)")
    ns = k8s.get("namespace")
    sa = k8s.get("serviceaccount")
    name = sa.get("name") if isinstance(sa, dict) else None
    if not isinstance(ns, str) or not ns:
        raise K8sTokenError("missing claim kubernetes.io.namespace")
    if not isinstance(name, str) or not name:
        raise K8sTokenError("missing claim kubernetes.io.serviceaccount.name")
    if not _NS_RE.match(ns):
        raise K8sTokenError("kubernetes.io.namespace is not a valid namespace name")
    if not _SA_RE.match(name):
        raise K8sTokenError("kubernetes.io.serviceaccount.name is not a valid service account name")
    if claims.get("sub") != f"system:serviceaccount:{ns}:{name}":
        raise K8sTokenError("claim sub does not match kubernetes.io namespace and service account")
    return ns, name


def verify_projected_token(
    token: str,
    *,
    jwks: dict[str, Any],
    issuer: str,
    audience: str,
    trust_domain: str,
    now: float | None = None,
) -> str:
    """Verify a projected service-account JWT; return `spiffe://TD/ns/NS/sa/SA`."""
    if not _TD_RE.match(trust_domain):
        raise ValueError(f"invalid trust domain {trust_domain!r}")
    if not isinstance(token, str) or not token:
        raise K8sTokenError("empty token")
    if len(token) > MAX_TOKEN_BYTES:
        raise K8sTokenError("token too large")
    key, alg = _key_for(token, jwks)
    try:
        claims = jwt.decode(
            token,
            key=key,
            algorithms=[alg],
            audience=audience,
            issuer=issuer,
            options={
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "require": ["iss", "aud", "exp", "sub"],
            },
        )
    except jwt.InvalidSignatureError:
        raise K8sTokenError("bad signature") from None
    except jwt.InvalidAudienceError:
        raise K8sTokenError(f"wrong audience (want {audience!r})") from None
    except jwt.InvalidIssuerError:
        raise K8sTokenError("wrong issuer") from None
    except jwt.MissingRequiredClaimError as exc:
        raise K8sTokenError(f"missing claim {exc.claim}") from None
    except jwt.PyJWTError as exc:
        raise K8sTokenError(f"invalid token: {exc}") from None
    _check_time(claims, time.time() if now is None else now)
    ns, sa = _identity(claims)
    return f"spiffe://{trust_domain}/ns/{ns}/sa/{sa}"


def _check_jwks(doc: Any, source: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise K8sTokenError(f"{source}: not a JWKS (no keys list)")
    return doc


def load_jwks_file(path: str) -> dict[str, Any]:
    """A JWKS from a file, e.g. `kubectl get --raw /openid/v1/jwks > jwks.json`."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except OSError as exc:
        raise K8sTokenError(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise K8sTokenError(f"{path}: not JSON: {exc}") from None
    return _check_jwks(doc, path)


def fetch_jwks(
    discovery_base: str,
    *,
    expected_issuer: str,
    ca_file: str | None = None,
    bearer_token: str | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Fetch the JWKS through OIDC discovery: `{discovery_base}/.well-known/openid-configuration`
    -> `jwks_uri`. In-cluster, `discovery_base` is `https://kubernetes.default.svc`, `ca_file`
    the service-account `ca.crt` (None: the system trust store) and `bearer_token` the CA pod's own token (the
    `system:service-account-issuer-discovery` ClusterRole grants the read)."""
    verify = ssl.create_default_context(cafile=ca_file) if ca_file else True
    headers = {"Authorization": f"Bearer {bearer_token}"} if bearer_token else {}
    url = discovery_base.rstrip("/") + "/.well-known/openid-configuration"
    try:
        with httpx.Client(
            verify=verify, timeout=timeout, headers=headers, follow_redirects=False
        ) as client:
            resp = client.get(url)
            resp.raise_for_status()
            discovery = resp.json()
            if not isinstance(discovery, dict):
                raise K8sTokenError(f"{url}: not a discovery document")
            if discovery.get("issuer") != expected_issuer:
                raise K8sTokenError(
                    f"{url}: issuer {discovery.get('issuer')!r} is not {expected_issuer!r}"
                )
            jwks_uri = discovery.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
                raise K8sTokenError(f"{url}: jwks_uri missing or not https")
            resp = client.get(jwks_uri)
            resp.raise_for_status()
            return _check_jwks(resp.json(), jwks_uri)
    except httpx.HTTPError as exc:
        raise K8sTokenError(f"cannot fetch JWKS via {url}: {exc}") from None
    except ValueError as exc:  # JSON decoding
        raise K8sTokenError(f"cannot fetch JWKS via {url}: not JSON ({exc})") from None
