"""`meshcar ca vault-setup`: configure a fresh Vault/OpenBao for meshcar (docs/CA.md).

What it creates, through hvac:
- a root PKI mount (`pki`, internal ECDSA P-256 root, 10 years) and an intermediate mount
  (`pki_int`, intermediate signed by that root, 1 year; set with its root so `ca_chain`
  carries the whole chain);
- a role (default `meshcar-workloads`) that signs CSRs for URI SANs matching
  `--allowed-uri` (default `spiffe://TD/svc/*`) only: no CN required, no DNS/IP SANs, CSR
  SANs ignored, ECDSA P-256, digitalSignature, serverAuth + clientAuth, CA:false;
- for each `--workload PATH`, a role `meshcar-<path with - for />` allowing exactly
  `spiffe://TD/PATH`, a policy that may use only that role and an AppRole of the same name
  (for per-identity roles: `ca serve --vault-role 'meshcar-{path}'`);
- a policy `meshcar-ca` allowing `sign` on those roles and an AppRole `meshcar-ca` for the
  CA API (`ca serve --backend vault --vault-approle-*-file`).

Outputs in `--out DIR` (0700): `vault-root.pem` and for every AppRole `NAME.role-id` and
`NAME.secret-id` (0600). Stdout gets one JSON line naming them; secrets are never printed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import hvac  # type: ignore[import-untyped]

from .errors import ConfigError
from .files import write_file
from .spiffe import check_spiffe_id


@dataclass(frozen=True)
class VaultLayout:
    trust_domain: str
    root_mount: str = "pki"
    int_mount: str = "pki_int"
    role: str = "meshcar-workloads"
    allowed_uris: tuple[str, ...] = ()
    workloads: tuple[str, ...] = ()  # SPIFFE ID paths, e.g. svc/web
    max_ttl: str = "24h"
    approle_mount: str = "approle"
    ca_approle: str = "meshcar-ca"


def workload_role(path: str) -> str:
    return "meshcar-" + path.strip("/").replace("/", "-")


def role_params(allowed_uris: list[str], max_ttl: str) -> dict[str, object]:
    """A PKI role for X509-SVIDs: URI SANs from `allowed_uris` only, nothing else."""
    return {
        "allowed_uri_sans": allowed_uris,
        "allowed_domains": [],
        "allow_any_name": False,
        "allow_bare_domains": False,
        "allow_subdomains": False,
        "allow_localhost": False,
        "allow_ip_sans": False,
        "allow_wildcard_certificates": False,
        "enforce_hostnames": True,
        "require_cn": False,
        "use_csr_common_name": False,
        "use_csr_sans": False,
        "key_type": "ec",
        "key_bits": 256,
        "key_usage": ["DigitalSignature"],
        "ext_key_usage": [],
        "server_flag": True,
        "client_flag": True,
        "code_signing_flag": False,
        "email_protection_flag": False,
        "basic_constraints_valid_for_non_ca": True,
        "organization": ["meshcar"],
        "ttl": "1h",
        "max_ttl": max_ttl,
        "not_before_duration": "10s",
        "generate_lease": False,
    }


def _policy(int_mount: str, roles: list[str]) -> str:
    return "".join(
        f'path "{int_mount}/sign/{r}" {{\n  capabilities = ["create", "update"]\n}}\n'
        for r in roles
    )


def _approle(
    client: hvac.Client, layout: VaultLayout, name: str, policy: str, out: Path
) -> dict[str, str]:
    client.auth.approle.create_or_update_approle(
        role_name=name,
        token_policies=[policy],
        token_ttl="1h",
        token_max_ttl="4h",
        mount_point=layout.approle_mount,
    )
    role_id = client.auth.approle.read_role_id(role_name=name, mount_point=layout.approle_mount)[
        "data"
    ]["role_id"]
    secret_id = client.auth.approle.generate_secret_id(
        role_name=name, mount_point=layout.approle_mount
    )["data"]["secret_id"]
    files = {
        "role_id_file": str(out / f"{name}.role-id"),
        "secret_id_file": str(out / f"{name}.secret-id"),
    }
    write_file(Path(files["role_id_file"]), role_id + "\n", 0o600)
    write_file(Path(files["secret_id_file"]), secret_id + "\n", 0o600)
    return files


def setup(client: hvac.Client, layout: VaultLayout, out: Path) -> dict[str, object]:
    """Configure Vault as described in the module docstring; return a summary (no secrets)."""
    td = layout.trust_domain
    allowed = list(layout.allowed_uris) or [f"spiffe://{td}/svc/*"]
    for uri in allowed:
        check_spiffe_id(uri.replace("*", "x"), td)
    for path in layout.workloads:
        check_spiffe_id(f"spiffe://{td}/{path.strip('/')}", td)
    mounts = client.sys.list_mounted_secrets_engines()
    mounted = set(mounts.get("data", mounts))
    for m in (layout.root_mount, layout.int_mount):
        if f"{m}/" in mounted:
            raise ConfigError(
                f"Vault already has a secrets engine at {m}/: vault-setup configures a fresh Vault"
            )
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(out, 0o700)

    pki = client.secrets.pki
    client.sys.enable_secrets_engine(
        "pki", path=layout.root_mount, config={"max_lease_ttl": "87600h"}
    )
    root = pki.generate_root(
        "internal",
        f"meshcar vault root CA {td}",
        mount_point=layout.root_mount,
        extra_params={
            "key_type": "ec",
            "key_bits": 256,
            "ttl": "87600h",
            "organization": "meshcar",
        },
    )["data"]["certificate"]
    client.sys.enable_secrets_engine(
        "pki", path=layout.int_mount, config={"max_lease_ttl": "8760h"}
    )
    csr = pki.generate_intermediate(
        "internal",
        f"meshcar vault intermediate CA {td}",
        mount_point=layout.int_mount,
        extra_params={"key_type": "ec", "key_bits": 256, "organization": "meshcar"},
    )["data"]["csr"]
    inter = pki.sign_intermediate(
        csr,
        f"meshcar vault intermediate CA {td}",
        mount_point=layout.root_mount,
        extra_params={"ttl": "8760h", "format": "pem", "max_path_length": 0},
    )["data"]["certificate"]
    pki.set_signed_intermediate(
        inter.strip() + "\n" + root.strip() + "\n", mount_point=layout.int_mount
    )

    roles = [layout.role]
    pki.create_or_update_role(
        layout.role, extra_params=role_params(allowed, layout.max_ttl), mount_point=layout.int_mount
    )
    auths = client.sys.list_auth_methods()
    if f"{layout.approle_mount}/" not in set(auths.get("data", auths)):
        client.sys.enable_auth_method("approle", path=layout.approle_mount)
    approles: dict[str, dict[str, str]] = {}
    for path in layout.workloads:
        name = workload_role(path)
        pki.create_or_update_role(
            name,
            extra_params=role_params([f"spiffe://{td}/{path.strip('/')}"], layout.max_ttl),
            mount_point=layout.int_mount,
        )
        client.sys.create_or_update_policy(name, _policy(layout.int_mount, [name]))
        approles[name] = _approle(client, layout, name, name, out)
        roles.append(name)
    client.sys.create_or_update_policy(layout.ca_approle, _policy(layout.int_mount, roles))
    approles[layout.ca_approle] = _approle(
        client, layout, layout.ca_approle, layout.ca_approle, out
    )
    root_file = out / "vault-root.pem"
    write_file(root_file, root.strip() + "\n", 0o644)
    return {
        "event": "ca.vault_setup",
        "root_mount": layout.root_mount,
        "int_mount": layout.int_mount,
        "roles": roles,
        "allowed_uri_sans": allowed,
        "policies": roles[1:] + [layout.ca_approle],
        "approles": approles,
        "root": str(root_file),
    }


def summary_json(summary: dict[str, object]) -> str:
    return json.dumps(summary)
