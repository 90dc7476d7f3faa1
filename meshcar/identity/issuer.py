"""The one issuer interface the rotation loop (`rotate.py`) talks to, and its three backends.

An `Issuer` gets a first credential (`bootstrap`), replaces a held one (`renew`) and fetches
the trust bundle (`bundle`); every failure is a `CAError` whose `retryable` says whether to
try again. `has_bootstrap_credential` says whether `bootstrap` can work at all (the loop
falls back to it after expiry or a refused renewal only then). The loop only schedules.

- `JoinTokenIssuer`: the meshcar CA API; bootstrap with a one-time join token file, renew
  over mTLS with the current certificate.
- `K8sTokenIssuer`: the meshcar CA API; bootstrap with a projected Kubernetes
  service-account token (read afresh each time: the kubelet rotates it), renew over mTLS.
- `VaultIssuer`: Vault/OpenBao PKI directly; the workload authenticates to Vault itself
  (AppRole or token), so bootstrap and renew are the same signing call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from meshcar.identity.caclient import CAClient, CAError
from meshcar.tls.store import Credential

if TYPE_CHECKING:  # hvac and requests load only when an identity names Vault (issue 12: memory)
    from meshcar.identity.vaultclient import VaultClient

__all__ = ["CAError", "Issuer", "JoinTokenIssuer", "K8sTokenIssuer", "VaultIssuer"]


class Issuer(Protocol):
    @property
    def has_bootstrap_credential(self) -> bool: ...

    async def bootstrap(
        self, spiffe_id: str, *, ttl_seconds: int | None, trust_pem: str | None
    ) -> Credential:
        """A first credential (or one after expiry/refusal). `trust_pem`: the held bundle,
        trusted for the issuer's API too (after a root rotation)."""
        ...

    async def renew(
        self, cred: Credential, *, chain_file: Path, key_file: Path, ttl_seconds: int | None
    ) -> Credential:
        """A new credential for the one held (`chain_file`/`key_file` are its files)."""
        ...

    async def bundle(self, trust_pem: str | None) -> tuple[str, int]:
        """The trust bundle PEM and its version."""
        ...


def read_token(path: Path | None, key: str) -> str:
    """Read a credential file afresh each time (a projected token is rotated by the kubelet)."""
    if path is None:
        raise CAError("no valid certificate in the state dir and no token_file configured", False)
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise CAError(f"cannot read {key} {path}: {exc.strerror}", False) from None
    if not token:
        raise CAError(f"{key} {path} is empty", False)
    return token


@dataclass(frozen=True)
class _CAApi:
    """Renewal and bundle through the meshcar CA API (shared by both token kinds)."""

    client: CAClient

    async def renew(
        self, cred: Credential, *, chain_file: Path, key_file: Path, ttl_seconds: int | None
    ) -> Credential:
        return await self.client.sign(
            cred.spiffe_id,
            chain_file=chain_file,
            key_file=key_file,
            ttl_seconds=ttl_seconds,
            bundle_version=cred.bundle_version,
            trust_pem=cred.bundle_pem,
        )

    async def bundle(self, trust_pem: str | None) -> tuple[str, int]:
        return await self.client.bundle(trust_pem=trust_pem)


@dataclass(frozen=True)
class JoinTokenIssuer(_CAApi):
    token_file: Path | None = None  # None: renewals only (bootstrap refuses, not retryable)

    @property
    def has_bootstrap_credential(self) -> bool:
        return self.token_file is not None

    async def bootstrap(
        self, spiffe_id: str, *, ttl_seconds: int | None, trust_pem: str | None
    ) -> Credential:
        return await self.client.sign(
            spiffe_id,
            token=read_token(self.token_file, "token_file"),
            ttl_seconds=ttl_seconds,
            trust_pem=trust_pem,
        )


@dataclass(frozen=True)
class K8sTokenIssuer(_CAApi):
    token_file: Path = Path()  # the projected service-account token

    has_bootstrap_credential = True

    async def bootstrap(
        self, spiffe_id: str, *, ttl_seconds: int | None, trust_pem: str | None
    ) -> Credential:
        return await self.client.sign(
            spiffe_id,
            k8s_token=read_token(self.token_file, "k8s_token_file"),
            ttl_seconds=ttl_seconds,
            trust_pem=trust_pem,
        )


@dataclass(frozen=True)
class VaultIssuer:
    client: VaultClient

    has_bootstrap_credential = True  # AppRole or token: Vault authenticates the workload

    async def bootstrap(
        self, spiffe_id: str, *, ttl_seconds: int | None, trust_pem: str | None
    ) -> Credential:
        return await self.client.sign(spiffe_id, ttl_seconds=ttl_seconds)

    async def renew(
        self, cred: Credential, *, chain_file: Path, key_file: Path, ttl_seconds: int | None
    ) -> Credential:
        return await self.client.sign(cred.spiffe_id, ttl_seconds=ttl_seconds)

    async def bundle(self, trust_pem: str | None) -> tuple[str, int]:
        return await self.client.bundle()
