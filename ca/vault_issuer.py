"""An Issuer backed by the PKI secrets engine of Vault or OpenBao, through hvac.

Theory of operation: the CA API still decides *who* asks (join token, Kubernetes token or
renewal certificate, `auth.py`); this backend only turns the authenticated SPIFFE ID and the
workload's CSR into a certificate by calling `POST /v1/<mount>/sign/<role>` with the CSR
(the key never leaves the workload) and `uri_sans` set to that ID. The Vault role is a
second, independent gate: its `allowed_uri_sans` must permit the ID, or Vault refuses and
the API answers 403 `forbidden`. `--vault-role` may be a template: `{path}` is replaced by
the ID's path with `/` turned into `-` (`meshcar-{path}` -> `meshcar-svc-web`), giving one
role, and so one allowed ID, per workload.

Authentication to Vault: AppRole (role_id + secret_id files; the token is renewed by logging
in again when Vault answers 403) or, for development, a token file. Secrets are read from
files, kept out of every repr and never logged.

hvac is blocking. `sign` runs in a worker thread (the API calls `SignService.sign` through
`trio.to_thread.run_sync`); `refresh` (the trust bundle: the roots at the end of the
mount's `ca_chain`) is called once at start and then from a worker thread on a timer;
`bundle()` and `issuing_certificates()` only read the cached result. One lock serialises
the use of the hvac client.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac  # type: ignore[import-untyped]
import hvac.exceptions  # type: ignore[import-untyped]
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import pki
from .errors import ConfigError, Forbidden, Unavailable, UnsupportedKey
from .issuer import Bundle, IssuedCert, key_id


@dataclass(frozen=True)
class VaultSettings:
    """Where Vault is and how to log in (paths to secrets, never the secrets themselves)."""

    addr: str
    role: str  # a role name, or a template with {path}
    mount: str = "pki_int"
    token_file: Path | None = None
    approle_role_id_file: Path | None = None
    approle_secret_id_file: Path | None = None
    approle_mount: str = "approle"
    ca_cert: Path | None = None  # to verify Vault's own TLS certificate
    timeout: float = 10.0

    def check(self) -> None:
        approle = (self.approle_role_id_file, self.approle_secret_id_file)
        if self.token_file is None and None in approle:
            raise ConfigError(
                "the vault backend needs --vault-token-file, or both"
                " --vault-approle-role-id-file and --vault-approle-secret-id-file"
            )
        if self.token_file is not None and any(approle):
            raise ConfigError("give either --vault-token-file or the AppRole files, not both")
        if not self.role:
            raise ConfigError("--vault-role is required with --backend vault")


def role_for(template: str, spiffe_id: str) -> str:
    """The Vault role for `spiffe_id`: `template` with {path} = the ID's path, '/' -> '-'."""
    path = spiffe_id.split("://", 1)[-1].partition("/")[2]
    return template.replace("{path}", path.replace("/", "-"))


