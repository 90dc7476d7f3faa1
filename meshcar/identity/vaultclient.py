"""Issuing directly from Vault / OpenBao's PKI engine (no meshcar CA in between).

The sidecar generates its key, sends only the CSR to `POST /v1/<mount>/sign/<role>` with
`uri_sans` set to its SPIFFE ID, and gets the leaf plus the chain; the trust bundle is the
self-signed root(s) at the end of the mount's CA chain. Vault authenticates the workload
(AppRole, or a token for development) and its role decides which SPIFFE IDs it may get:
a workload asking for another identity is refused by Vault. hvac is blocking, so every
call runs in a worker thread. The same `sign`/`bundle` interface as `CAClient`, so the
rotation loop is the same whatever the backend.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac  # type: ignore[import-untyped]
import hvac.exceptions  # type: ignore[import-untyped]
import requests
import trio
from cryptography import x509

from meshcar.identity.caclient import CAError
from meshcar.identity.keys import csr_pem, key_pem, new_key
from meshcar.tls.store import Credential


def _pem_blocks(text: str) -> list[str]:
    end = "-----END CERTIFICATE-----"
    return [b.strip() + "\n" + end + "\n" for b in text.split(end) if "BEGIN CERTIFICATE" in b]


def _self_signed(pem: str) -> bool:
    cert = x509.load_pem_x509_certificate(pem.encode())
    return cert.issuer == cert.subject


@dataclass
class VaultClient:
    addr: str
    role: str
    mount: str = "pki_int"
    token_file: Path | None = None
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    approle_mount: str = "approle"
    ca_cert: Path | None = None
    timeout: float = 10.0
    _client: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _login(self) -> Any:
        verify: bool | str = str(self.ca_cert) if self.ca_cert else True
        client = hvac.Client(url=self.addr, timeout=self.timeout, verify=verify)
        if self.token_file is not None:
            client.token = self.token_file.read_text().strip()
        else:
            assert self.role_id_file and self.secret_id_file
            client.auth.approle.login(role_id=self.role_id_file.read_text().strip(),
                                      secret_id=self.secret_id_file.read_text().strip(),
                                      mount_point=self.approle_mount)
        return client

    def _call(self, fn: Any) -> Any:
        with self._lock:
            for attempt in (0, 1):
                try:
                    if self._client is None:
                        self._client = self._login()
                    return fn(self._client)
                except hvac.exceptions.Forbidden as exc:
                    self._client = None  # an expired token: log in again once
                    if attempt:
                        raise CAError(f"Vault refused: {exc}", retryable=False) from None
                except hvac.exceptions.InvalidRequest as exc:
                    raise CAError(f"Vault refused the request: {exc}", retryable=False) from None
                except (hvac.exceptions.VaultError, requests.RequestException, OSError) as exc:
                    self._client = None
                    raise CAError(f"Vault unreachable or failing at {self.addr}: {exc}",
                                  retryable=True) from None
        raise AssertionError("unreachable")

    def _sign_blocking(self, csr: str, spiffe_id: str, ttl_seconds: int | None) -> dict:
        extra: dict[str, Any] = {"uri_sans": spiffe_id, "format": "pem"}
        if ttl_seconds:
            extra["ttl"] = f"{ttl_seconds}s"
        return self._call(lambda c: c.secrets.pki.sign_certificate(
            name=self.role, csr=csr, common_name="", extra_params=extra, mount_point=self.mount)["data"])

    async def sign(self, spiffe_id: str, *, ttl_seconds: int | None = None, **_: object) -> Credential:
        """A new SVID for `spiffe_id` (Vault's own auth; meshcar join tokens do not apply)."""
        key = new_key()
        data = await trio.to_thread.run_sync(self._sign_blocking, csr_pem(key, spiffe_id), spiffe_id, ttl_seconds)
        chain_certs = [b for c in data.get("ca_chain") or [data.get("issuing_ca", "")] if c
                       for b in _pem_blocks(c)]
        roots = [c for c in chain_certs if _self_signed(c)]
        if not roots:
            raise CAError("Vault's CA chain has no root: configure the intermediate with its root "
                          "(deploy/vault/setup.sh does)", retryable=False)
        intermediates = [c for c in chain_certs if not _self_signed(c)]
        chain = "".join(_pem_blocks(data["certificate"]) + intermediates)
        return Credential(spiffe_id, chain, key_pem(key), "".join(roots), 0)

    async def bundle(self, **_: object) -> tuple[str, int]:
        def fetch(c: Any) -> str:
            return c.secrets.pki.read_ca_certificate_chain(mount_point=self.mount)
        text = await trio.to_thread.run_sync(self._call, fetch)
        roots = [b for b in _pem_blocks(text) if _self_signed(b)]
        if not roots:
            raise CAError("Vault's CA chain has no root", retryable=True)
        return "".join(roots), 0
