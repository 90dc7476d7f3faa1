"""Projected service-account token verification (ca/k8s_token.py) with test-key-signed tokens
in the exact shape the kubelet projects."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from meshcar_ca.k8s_token import (
    K8sTokenError,
    fetch_jwks,
    load_jwks_file,
    verify_projected_token,
)

ISSUER = "https://kubernetes.default.svc.cluster.local"
AUD = "meshcar-ca"
TD = "meshcar.demo"
NOW = 1_800_000_000.0

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(pub: Any, kid: str, alg: str) -> dict[str, Any]:
    conv = RSAAlgorithm if alg == "RS256" else ECAlgorithm
    d = conv.to_jwk(pub, as_dict=True)
    d.update({"kid": kid, "use": "sig", "alg": alg})
    return d


JWKS = {
    "keys": [
        _jwk(RSA_KEY.public_key(), "rsa-1", "RS256"),
        _jwk(EC_KEY.public_key(), "ec-1", "ES256"),
    ]
}


def claims(**over: Any) -> dict[str, Any]:
    """Claims as a kubelet-projected token carries them (audience-bound, pod-bound)."""
    c: dict[str, Any] = {
        "aud": [AUD],
        "exp": int(NOW) + 600,
        "iat": int(NOW) - 10,
        "nbf": int(NOW) - 10,
        "iss": ISSUER,
        "jti": "6f2b1c0e-1d7e-4a0b-9c55-1a2b3c4d5e6f",
        "kubernetes.io": {
            "namespace": "default",
            "node": {"name": "node-1", "uid": "0e8b2a4c-0000-4000-8000-000000000001"},
            "pod": {"name": "api-7c9d8-abcde", "uid": "0e8b2a4c-0000-4000-8000-000000000002"},
            "serviceaccount": {"name": "api", "uid": "0e8b2a4c-0000-4000-8000-000000000003"},
            "warnafter": int(NOW) + 300,
        },
        "sub": "system:serviceaccount:default:api",
    }
    c.update(over)
    return c


def sign(
    c: dict[str, Any], key: Any = RSA_KEY, alg: str = "RS256", kid: str | None = "rsa-1"
) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(c, key, algorithm=alg, headers=headers)


def verify(token: str, **kw: Any) -> str:
    args: dict[str, Any] = {
        "jwks": JWKS,
        "issuer": ISSUER,
        "audience": AUD,
        "trust_domain": TD,
        "now": NOW,
    }
    args.update(kw)
    return verify_projected_token(token, **args)


def test_valid_rs256() -> None:
    assert verify(sign(claims())) == "spiffe://meshcar.demo/ns/default/sa/api"


def test_valid_es256() -> None:
    tok = sign(
        claims(
            sub="system:serviceaccount:shop:payments",
            **{
                "kubernetes.io": {
                    "namespace": "shop",
                    "serviceaccount": {"name": "payments", "uid": "u"},
                }
            },
        ),
        key=EC_KEY,
        alg="ES256",
        kid="ec-1",
    )
    assert verify(tok) == "spiffe://meshcar.demo/ns/shop/sa/payments"


def test_audience_as_string_and_among_several() -> None:
    assert verify(sign(claims(aud=AUD))).endswith("/sa/api")
    assert verify(sign(claims(aud=["https://kubernetes.default.svc", AUD]))).endswith("/sa/api")


def test_leeway_applies_to_exp() -> None:
    tok = sign(claims(exp=int(NOW) - 5))
    assert verify(tok).endswith("/sa/api")
    with pytest.raises(K8sTokenError, match="expired"):
        verify(tok, now=NOW + 60)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (lambda: sign(claims(exp=int(NOW) - 3600)), "expired"),
        (lambda: sign(claims(nbf=int(NOW) + 3600)), "not yet valid"),
        (lambda: sign(claims(aud=["kubernetes"])), "wrong audience"),
        (lambda: sign(claims(iss="https://evil.example")), "wrong issuer"),
        (lambda: sign(claims(), key=OTHER_RSA), "bad signature"),
        (lambda: sign(claims(), kid="rotated-away"), "unknown signing key"),
        (lambda: sign(claims(), key=EC_KEY, alg="ES256", kid="rsa-1"), "does not match"),
        (lambda: jwt.encode(claims(), None, algorithm="none"), "not allowed"),
        (
            lambda: jwt.encode(
                claims(),
                "secret-secret-secret-secret-32by",
                algorithm="HS256",
                headers={"kid": "rsa-1"},
            ),
            "not allowed",
        ),
        (lambda: sign({k: v for k, v in claims().items() if k != "exp"}), "missing claim exp"),
        (lambda: sign({k: v for k, v in claims().items() if k != "aud"}), "missing claim aud"),
        (
            lambda: sign({k: v for k, v in claims().items() if k != "kubernetes.io"}),
            "kubernetes.io",
        ),
        (
            lambda: sign(claims(**{"kubernetes.io": {"serviceaccount": {"name": "api"}}})),
            "namespace",
        ),
        (
            lambda: sign(
                claims(**{"kubernetes.io": {"namespace": "default", "serviceaccount": {}}})
            ),
            "serviceaccount.name",
        ),
        (lambda: sign(claims(sub="system:serviceaccount:kube-system:admin")), "sub does not match"),
        (
            lambda: sign(
                claims(
                    sub="system:serviceaccount:a/b:api",
                    **{"kubernetes.io": {"namespace": "a/b", "serviceaccount": {"name": "api"}}},
                )
            ),
            "not a valid namespace",
        ),
        (lambda: "not.a.jwt", "malformed"),
        (lambda: "", "empty"),
    ],
)
def test_rejected(token: Any, reason: str) -> None:
    with pytest.raises(K8sTokenError, match=reason) as info:
        verify(token())
    assert reason in info.value.reason


def test_no_kid_only_with_a_single_key() -> None:
    tok = sign(claims(), kid=None)
    with pytest.raises(K8sTokenError, match="no kid"):
        verify(tok)
    single = {"keys": [JWKS["keys"][0]]}
    assert verify(tok, jwks=single).endswith("/sa/api")


def test_error_never_contains_the_token() -> None:
    tok = sign(claims(exp=int(NOW) - 3600))
    with pytest.raises(K8sTokenError) as info:
        verify(tok)
    assert tok not in str(info.value) and tok.split(".")[2] not in repr(info.value)


def test_load_jwks_file(tmp_path: Any) -> None:
    p = tmp_path / "jwks.json"
    p.write_text(json.dumps(JWKS))
    assert verify(sign(claims()), jwks=load_jwks_file(str(p))).endswith("/sa/api")
    p.write_text("{}")
    with pytest.raises(K8sTokenError, match="not a JWKS"):
        load_jwks_file(str(p))
    with pytest.raises(K8sTokenError, match="cannot read"):
        load_jwks_file(str(tmp_path / "missing.json"))


@pytest.fixture
def oidc_server() -> Iterator[tuple[str, trustme.CA, list[str]]]:
    """A real HTTPS OIDC discovery server on loopback (as the API server serves it)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    seen_auth: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen_auth.append(self.headers.get("Authorization", ""))
            base = f"https://127.0.0.1:{self.server.server_address[1]}"
            if self.path == "/.well-known/openid-configuration":
                body = {
                    "issuer": ISSUER,
                    "jwks_uri": base + "/openid/v1/jwks",
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                }
            elif self.path == "/openid/v1/jwks":
                body = JWKS
            else:
                self.send_error(404)
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", ca, seen_auth
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_fetch_jwks_via_discovery(oidc_server: tuple[str, trustme.CA, list[str]]) -> None:
    base, ca, seen = oidc_server
    with ca.cert_pem.tempfile() as ca_file:
        jwks = fetch_jwks(base, expected_issuer=ISSUER, ca_file=ca_file, bearer_token="sa-token")
        assert verify(sign(claims()), jwks=jwks).endswith("/sa/api")
        assert seen == ["Bearer sa-token", "Bearer sa-token"]
        with pytest.raises(K8sTokenError, match="is not"):
            fetch_jwks(base, expected_issuer="https://other", ca_file=ca_file)
    with pytest.raises(K8sTokenError, match="cannot fetch"):
        fetch_jwks(base, expected_issuer=ISSUER)  # server cert not trusted by the system store
