"""The issuing backend an `identity:` section names (sidecar and edge alike): the meshcar CA
API (with a join token or a Kubernetes service-account token), or Vault/OpenBao PKI directly,
as the `Issuer` the rotation loop takes (identity/issuer.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshcar.admin.metrics import Metrics
from meshcar.common.config import IdentityConfig
from meshcar.identity.caclient import CAClient
from meshcar.identity.follow import Follower
from meshcar.identity.issuer import Issuer, JoinTokenIssuer, K8sTokenIssuer, VaultIssuer
from meshcar.identity.rotate import Rotator
from meshcar.net.workers import Worker
from meshcar.tls.store import CredentialStore

if TYPE_CHECKING:  # hvac and requests load only when an identity names Vault (issue 12: memory)
    from meshcar.identity.vaultclient import VaultClient


def issuer_client(ident: IdentityConfig) -> CAClient | VaultClient:
    """The identity's issuing backend: the meshcar CA API, or Vault/OpenBao directly."""
    if ident.vault is not None:
        from meshcar.identity.vaultclient import VaultClient

        v = ident.vault
        return VaultClient(
            v.addrs,
            v.role,
            v.mount,
            token_file=v.token_file,
            role_id_file=v.approle_role_id_file,
            secret_id_file=v.approle_secret_id_file,
            ca_cert=v.ca_cert,
            timeout=v.timeout_seconds,
            connect_timeout=v.connect_timeout_seconds,
        )
    assert ident.ca_url is not None
    return CAClient(ident.ca_url, ident.ca_bundle, ca_bundle_pem=ident.ca_bundle_pem)


def issuer_for(ident: IdentityConfig) -> Issuer:
    """The identity's `Issuer`: Vault (its own auth), else the CA API with the k8s
    service-account token or the join token (the config allows only one of them)."""
    client = issuer_client(ident)
    if not isinstance(client, CAClient):
        return VaultIssuer(client)
    if ident.k8s_token_file is not None:
        return K8sTokenIssuer(client, ident.k8s_token_file)
    return JoinTokenIssuer(client, ident.token_file)


def credential_source(
    ident: IdentityConfig, worker: Worker | None, metrics: Metrics
) -> tuple[CredentialStore, Rotator | Follower]:
    """The role's credential store and what keeps it current: in one process, or worker 0
    of `workers: N`, the rotation loop talking to the issuer; any other worker follows
    worker 0's credential from the state directory (identity/follow.py)."""
    if worker is None or worker.leader:
        store = CredentialStore(ident.state_dir)
        rotator = Rotator(
            store,
            issuer_for(ident),
            ident.spiffe_id,
            metrics=metrics,
            ttl_seconds=ident.ttl_seconds,
            fraction=ident.renew_fraction,
        )
        return store, rotator
    store = CredentialStore(ident.state_dir / f"worker-{worker.index}")
    return store, Follower(store, ident.state_dir, ident.spiffe_id, metrics=metrics)
