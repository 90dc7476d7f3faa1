"""Vault issuer: role templates, settings checks, how Vault's answers become CA errors.

The hvac client is replaced by a small double that raises what hvac raises, to pin the
error mapping; the real Vault/OpenBao behaviour is tested in tests/e2e/test_vault_e2e.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hvac.exceptions  # type: ignore[import-untyped]
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from meshcar_ca import pki
from meshcar_ca.errors import ConfigError, Forbidden, Unavailable
from meshcar_ca.vault_issuer import VaultIssuer, VaultSettings, role_for


def test_role_template() -> None:
    assert role_for("meshcar-{path}", "spiffe://td/svc/web") == "meshcar-svc-web"
    assert role_for("meshcar-{path}", "spiffe://td/ns/a/sa/b") == "meshcar-ns-a-sa-b"
    assert role_for("fixed", "spiffe://td/svc/web") == "fixed"


def test_settings_need_exactly_one_way_to_log_in(tmp_path: Path) -> None:
    f = tmp_path / "f"
    with pytest.raises(ConfigError, match="needs --vault-token-file"):
        VaultSettings(addr="http://x", role="r").check()
    with pytest.raises(ConfigError, match="needs --vault-token-file"):
        VaultSettings(addr="http://x", role="r", approle_role_id_file=f).check()
    with pytest.raises(ConfigError, match="not both"):
        VaultSettings(
            addr="http://x",
            role="r",
            token_file=f,
            approle_role_id_file=f,
            approle_secret_id_file=f,
        ).check()
    VaultSettings(addr="http://x", role="r", token_file=f).check()


class _PKI:
    def __init__(self, raises: list[Exception]) -> None:
        self.raises = raises
        self.calls = 0

    def sign_certificate(self, **kw: Any) -> Any:
        self.calls += 1
        raise self.raises.pop(0) if self.raises else AssertionError("unexpected call")


class _Client:
    def __init__(self, raises: list[Exception]) -> None:
        self.secrets = type("S", (), {})()
        self.secrets.pki = _PKI(raises)
        self.logins = 0
        self.auth = type("A", (), {})()
        self.auth.approle = self
        self.token = ""

    def login(self, **kw: Any) -> None:
        self.logins += 1


def _issuer(tmp_path: Path, client: _Client, approle: bool = True) -> VaultIssuer:
    rid, sec = tmp_path / "rid", tmp_path / "sec"
    rid.write_text("role-id\n")
    sec.write_text("secret-id\n")
    if approle:
        s = VaultSettings(
            addr="http://x",
            role="meshcar-{path}",
            approle_role_id_file=rid,
            approle_secret_id_file=sec,
        )
    else:
        s = VaultSettings(addr="http://x", role="meshcar-{path}", token_file=sec)
    return VaultIssuer(s, "td", 3600, client=client)


def _csr() -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(pki.new_key(), hashes.SHA256())
    )


def test_role_refusal_is_forbidden(tmp_path: Path) -> None:
    client = _Client(
        [
            hvac.exceptions.InvalidRequest(
                errors=["URI Subject Alternative Names ... not valid\nfor this role"]
            )
        ]
    )
    with pytest.raises(Forbidden, match="meshcar-svc-web.*not valid for this role") as exc:
        _issuer(tmp_path, client).sign(_csr(), "spiffe://td/svc/web", 60)
    assert exc.value.status == 403 and "\n" not in exc.value.message


def test_permission_denied_logs_in_again_once_then_is_forbidden(tmp_path: Path) -> None:
    denied = hvac.exceptions.Forbidden(errors=["permission denied"])
    client = _Client([denied, hvac.exceptions.Forbidden(errors=["permission denied"])])
    with pytest.raises(Forbidden, match="denies the CA the use of role 'meshcar-svc-x'"):
        _issuer(tmp_path, client).sign(_csr(), "spiffe://td/svc/x", 60)
    assert client.logins == 1 and client.secrets.pki.calls == 2


def test_a_dev_token_is_not_re_read_on_403(tmp_path: Path) -> None:
    client = _Client([hvac.exceptions.Forbidden(errors=["permission denied"])])
    with pytest.raises(Forbidden):
        _issuer(tmp_path, client, approle=False).sign(_csr(), "spiffe://td/svc/x", 60)
    assert client.secrets.pki.calls == 1


@pytest.mark.parametrize(
    "exc",
    [
        hvac.exceptions.VaultDown(),
        hvac.exceptions.InternalServerError(),
        requests.ConnectionError("refused"),
    ],
)
def test_vault_down_is_unavailable(tmp_path: Path, exc: Exception) -> None:
    with pytest.raises(Unavailable):
        _issuer(tmp_path, _Client([exc])).sign(_csr(), "spiffe://td/svc/web", 60)


def test_repr_has_no_secrets(tmp_path: Path) -> None:
    text = repr(_issuer(tmp_path, _Client([])))
    assert "secret-id" not in text and "role-id" not in text
