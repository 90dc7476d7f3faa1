"""The issuing backend an `identity:` section names (sidecar and edge alike): the meshcar CA
API, or Vault/OpenBao PKI directly."""

from __future__ import annotations

from meshcar.common.config import IdentityConfig
from meshcar.identity.caclient import CAClient
from meshcar.identity.vaultclient import VaultClient


def issuer_client(ident: IdentityConfig) -> CAClient | VaultClient:
    """The identity's issuing backend: the meshcar CA API, or Vault/OpenBao directly."""
    if ident.vault is not None:
        v = ident.vault
        return VaultClient(v.addrs, v.role, v.mount, token_file=v.token_file,
                           role_id_file=v.approle_role_id_file, secret_id_file=v.approle_secret_id_file,
                           ca_cert=v.ca_cert, timeout=v.timeout_seconds,
                           connect_timeout=v.connect_timeout_seconds)
    assert ident.ca_url is not None
    return CAClient(ident.ca_url, ident.ca_bundle, ca_bundle_pem=ident.ca_bundle_pem)
