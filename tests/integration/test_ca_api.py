"""Integration tests of the CA's HTTPS API: an in-process trio server on 127.0.0.1:0 with real
TLS, called with httpx (root as the only trust anchor) and with raw sockets for junk."""

from __future__ import annotations

import json
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID
from meshcar_ca import pki
from meshcar_ca.api import CAServer, Limits
from meshcar_ca.auth import Authenticator, mint_token
from meshcar_ca.files import CAPaths, create_ca
from meshcar_ca.issuer import BuiltinIssuer
from meshcar_ca.sign import SignService
from meshcar_ca.store import Store
from meshcar_ca.tls import server_context

TD = "meshcar.test"
API = f"spiffe://{TD}/svc/api"
ADMIN = f"spiffe://{TD}/svc/admin"


@dataclass
class RunningCA:
    paths: CAPaths
    issuer: BuiltinIssuer
    store: Store
    port: int
    logs: list[dict[str, Any]]
    tmp: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def token(
        self, spiffe_id: str = API, ttl: int = 3600, uses: int = 1, now: int | None = None
    ) -> str:
        t = int(datetime.now(UTC).timestamp()) if now is None else now
        return mint_token(self.store, TD, spiffe_id, ttl, uses, t)

    def client_ctx(
        self, chain_pem: str | None = None, key: ec.EllipticCurvePrivateKey | None = None
    ) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.paths.root_pem))
        if chain_pem is not None and key is not None:
            n = len(list(self.tmp.glob("client*.pem")))
            cert_file, key_file = self.tmp / f"client{n}.pem", self.tmp / f"client{n}.key"
            cert_file.write_text(chain_pem)
            key_file.write_bytes(pki.key_pem(key))
            ctx.load_cert_chain(cert_file, key_file)
        return ctx

    def client(self, ctx: ssl.SSLContext | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, verify=ctx or self.client_ctx(), timeout=10)


async def start_ca(tmp_path: Path, nursery: trio.Nursery, k8s_verifier: Any = None) -> RunningCA:
    paths = create_ca(tmp_path / "ca", TD, 86400, datetime.now(UTC))
    issuer = BuiltinIssuer.load(paths.dir)
    store = Store(paths.db)
    logs: list[dict[str, Any]] = []
    server = CAServer(
        SignService(issuer, Authenticator(store, issuer, k8s_verifier), store),
        server_context(paths),
        Limits(handshake_timeout=1.5, idle_timeout=2.0, request_timeout=3.0),
        log=logs.append,
    )
    listeners = await nursery.start(server.serve, "127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    return RunningCA(paths, issuer, store, port, logs, tmp_path)


@pytest.fixture
async def ca(tmp_path: Path, nursery: trio.Nursery) -> RunningCA:
    return await start_ca(tmp_path, nursery)


def make_csr(key: Any = None, cn: str = "x", san: str | None = None) -> tuple[Any, str]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if san:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]), critical=False
        )
    return key, b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


async def sign(
    ca: RunningCA, body: dict[str, Any], ctx: ssl.SSLContext | None = None
) -> httpx.Response:
    async with ca.client(ctx) as c:
        return await c.post("/v1/sign", json=body)