def _read_secret(path: Path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not value:
        raise ConfigError(f"{what} {path} is empty")
    return value


def _vault_message(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors:
        return " ".join("; ".join(str(e) for e in errors).split())[:300]
    return type(exc).__name__


class VaultIssuer:
    """Issues X509-SVIDs through Vault/OpenBao PKI `sign/<role>` (see the module docstring)."""

    def __init__(
        self,
        settings: VaultSettings,
        trust_domain: str,
        max_ttl_seconds: int,
        bundle_version: int = 1,
        client: hvac.Client | None = None,
    ) -> None:
        settings.check()
        self.settings = settings
        self._trust_domain = trust_domain
        self.max_ttl_seconds = max_ttl_seconds
        self._client = client or hvac.Client(
            url=settings.addr,
            timeout=settings.timeout,
            verify=str(settings.ca_cert) if settings.ca_cert else True,
        )
        self._lock = threading.Lock()
        self._bundle = Bundle(pem="", version=bundle_version)
        self._issuing: tuple[x509.Certificate, ...] = ()

    def __repr__(self) -> str:
        return f"VaultIssuer(addr={self.settings.addr!r}, mount={self.settings.mount!r}, role={self.settings.role!r})"

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    # -- Vault session -----------------------------------------------------------------------

    def login(self) -> None:
        """Authenticate to Vault (AppRole login, or the dev token). Raises ConfigError/Unavailable."""
        s = self.settings
        with self._lock:
            self._login_locked(s)

    def _login_locked(self, s: VaultSettings) -> None:
        try:
            if s.token_file is not None:
                self._client.token = _read_secret(s.token_file, "--vault-token-file")
                return
            assert s.approle_role_id_file is not None and s.approle_secret_id_file is not None
            self._client.auth.approle.login(
                role_id=_read_secret(s.approle_role_id_file, "--vault-approle-role-id-file"),
                secret_id=_read_secret(s.approle_secret_id_file, "--vault-approle-secret-id-file"),
                mount_point=s.approle_mount,
            )
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as exc:
            raise ConfigError(
                f"Vault AppRole login at {s.addr} failed: {_vault_message(exc)}"
            ) from None
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise Unavailable(f"Vault at {s.addr} is unreachable ({type(exc).__name__})") from None

    def refresh(self) -> Bundle:
        """Fetch the mount's CA chain: intermediates issue, self-signed roots form the bundle."""
        s = self.settings
        try:
            with self._lock:
                text = self._client.secrets.pki.read_ca_certificate_chain(mount_point=s.mount)
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise Unavailable(
                f"cannot read {s.mount}/ca_chain from Vault ({type(exc).__name__})"
            ) from None
        try:
            certs = x509.load_pem_x509_certificates(str(text).encode()) if text else []
        except ValueError:
            certs = []
        roots = [c for c in certs if c.issuer == c.subject]
        issuing = [c for c in certs if c.issuer != c.subject]
        if not roots or not issuing:
            raise ConfigError(
                f"Vault mount {s.mount!r} has no usable CA chain (need the intermediate and its root:"
                " set the signed intermediate together with its root, as `meshcar ca vault-setup` does)"
            )
        pem = pki.cert_pem(*roots)
        with self._lock:
            version = self._bundle.version + (
                1 if self._bundle.pem and self._bundle.pem != pem else 0
            )
            self._bundle = Bundle(pem=pem, version=version)
            self._issuing = tuple(issuing)
            return self._bundle

    # -- Issuer ------------------------------------------------------------------------------

    def bundle(self) -> Bundle:
        return self._bundle

    def issuing_certificates(self) -> tuple[x509.Certificate, ...]:
        return self._issuing

    def sign(
        self, csr: x509.CertificateSigningRequest, spiffe_id: str, ttl_seconds: int | None
    ) -> IssuedCert:
        ttl = pki.DEFAULT_TTL_SECONDS if ttl_seconds is None else ttl_seconds
        ttl = max(1, min(ttl, self.max_ttl_seconds))
        role = role_for(self.settings.role, spiffe_id)
        csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode("ascii")
        params = {
            "uri_sans": spiffe_id,
            "ttl": f"{ttl}s",
            "format": "pem",
            "exclude_cn_from_sans": True,
        }
        data = self._sign(role, csr_pem, params, spiffe_id)
        try:
            leaf = x509.load_pem_x509_certificate(str(data["certificate"]).encode())
            chain_certs = [
                x509.load_pem_x509_certificate(str(p).encode()) for p in data.get("ca_chain") or []
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise Unavailable(f"Vault answered sign/{role} without a usable certificate") from exc
        # Vault is trusted, but check what it gave us before a workload depends on it
        if pki.uri_sans(leaf) != [spiffe_id]:
            raise Unavailable(
                f"Vault issued a certificate for {pki.uri_sans(leaf)}, not [{spiffe_id!r}]"
            )
        if leaf.public_key() != csr.public_key():
            raise UnsupportedKey("Vault issued a certificate for another key than the CSR's")
        intermediates = [c for c in chain_certs if c.issuer != c.subject]
        signer = next((c for c in intermediates if c.subject == leaf.issuer), None)
        return IssuedCert(
            spiffe_id=spiffe_id,
            serial=leaf.serial_number,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            certificate_pem=pki.cert_pem(leaf),
            chain_pem=pki.cert_pem(leaf, *intermediates),
            issuer_id=key_id(signer) if signer is not None else None,
        )

    def _sign(
        self, role: str, csr_pem: str, params: dict[str, Any], spiffe_id: str
    ) -> dict[str, Any]:
        s = self.settings
        for attempt in (0, 1):
            try:
                with self._lock:
                    resp = self._client.secrets.pki.sign_certificate(
                        name=role,
                        csr=csr_pem,
                        common_name="",
                        extra_params=dict(params),
                        mount_point=s.mount,
                    )
                data = resp["data"] if isinstance(resp, dict) else resp.json()["data"]
                return dict(data)
            except hvac.exceptions.Forbidden as exc:
                if attempt == 0 and s.token_file is None:
                    with self._lock:  # the AppRole token may have expired: log in again once
                        self._login_locked(s)
                    continue
                raise Forbidden(
                    f"Vault denies the CA the use of role {role!r} for {spiffe_id} ({_vault_message(exc)})"
                ) from None
            except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath) as exc:
                raise Forbidden(
                    f"Vault role {role!r} does not allow {spiffe_id}: {_vault_message(exc)}"
                ) from None
            except (hvac.exceptions.VaultError, requests.RequestException) as exc:
                raise Unavailable(f"Vault sign/{role} failed ({type(exc).__name__})") from None
        raise Unavailable("Vault sign failed")  # pragma: no cover - the loop returns or raises