def assert_error(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert body["error"] == code and body["message"]


async def assert_still_serving(ca: RunningCA) -> None:
    key, csr = make_csr()
    resp = await sign(ca, {"csr": csr, "token": ca.token()})
    assert resp.status_code == 200, resp.text


def verify_chain(ca: RunningCA, chain_pem: str) -> x509.Certificate:
    certs = x509.load_pem_x509_certificates(chain_pem.encode())
    root = x509.load_pem_x509_certificate(ca.paths.root_pem.read_bytes())
    verifier = (
        verification.PolicyBuilder().store(verification.Store([root])).build_client_verifier()
    )
    verifier.verify(certs[0], certs[1:])
    return certs[0]


# --- the happy paths ---------------------------------------------------------------------------


async def test_healthz_and_bundle(ca: RunningCA) -> None:
    async with ca.client() as c:
        health = await c.get("/healthz")
        bundle = await c.get("/v1/bundle")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert bundle.status_code == 200
    assert bundle.headers["content-type"] == "application/x-pem-file"
    assert bundle.headers["x-meshcar-bundle-version"] == "1"
    assert bundle.text == ca.paths.root_pem.read_text()


async def test_sign_with_token(ca: RunningCA) -> None:
    key, csr = make_csr()
    token = ca.token()
    resp = await sign(ca, {"csr": csr, "token": token, "bundle_version": 1})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["spiffe_id"] == API and body["bundle_version"] == 1
    assert body["bundle"] == ca.paths.root_pem.read_text()
    leaf = verify_chain(ca, body["chain"])
    assert body["certificate"] == pki.cert_pem(leaf)
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert pki.uri_sans(leaf) == [API]
    assert format(leaf.serial_number, "x") == body["serial"]
    lifetime = leaf.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(minutes=59) < lifetime <= timedelta(hours=1)
    assert body["not_after"] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    (record,) = ca.store.certificates()
    assert (record.serial, record.spiffe_id, record.auth, record.client_bundle_version) == (
        body["serial"],
        API,
        "token",
        1,
    )
    assert record.not_after == body["not_after"]
    line = [r for r in ca.logs if r.get("path") == "/v1/sign"][-1]
    assert line["status"] == 200 and line["spiffe_id"] == API and line["auth"] == "token"
    assert token not in json.dumps(ca.logs)


async def test_ttl_is_clamped_to_max(ca: RunningCA) -> None:
    _, csr = make_csr()
    resp = await sign(ca, {"csr": csr, "token": ca.token(), "ttl_seconds": 30 * 86400})
    leaf = x509.load_pem_x509_certificate(resp.json()["certificate"].encode())
    assert leaf.not_valid_after_utc - datetime.now(UTC) <= timedelta(days=1)
    _, csr = make_csr()
    resp = await sign(ca, {"csr": csr, "token": ca.token(), "ttl_seconds": 120})
    leaf = x509.load_pem_x509_certificate(resp.json()["certificate"].encode())
    assert leaf.not_valid_after_utc - datetime.now(UTC) <= timedelta(seconds=120)


async def test_csr_naming_another_identity_gets_the_tokens_identity(ca: RunningCA) -> None:
    _, csr = make_csr(cn=ADMIN, san=ADMIN)
    resp = await sign(ca, {"csr": csr, "token": ca.token(API)})
    assert resp.status_code == 200
    leaf = verify_chain(ca, resp.json()["chain"])
    assert pki.uri_sans(leaf) == [API]
    assert resp.json()["spiffe_id"] == API
    assert ADMIN not in leaf.subject.rfc4514_string()


async def test_renewal_over_mtls(ca: RunningCA) -> None:
    key, csr = make_csr()
    first = (await sign(ca, {"csr": csr, "token": ca.token()})).json()
    new_key, new_csr = make_csr(san=ADMIN)
    resp = await sign(
        ca, {"csr": new_csr, "bundle_version": 1}, ctx=ca.client_ctx(first["chain"], key)
    )
    assert resp.status_code == 200, resp.text
    second = resp.json()
    assert second["spiffe_id"] == API and second["serial"] != first["serial"]
    leaf = verify_chain(ca, second["chain"])
    assert leaf.public_key().public_numbers() == new_key.public_key().public_numbers()
    assert [r.auth for r in ca.store.certificates()] == ["token", "renewal"]
    # and again with the renewed certificate
    third = await sign(ca, {"csr": make_csr()[1]}, ctx=ca.client_ctx(second["chain"], new_key))
    assert third.status_code == 200 and third.json()["spiffe_id"] == API


def _sign_blocking(
    ca: RunningCA, ctx: ssl.SSLContext, body: dict[str, Any], session: ssl.SSLSession | None
) -> tuple[int, dict[str, Any], ssl.SSLSession | None, bool]:
    """One POST /v1/sign on a new connection offering `session`: status, answer, the session
    to offer next time, whether this one was resumed."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", ca.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
            s.sendall(
                b"POST /v1/sign HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(data), data)
            )
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
            head, _, payload = answer.partition(b"\r\n\r\n")
            return int(head.split()[1]), json.loads(payload), s.session, s.session_reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
async def test_session_resumption_and_the_renewal_certificate(
    ca: RunningCA, version: ssl.TLSVersion
) -> None:
    """The API issues no session tickets. TLS 1.3: a client offering the session of its
    previous connection gets a full handshake, so each renewal is authenticated by the
    certificate it presents now (proof of its key included). TLS 1.2: OpenSSL's server-side
    session-ID cache may still resume; a resumed session carries the certificate of its full
    handshake, and the request is checked and recorded as a renewal of exactly that one."""
    key, csr = make_csr()
    first = (await sign(ca, {"csr": csr, "token": ca.token()})).json()
    ctx = ca.client_ctx(first["chain"], key)
    ctx.minimum_version = ctx.maximum_version = version
    status, renewed, session, reused = await trio.to_thread.run_sync(
        _sign_blocking, ca, ctx, {"csr": make_csr()[1]}, None
    )
    assert status == 200 and renewed["spiffe_id"] == API and not reused
    for _ in range(2):
        status, again, session, reused = await trio.to_thread.run_sync(
            _sign_blocking, ca, ctx, {"csr": make_csr()[1]}, session
        )
        assert status == 200 and again["spiffe_id"] == API
        assert reused is (version == ssl.TLSVersion.TLSv1_2)
    renewals = [r for r in ca.store.certificates() if r.auth == "renewal"]
    assert len(renewals) == 3
    assert {r.renewed_from for r in renewals} == {first["serial"]}


async def test_token_wins_over_client_certificate(ca: RunningCA) -> None:
    key, csr = make_csr()
    first = (await sign(ca, {"csr": csr, "token": ca.token(API)})).json()
    web = f"spiffe://{TD}/svc/web"
    resp = await sign(
        ca, {"csr": make_csr()[1], "token": ca.token(web)}, ctx=ca.client_ctx(first["chain"], key)
    )
    assert resp.json()["spiffe_id"] == web


async def test_concurrent_signing(ca: RunningCA) -> None:
    results: list[httpx.Response] = []
    tokens = [ca.token(f"spiffe://{TD}/svc/s{i}") for i in range(16)]

    async def one(token: str) -> None:
        results.append(await sign(ca, {"csr": make_csr()[1], "token": token}))

    async with trio.open_nursery() as n:
        for t in tokens:
            n.start_soon(one, t)
    assert [r.status_code for r in results] == [200] * 16
    records = ca.store.certificates()
    assert len({r.serial for r in records}) == 16
    assert {r.spiffe_id for r in records} == {f"spiffe://{TD}/svc/s{i}" for i in range(16)}


# --- credentials that do not work -------------------------------------------------------------


async def test_token_errors(ca: RunningCA) -> None:
    _, csr = make_csr()
    assert_error(await sign(ca, {"csr": csr, "token": "not-a-token"}), 401, "bad_token")
    assert_error(await sign(ca, {"csr": csr, "token": ""}), 401, "bad_token")
    old = ca.token(now=int(datetime.now(UTC).timestamp()) - 7200, ttl=3600)
    assert_error(await sign(ca, {"csr": csr, "token": old}), 401, "token_expired")
    once = ca.token()
    assert (await sign(ca, {"csr": csr, "token": once})).status_code == 200
    assert_error(await sign(ca, {"csr": csr, "token": once}), 401, "token_used_up")
    assert_error(await sign(ca, {"csr": csr}), 401, "no_credential")
    assert_error(await sign(ca, {"csr": csr, "k8s_token": "a.b.c"}), 401, "bad_k8s_token")
    assert len(ca.store.certificates()) == 1


async def test_expired_client_certificate_gets_401(ca: RunningCA) -> None:
    key = pki.new_key()
    past = datetime.now(UTC) - timedelta(hours=3)
    validity = pki.svid_validity(past, 3600, 86400, ca.issuer.intermediate.not_valid_after_utc)
    cert = pki.build_svid(
        key.public_key(), API, validity, ca.issuer.intermediate, ca.issuer.intermediate_key
    )
    chain = pki.cert_pem(cert, ca.issuer.intermediate)
    resp = await sign(ca, {"csr": make_csr()[1]}, ctx=ca.client_ctx(chain, key))
    assert_error(resp, 401, "bad_client_certificate")
    assert "expired" in resp.json()["message"]


async def test_foreign_client_certificate_is_refused(ca: RunningCA, tmp_path: Path) -> None:
    other = BuiltinIssuer.load(create_ca(tmp_path / "other", TD, 86400, datetime.now(UTC)).dir)
    key = pki.new_key()
    validity = pki.svid_validity(
        datetime.now(UTC), 3600, 86400, other.intermediate.not_valid_after_utc
    )
    cert = pki.build_svid(
        key.public_key(), API, validity, other.intermediate, other.intermediate_key
    )
    tcp = await trio.open_tcp_stream("127.0.0.1", ca.port)
    ctx = ca.client_ctx(pki.cert_pem(cert, other.intermediate), key)
    stream = trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1")
    body = json.dumps({"csr": make_csr()[1]}).encode()
    # TLS 1.3: the client finishes its side first; the server's rejection arrives as an alert
    with pytest.raises(trio.BrokenResourceError):
        await stream.do_handshake()
        await stream.send_all(
            b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await stream.receive_some(65536)
    await trio.aclose_forcefully(stream)
    assert not ca.store.certificates()
    await assert_still_serving(ca)


# --- bad input -----------------------------------------------------------------------------------


def _rsa_csr() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return make_csr(key)[1]


def _tampered_csr() -> str:
    import base64

    der = x509.load_pem_x509_csr(make_csr(cn="aaaaaaaa")[1].encode()).public_bytes(
        serialization.Encoding.DER
    )
    bad = der.replace(b"aaaaaaaa", b"bbbbbbbb")
    return (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bad).decode()
        + "-----END CERTIFICATE REQUEST-----\n"
    )


@pytest.mark.parametrize(
    ("csr", "code"),
    [
        (lambda: "garbage", "bad_csr"),
        (
            lambda: (
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            ),
            "bad_csr",
        ),
        (_tampered_csr, "bad_csr"),
        (_rsa_csr, "unsupported_key"),
        (lambda: make_csr(ec.generate_private_key(ec.SECP384R1()))[1], "unsupported_key"),
    ],
    ids=["garbage", "bad-der", "bad-signature", "rsa", "p384"],
)
async def test_bad_csrs_do_not_consume_the_token(ca: RunningCA, csr: Any, code: str) -> None:
    token = ca.token()
    assert_error(await sign(ca, {"csr": csr(), "token": token}), 400, code)
    resp = await sign(ca, {"csr": make_csr()[1], "token": token})
    assert resp.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b"{}",
        b'{"csr": 5}',
        b'{"csr": ""}',
        b"\xff\xfe",
        b'{"csr": "x", "token": 7}',
        b'{"csr": "x", "ttl_seconds": "1h"}',
        b'{"csr": "x", "ttl_seconds": 0}',
        b'{"csr": "x", "ttl_seconds": true}',
        b'{"csr": "x", "token": "a", "k8s_token": "b"}',
    ],
)
async def test_bad_request_bodies(ca: RunningCA, body: bytes) -> None:
    async with ca.client() as c:
        resp = await c.post("/v1/sign", content=body, headers={"content-type": "application/json"})
    assert_error(resp, 400, "bad_request")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n" + b"A" * 70000,
        b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"400\r\n" + b"A" * 1024 + b"\r\n") * 70,
    ],
    ids=["content-length", "chunked"],
)
async def test_oversized_bodies(ca: RunningCA, request_bytes: bytes) -> None:
    stream = await _tls(ca)
    with trio.move_on_after(5):
        try:
            await stream.send_all(request_bytes)
        except trio.BrokenResourceError:
            pass  # the server may answer and close before reading everything: that is the point
    answer = await _read_all(stream)
    await trio.aclose_forcefully(stream)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert json.loads(body)["error"] == "too_large"
    await assert_still_serving(ca)


async def test_unknown_path_and_method(ca: RunningCA) -> None:
    async with ca.client() as c:
        assert_error(await c.get("/v1/nope"), 404, "not_found")
        resp = await c.get("/v1/sign")
        assert_error(resp, 405, "method_not_allowed")
        assert resp.headers["allow"] == "POST"
        assert_error(await c.post("/healthz", content=b"{}"), 405, "method_not_allowed")
        head = await c.head("/healthz")
        assert head.status_code == 200 and head.content == b""
        assert (await c.get("/healthz")).status_code == 200  # same keep-alive connection


# --- junk on the socket ----------------------------------------------------------------------------


async def _tls(ca: RunningCA) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream("127.0.0.1", ca.port)
    stream = trio.SSLStream(tcp, ca.client_ctx(), server_hostname="127.0.0.1")
    await stream.do_handshake()
    return stream


async def _read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    with trio.fail_after(5):
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
        except trio.BrokenResourceError:
            pass
    return data


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 40000,
    ],
    ids=["garbage", "no-host", "bad-content-length", "bad-chunk", "huge-header"],
)
async def test_bad_http_gets_4xx_and_close(ca: RunningCA, request_bytes: bytes) -> None:
    stream = await _tls(ca)
    await stream.send_all(request_bytes)
    answer = await _read_all(stream)
    await trio.aclose_forcefully(stream)
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    assert 400 <= status < 500, answer
    assert json.loads(body)["error"] in ("bad_request", "too_large")
    await assert_still_serving(ca)


@pytest.mark.parametrize(
    "junk",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x00\x05hello",
        bytes(range(256)) * 4,
    ],
    ids=["plaintext-http", "truncated-hello", "binary"],
)
async def test_tls_junk_is_dropped(ca: RunningCA, junk: bytes) -> None:
    tcp = await trio.open_tcp_stream("127.0.0.1", ca.port)
    await tcp.send_all(junk)
    answer = await _read_all(tcp)  # the server closes (or times out the handshake)
    await tcp.aclose()
    assert b"HTTP/1.1" not in answer
    await assert_still_serving(ca)
    assert any(r["event"] == "ca.tls_error" for r in ca.logs)


async def test_stalled_client_does_not_block_others_and_is_closed(ca: RunningCA) -> None:
    stalled = await trio.open_tcp_stream("127.0.0.1", ca.port)  # sends nothing at all
    half = await _tls(ca)
    await half.send_all(
        b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
    )  # stalls mid-body
    await assert_still_serving(ca)
    assert await _read_all(stalled) == b""  # closed by the handshake timeout (1.5 s here)
    await _read_all(half)  # closed by the request timeout (3 s here)
    await stalled.aclose()
    await trio.aclose_forcefully(half)
    assert any(r.get("error") == "handshake_timeout" for r in ca.logs)
    assert any(r.get("status") == 408 for r in ca.logs)


# --- Kubernetes projected tokens (verifier from ca/k8s_token.py) -------------------------------


async def test_k8s_token_issues_namespace_service_account_identity(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    import time

    import jwt
    from meshcar_ca.auth import projected_token_verifier

    signing_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(signing_key.public_key()))
    jwks = {"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "ES256"}]}
    issuer = "https://kubernetes.default.svc"
    ca = await start_ca(tmp_path, nursery, projected_token_verifier(jwks, issuer, "meshcar-ca", TD))

    def k8s_jwt(aud: str = "meshcar-ca", ns: str = "shop", sa: str = "api") -> str:
        now = int(time.time())
        claims = {
            "iss": issuer,
            "aud": [aud],
            "exp": now + 600,
            "iat": now,
            "nbf": now,
            "sub": f"system:serviceaccount:{ns}:{sa}",
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u"}},
        }
        return jwt.encode(claims, signing_key, algorithm="ES256", headers={"kid": "k1"})

    token = k8s_jwt()
    resp = await sign(ca, {"csr": make_csr(san=ADMIN)[1], "k8s_token": token})
    assert resp.status_code == 200, resp.text
    leaf = verify_chain(ca, resp.json()["chain"])
    assert pki.uri_sans(leaf) == [f"spiffe://{TD}/ns/shop/sa/api"]
    assert ca.store.certificates()[0].auth == "k8s_token"

    wrong_aud = await sign(ca, {"csr": make_csr()[1], "k8s_token": k8s_jwt(aud="kubernetes")})
    assert_error(wrong_aud, 401, "bad_k8s_token")
    assert "audience" in wrong_aud.json()["message"]
    other_key = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(
        jwt.decode(token, options={"verify_signature": False}),
        other_key,
        algorithm="ES256",
        headers={"kid": "k1"},
    )
    assert_error(await sign(ca, {"csr": make_csr()[1], "k8s_token": forged}), 401, "bad_k8s_token")
    assert_error(
        await sign(ca, {"csr": make_csr()[1], "k8s_token": "garbage"}), 401, "bad_k8s_token"
    )
    assert token not in json.dumps(ca.logs)


async def test_a_failing_backend_costs_one_request_only(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """An unexpected error in the issuer answers 500 to that request and the server keeps serving."""
    ca = await start_ca(tmp_path, nursery)
    real = ca.issuer
    calls: list[str] = []

    class FlakyIssuer:
        trust_domain = TD

        def sign(self, csr: Any, spiffe_id: str, ttl: int | None) -> Any:
            calls.append(spiffe_id)
            if len(calls) == 1:
                raise RuntimeError("backend exploded")
            return real.sign(csr, spiffe_id, ttl)

        def bundle(self) -> Any:
            return real.bundle()

        def issuing_certificates(self) -> Any:
            return real.issuing_certificates()

    flaky = FlakyIssuer()
    server = CAServer(
        SignService(flaky, Authenticator(ca.store, flaky), ca.store),
        server_context(ca.paths),
        log=ca.logs.append,
    )
    listeners = await nursery.start(server.serve, "127.0.0.1", 0)
    ca.port = listeners[0].socket.getsockname()[1]
    assert_error(await sign(ca, {"csr": make_csr()[1], "token": ca.token()}), 500, "internal")
    assert "exploded" not in json.dumps(ca.logs)
    await assert_still_serving(ca)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 30_000 + b"]" * 30_000,
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        b'{"csr": ' + b"[" * 25_000 + b"]" * 25_000 + b"}",
    ],
    ids=["deep-array", "deep-object", "deep-field"],
)
async def test_deeply_nested_json_is_400_not_500(ca: RunningCA, body: bytes) -> None:
    async with ca.client() as c:
        resp = await c.post("/v1/sign", content=body, headers={"content-type": "application/json"})
    assert len(body) < 64 * 1024  # under the body limit: the parser must see it
    assert_error(resp, 400, "bad_request")
    assert "nested too deeply" in resp.json()["message"]
    assert ca.logs and not any(e.get("event") == "ca.internal_error" for e in ca.logs)
    await assert_still_serving(ca)


async def test_failed_authentications_are_rate_limited_per_source(ca: RunningCA) -> None:
    _, csr = make_csr()
    statuses = []
    async with ca.client() as c:
        for _ in range(40):
            r = await c.post("/v1/sign", json={"csr": csr, "token": "guess"})
            statuses.append(r.status_code)
        limited = [s for s in statuses if s == 429]
        assert statuses[:10] == [401] * 10  # the burst is answered normally
        assert len(limited) >= 25, statuses  # then refused cheaply
        r = await c.post("/v1/sign", json={"csr": csr, "token": "guess"})
        assert_error(r, 429, "rate_limited")
        assert int(r.headers["retry-after"]) >= 1
    assert ca.logs[-1]["status"] == 429
    await assert_healthz(ca)  # other endpoints still answer this source


async def test_mtls_renewals_are_never_throttled(ca: RunningCA) -> None:
    key, csr = make_csr()
    first = await sign(ca, {"csr": csr, "token": ca.token()})
    assert first.status_code == 200
    chain = first.json()["chain"]
    async with ca.client() as c:  # spend the source's budget with bad tokens
        for _ in range(15):
            await c.post("/v1/sign", json={"csr": csr, "token": "guess"})
    renewed = await sign(ca, {"csr": make_csr(key)[1]}, ca.client_ctx(chain, key))
    assert renewed.status_code == 200, renewed.text


def test_throttle_refills_over_time() -> None:
    from meshcar_ca.throttle import AuthThrottle

    now = [0.0]
    t = AuthThrottle(burst=3, per_second=0.5, clock=lambda: now[0])
    assert t.retry_after("a") == 0
    for _ in range(3):
        t.failed("a")
    assert t.retry_after("a") == 2 and t.retry_after("b") == 0
    now[0] = 2.0
    assert t.retry_after("a") == 0
    t.failed("a")
    assert t.retry_after("a") == 2
    small = AuthThrottle(burst=1, per_second=1, max_sources=3, clock=lambda: now[0])
    for i in range(10):
        small.failed(str(i))
    assert len(small._buckets) <= 3


async def assert_healthz(ca: RunningCA) -> None:
    async with ca.client() as c:
        assert (await c.get("/healthz")).status_code == 200


async def test_connections_over_max_connections_are_closed_before_tls(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A flood of idle TCP connections costs the CA no handshake: over `max_connections`
    one is closed at once (counted, logged), and once a slot frees, signing works again."""
    paths = create_ca(tmp_path / "ca", TD, 86400, datetime.now(UTC))
    issuer = BuiltinIssuer.load(paths.dir)
    store = Store(paths.db)
    logs: list[dict[str, Any]] = []
    server = CAServer(
        SignService(issuer, Authenticator(store, issuer), store),
        server_context(paths),
        Limits(handshake_timeout=30, max_connections=2),
        log=logs.append,
    )
    listeners = await nursery.start(server.serve, "127.0.0.1", 0)
    ca = RunningCA(paths, issuer, store, listeners[0].socket.getsockname()[1], logs, tmp_path)
    held = [await trio.open_tcp_stream("127.0.0.1", ca.port) for _ in range(2)]
    await trio.testing.wait_all_tasks_blocked()  # both accepted, waiting for a ClientHello
    assert server.open_connections == 2
    third = await trio.open_tcp_stream("127.0.0.1", ca.port)
    with trio.fail_after(10):
        assert await third.receive_some(100) == b""
    await third.aclose()
    assert server.refused_connections == 1
    assert any(e.get("event") == "ca.connection_refused" for e in logs)
    await held[0].aclose()
    with trio.fail_after(10):
        while server.open_connections > 1:  # the handler sees the close
            await trio.sleep(0.01)
    await assert_still_serving(ca)
    await held[1].aclose()
