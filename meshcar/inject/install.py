"""`meshcar install`: render meshcar's control plane as Kubernetes manifests (stdout).

Theory of operation: `render(settings, webhook_pki)` is pure and returns the documents of
one multi-document YAML stream for `kubectl apply -f -`:

- the Namespace (`--namespace`, default meshcar-system);
- the CA: ServiceAccount, a ClusterRoleBinding to `system:service-account-issuer-discovery`
  (the CA verifies projected service-account tokens itself against the cluster's issuer keys,
  ca/k8s_token.py: no TokenReview, so no `system:auth-delegator`), a PersistentVolumeClaim
  for its state, a one-replica Deployment (Recreate: one writer of the SQLite store) whose
  init container runs `meshcar ca init` into the volume on first start only -- the root and
  intermediate keys are made inside the cluster and never pass through this command -- and
  a Service on 8600. `--issuer vault` runs the same CA API with `--backend vault` (Vault /
  OpenBao signs; deploy/vault/), its AppRole files from Secret meshcar-ca-vault;
- the webhook: ServiceAccount without a token, Deployment (2 replicas) + PodDisruptionBudget,
  Service 443 -> 8443, and the MutatingWebhookConfiguration whose `caBundle` is the CA of the
  webhook's serving certificate. That certificate (for `meshcar-webhook.NS.svc`) is made here
  with `cryptography` and kept in `--webhook-cert-dir` so that a second run renders the same
  caBundle; its key reaches stdout only in Secret meshcar-webhook-tls with `--include-secrets`;
- NetworkPolicies: default-deny ingress for the namespace, the CA's 8600 from pods in
  namespaces labelled `meshcar.io/inject=enabled` only (where injected pods run), the
  webhook's 8443 from anywhere (the API server's source address differs by distribution);
- ConfigMap meshcar-ca-bundle (the CA's root, which the webhook embeds into every sidecar's
  config) when `--ca-root FILE` is given: the root exists only once the CA has started, so a
  first install renders without it and docs/DEPLOY.md shows how to fetch it and re-run.

Names agree with `meshcar inject` (meshcar/inject/patch.py): the CA URL the webhook passes
on is `https://meshcar-ca.NS.svc:8600`, which is InjectOptions' default for NS=meshcar-system.
Exit status: 0, or 2 for a bad flag or an unusable `--webhook-cert-dir`/`--ca-root`.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshcar.inject.patch import ANN_INJECT, SIDECAR_UID, TRUST_CONFIGMAP, TRUST_KEY, InjectOptions
from meshcar_x509 import ca_builder, key_pem, leaf_builder, new_key

CA_NAME = "meshcar-ca"
CA_PORT = 8600
WEBHOOK_NAME = "meshcar-webhook"
WEBHOOK_PORT = 8443
WEBHOOK_TLS_SECRET = "meshcar-webhook-tls"
VAULT_SECRET = "meshcar-ca-vault"
VAULT_CA_CONFIGMAP = "meshcar-vault-ca"
INJECTOR_NAME = "meshcar-injector"
INJECT_LABEL = {ANN_INJECT: "enabled"}  # the namespaces the webhook injects into
CA_DATA = "/var/lib/meshcar/ca/data"
WEBHOOK_CERT_DAYS = 365
RENEW_WARN_DAYS = 30

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")


class InstallError(Exception):
    """A flag or input file that cannot be rendered; the message says which and why."""


@dataclass(frozen=True)
class Settings:
    namespace: str = "meshcar-system"
    trust_domain: str = InjectOptions.trust_domain
    image: str = InjectOptions.image
    issuer: str = "builtin"  # builtin | vault
    vault_addr: str | None = None
    vault_role: str = "meshcar-workloads"
    vault_mount: str = "pki_int"
    vault_ca_pem: str | None = None
    vault_role_id: str | None = None  # with include_secrets: Secret meshcar-ca-vault
    vault_secret_id: str | None = None
    k8s_issuer: str = "https://kubernetes.default.svc.cluster.local"
    token_audience: str = InjectOptions.token_audience
    storage_size: str = "1Gi"
    storage_class: str | None = None
    ca_root_pem: str | None = None
    include_secrets: bool = False
    labels: dict[str, str] = field(default_factory=lambda: {"app.kubernetes.io/part-of": "meshcar"})

    @property
    def ca_host(self) -> str:
        return f"{CA_NAME}.{self.namespace}.svc"

    @property
    def ca_url(self) -> str:
        return f"https://{self.ca_host}:{CA_PORT}"

    @property
    def webhook_dns_names(self) -> list[str]:
        base = f"{WEBHOOK_NAME}.{self.namespace}.svc"
        return [base, base + ".cluster.local"]


@dataclass(frozen=True)
class WebhookPKI:
    """The webhook's serving certificate, its key, and the CA that signed it (PEM)."""

    ca_pem: str
    cert_pem: str
    key_pem: str


# --- the webhook's certificate ---------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshcar"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def generate_webhook_pki(
    dns_names: list[str], now: datetime.datetime | None = None, days: int = WEBHOOK_CERT_DAYS
) -> WebhookPKI:
    """A P-256 CA (only for this webhook: it signs nothing else) and a serving cert."""
    now = now or datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(minutes=5)
    ca_key = new_key()
    ca_name = _name("meshcar webhook CA")
    ca_end = start + datetime.timedelta(days=days + 1)
    ca = ca_builder(ca_name, ca_name, ca_key.public_key(), start, ca_end, 0).sign(
        ca_key, hashes.SHA256()
    )
    key = new_key()
    end = start + datetime.timedelta(days=days)
    cert = (
        leaf_builder(ca_name, key.public_key(), start, end, [ExtendedKeyUsageOID.SERVER_AUTH])
        .subject_name(_name(dns_names[0]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return WebhookPKI(
        ca.public_bytes(pem).decode("ascii"),
        cert.public_bytes(pem).decode("ascii"),
        key_pem(key).decode("ascii"),
    )


def _check_pki(pki: WebhookPKI, dns_names: list[str], where: str) -> list[str]:
    """InstallError when the kept certificate cannot serve; warnings when it soon expires."""
    try:
        ca = x509.load_pem_x509_certificate(pki.ca_pem.encode())
        cert = x509.load_pem_x509_certificate(pki.cert_pem.encode())
        key = serialization.load_pem_private_key(pki.key_pem.encode(), None)
    except ValueError as exc:
        raise InstallError(f"{where}: not a PEM certificate/key: {exc}") from None
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have = names.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        have = []
    if dns_names[0] not in have:
        raise InstallError(
            f"{where}: tls.crt is for {', '.join(have) or 'no DNS name'}, not {dns_names[0]} "
            "(another --namespace?): use another --webhook-cert-dir or delete this one"
        )
    if key.public_key().public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise InstallError(f"{where}: tls.key does not belong to tls.crt")
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise InstallError(f"{where}: tls.crt is not signed by ca.crt ({exc})") from None
    now = datetime.datetime.now(datetime.UTC)
    left = cert.not_valid_after_utc - now
    if left <= datetime.timedelta(0):
        raise InstallError(
            f"{where}: tls.crt expired on {cert.not_valid_after_utc:%Y-%m-%d}: delete the "
            "directory to make a new one (the webhook's caBundle changes with it)"
        )
    if left < datetime.timedelta(days=RENEW_WARN_DAYS):
        return [f"webhook certificate in {where} expires in {left.days} days: delete it and re-run"]
    return []


def webhook_pki_from_dir(directory: Path, dns_names: list[str]) -> tuple[WebhookPKI, list[str]]:
    """Reuse ca.crt/tls.crt/tls.key in `directory`, or make them there (dir 0700, key 0600)."""
    files = {n: directory / n for n in ("ca.crt", "tls.crt", "tls.key")}
    present = [n for n, p in files.items() if p.exists()]
    if present and len(present) < len(files):
        missing = sorted(set(files) - set(present))
        raise InstallError(f"{directory}: has {', '.join(present)} but not {', '.join(missing)}")
    if present:
        try:
            texts = [files[n].read_text(encoding="ascii") for n in ("ca.crt", "tls.crt", "tls.key")]
        except (OSError, UnicodeDecodeError) as exc:
            raise InstallError(f"{directory}: cannot read: {exc}") from None
        pki = WebhookPKI(*texts)
        return pki, _check_pki(pki, dns_names, str(directory))
    pki = generate_webhook_pki(dns_names)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name, text, mode in (
            ("ca.crt", pki.ca_pem, 0o644),
            ("tls.crt", pki.cert_pem, 0o644),
            ("tls.key", pki.key_pem, 0o600),
        ):
            fd = os.open(files[name], os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(text)
    except OSError as exc:
        raise InstallError(f"--webhook-cert-dir {directory}: cannot write: {exc}") from None
    return pki, [f"made the webhook's certificate in {directory} (kept for the next run)"]


# --- the manifests ---------------------------------------------------------------------


def _meta(
    s: Settings, name: str, *, namespaced: bool = True, app: str | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespaced:
        meta["namespace"] = s.namespace
    meta["labels"] = {"app.kubernetes.io/name": app or name, **s.labels}
    return meta


def _restricted() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security(fs_group: bool) -> dict[str, Any]:
    sc: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": SIDECAR_UID,
        "runAsGroup": SIDECAR_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if fs_group:
        sc["fsGroup"] = SIDECAR_UID
    return sc


def _probe(period: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/healthz", "port": "https", "scheme": "HTTPS"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": 3,
    }


def _pod_labels(app: str) -> dict[str, str]:
    # never injected itself: the label is what the webhook's objectSelector excludes
    return {
        "app.kubernetes.io/name": app,
        "app.kubernetes.io/part-of": "meshcar",
        ANN_INJECT: "disabled",
    }


def _service(s: Settings, app: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(s, app),
        "spec": {
            "selector": {"app.kubernetes.io/name": app},
            "ports": [{"name": "https", "port": port, "targetPort": "https", "protocol": "TCP"}],
        },
    }


def _server_container(
    s: Settings,
    name: str,
    command: list[str],
    port: int,
    resources: dict[str, Any],
    mounts: list[dict[str, Any]],
) -> dict[str, Any]:
    """A container serving HTTPS on port (named https), probed on /healthz."""
    return {
        "name": name,
        "image": s.image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "ports": [{"name": "https", "containerPort": port, "protocol": "TCP"}],
        "readinessProbe": _probe(5),
        "livenessProbe": _probe(10),
        "resources": resources,
        "securityContext": _restricted(),
        "volumeMounts": mounts,
    }


def _deployment(
    s: Settings, app: str, replicas: int, pod: dict[str, Any], **spec: Any
) -> dict[str, Any]:
    """app's Deployment: its pods run as the ServiceAccount app, are never injected, and
    have the pod spec pod; spec adds to the Deployment's spec (after replicas)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(s, app),
        "spec": {
            "replicas": replicas,
            **spec,
            "selector": {"matchLabels": {"app.kubernetes.io/name": app}},
            "template": {
                "metadata": {
                    "labels": _pod_labels(app),
                    "annotations": {ANN_INJECT: "disabled"},
                },
                "spec": {"serviceAccountName": app, **pod},
            },
        },
    }


def _config_map(s: Settings, name: str, app: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(s, name, app=app),
        "data": data,
    }


def _secret(s: Settings, name: str, app: str, kind: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(s, name, app=app),
        "type": kind,
        "stringData": data,
    }


def namespace(s: Settings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": s.namespace,
            "labels": {
                **s.labels,
                # Pod Security Admission: every pod here passes the restricted profile
                "pod-security.kubernetes.io/enforce": "restricted",
            },
        },
    }


def ca_documents(s: Settings) -> list[dict[str, Any]]:
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(s, CA_NAME)}
    discovery = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": _meta(
            s, f"{CA_NAME}-{s.namespace}-issuer-discovery", namespaced=False, app=CA_NAME
        ),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "system:service-account-issuer-discovery",
        },
        "subjects": [{"kind": "ServiceAccount", "name": CA_NAME, "namespace": s.namespace}],
    }
    pvc_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": s.storage_size}},
    }
    if s.storage_class:
        pvc_spec["storageClassName"] = s.storage_class
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(s, f"{CA_NAME}-state", app=CA_NAME),
        "spec": pvc_spec,
    }
    service = _service(s, CA_NAME, CA_PORT)
    command = [
        "meshcar",
        "ca",
        "serve",
        f"--dir={CA_DATA}",
        f"--listen=0.0.0.0:{CA_PORT}",
        f"--san={s.ca_host}",
        f"--san={s.ca_host}.cluster.local",
        f"--k8s-issuer={s.k8s_issuer}",
        f"--k8s-audience={s.token_audience}",
        "--k8s-discovery-url=https://kubernetes.default.svc",
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "state", "mountPath": "/var/lib/meshcar/ca"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "state", "persistentVolumeClaim": {"claimName": f"{CA_NAME}-state"}},
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]
    if s.issuer == "vault":
        vault_dir = "/etc/meshcar/vault"
        command += [
            "--backend=vault",
            f"--vault-addr={s.vault_addr}",
            f"--vault-mount={s.vault_mount}",
            f"--vault-role={s.vault_role}",
            f"--vault-approle-role-id-file={vault_dir}/role-id",
            f"--vault-approle-secret-id-file={vault_dir}/secret-id",
        ]
        mounts.append({"name": "vault", "mountPath": vault_dir, "readOnly": True})
        volumes.append({"name": "vault", "secret": {"secretName": VAULT_SECRET}})
        if s.vault_ca_pem:
            command.append("--vault-ca-cert=/etc/meshcar/vault-ca/ca.pem")
            mounts.append(
                {"name": "vault-ca", "mountPath": "/etc/meshcar/vault-ca", "readOnly": True}
            )
            volumes.append({"name": "vault-ca", "configMap": {"name": VAULT_CA_CONFIGMAP}})
    init = (
        f"test -f {CA_DATA}/root.pem || "
        f"meshcar ca init --dir {CA_DATA} --trust-domain {s.trust_domain}"
    )
    resources = {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"cpu": "1", "memory": "256Mi"},
    }
    pod = {
        "securityContext": _pod_security(fs_group=True),
        "initContainers": [
            {
                "name": "ca-init",  # the root and intermediate, on first start only
                "image": s.image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["/bin/sh", "-c", init],
                "securityContext": _restricted(),
                "resources": resources,
                "volumeMounts": mounts[:2],
            }
        ],
        "containers": [_server_container(s, "ca", command, CA_PORT, resources, mounts)],
        "volumes": volumes,
    }
    # one writer of the SQLite store (RWO volume)
    deployment = _deployment(s, CA_NAME, 1, pod, strategy={"type": "Recreate"})
    docs: list[dict[str, Any]] = [sa, discovery, pvc, service, deployment]
    if s.issuer == "vault":
        if s.vault_ca_pem:
            docs.append(_config_map(s, VAULT_CA_CONFIGMAP, CA_NAME, {"ca.pem": s.vault_ca_pem}))
        if s.include_secrets and s.vault_role_id and s.vault_secret_id:
            ids = {"role-id": s.vault_role_id, "secret-id": s.vault_secret_id}
            docs.append(_secret(s, VAULT_SECRET, CA_NAME, "Opaque", ids))
    return docs


def webhook_documents(s: Settings, pki: WebhookPKI) -> list[dict[str, Any]]:
    sa = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(s, WEBHOOK_NAME),
        "automountServiceAccountToken": False,  # it calls no Kubernetes API: no RBAC
    }
    service = _service(s, WEBHOOK_NAME, 443)
    command = [
        "meshcar",
        "webhook",
        f"--listen=0.0.0.0:{WEBHOOK_PORT}",
        "--tls-cert=/etc/meshcar/webhook-tls/tls.crt",
        "--tls-key=/etc/meshcar/webhook-tls/tls.key",
        f"--image={s.image}",
        f"--ca-url={s.ca_url}",
        f"--trust-domain={s.trust_domain}",
        f"--ca-bundle=/etc/meshcar/ca-bundle/{TRUST_KEY}",
        f"--token-audience={s.token_audience}",
    ]
    resources = {
        "requests": {"cpu": "20m", "memory": "48Mi"},
        "limits": {"cpu": "500m", "memory": "128Mi"},
    }
    mounts: list[dict[str, Any]] = [
        {"name": "tls", "mountPath": "/etc/meshcar/webhook-tls", "readOnly": True},
        {"name": "ca-bundle", "mountPath": "/etc/meshcar/ca-bundle", "readOnly": True},
    ]
    pod = {
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(fs_group=False),
        "containers": [_server_container(s, "webhook", command, WEBHOOK_PORT, resources, mounts)],
        "volumes": [
            {"name": "tls", "secret": {"secretName": WEBHOOK_TLS_SECRET}},
            {"name": "ca-bundle", "configMap": {"name": TRUST_CONFIGMAP}},
        ],
    }
    deployment = _deployment(s, WEBHOOK_NAME, 2, pod)
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(s, WEBHOOK_NAME),
        "spec": {
            "minAvailable": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": WEBHOOK_NAME}},
        },
    }
    mwc = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": _meta(
            s,
            INJECTOR_NAME if s.namespace == "meshcar-system" else f"{INJECTOR_NAME}-{s.namespace}",
            namespaced=False,
            app=WEBHOOK_NAME,
        ),
        "webhooks": [
            {
                "name": "inject.meshcar.io",
                "admissionReviewVersions": ["v1"],
                "clientConfig": {
                    "service": {
                        "name": WEBHOOK_NAME,
                        "namespace": s.namespace,
                        "path": "/inject",
                        "port": 443,
                    },
                    "caBundle": base64.b64encode(pki.ca_pem.encode("ascii")).decode("ascii"),
                },
                "rules": [
                    {
                        "operations": ["CREATE"],
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                        "scope": "Namespaced",
                    }
                ],
                "namespaceSelector": {"matchLabels": dict(INJECT_LABEL)},
                "objectSelector": {
                    "matchExpressions": [
                        {"key": ANN_INJECT, "operator": "NotIn", "values": ["disabled"]}
                    ]
                },
                "sideEffects": "None",
                # a webhook outage must not stop pods from being created (docs/DEPLOY.md)
                "failurePolicy": "Ignore",
                "matchPolicy": "Equivalent",
                "reinvocationPolicy": "Never",
                "timeoutSeconds": 5,
            }
        ],
    }
    docs: list[dict[str, Any]] = [sa, service, deployment, pdb, mwc]
    if s.include_secrets:
        tls = {"tls.crt": pki.cert_pem, "tls.key": pki.key_pem}
        docs.append(_secret(s, WEBHOOK_TLS_SECRET, WEBHOOK_NAME, "kubernetes.io/tls", tls))
    return docs


def network_policies(s: Settings) -> list[dict[str, Any]]:
    def policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(s, name, app="meshcar"),
            "spec": spec,
        }

    return [
        # everything in the namespace refuses ingress unless a policy below allows it
        policy("meshcar-default-deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"]}),
        # the CA: only pods of namespaces the webhook injects into, on 8600 only
        policy(
            f"{CA_NAME}-ingress",
            {
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": CA_NAME}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {
                        "from": [{"namespaceSelector": {"matchLabels": dict(INJECT_LABEL)}}],
                        "ports": [{"protocol": "TCP", "port": CA_PORT}],
                    }
                ],
            },
        ),
        # the webhook: the API server, whose source address differs by distribution (host
        # network, a control-plane node, a cloud range): any source, on 8443 only
        policy(
            f"{WEBHOOK_NAME}-ingress",
            {
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": WEBHOOK_NAME}},
                "policyTypes": ["Ingress"],
                "ingress": [{"ports": [{"protocol": "TCP", "port": WEBHOOK_PORT}]}],
            },
        ),
    ]


def trust_bundle(s: Settings) -> list[dict[str, Any]]:
    if not s.ca_root_pem:
        return []
    return [_config_map(s, TRUST_CONFIGMAP, CA_NAME, {TRUST_KEY: s.ca_root_pem})]


def render(s: Settings, pki: WebhookPKI) -> list[dict[str, Any]]:
    return [
        namespace(s),
        *ca_documents(s),
        *trust_bundle(s),
        *webhook_documents(s, pki),
        *network_policies(s),
    ]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PEM) as `|` blocks, so the output reads as it will be stored;
    no `&id001` anchors where two fields share one value."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value and value.isascii() else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(docs: list[dict[str, Any]], out: TextIO) -> None:
    yaml.dump_all(
        docs, out, Dumper=_Dumper, sort_keys=False, default_flow_style=False, explicit_start=True
    )


# --- the command -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshcar install",
        description="Render meshcar's control plane (CA, webhook, RBAC, NetworkPolicies) as "
        "manifests for `kubectl apply -f -` (docs/DEPLOY.md).",
    )
    d = Settings()
    p.add_argument("--namespace", default=d.namespace, help=f"default {d.namespace}")
    p.add_argument("--trust-domain", default=d.trust_domain, help=f"default {d.trust_domain}")
    p.add_argument(
        "--image", default=d.image, help=f"CA, webhook and sidecar image (default {d.image})"
    )
    p.add_argument(
        "--webhook-cert-dir",
        type=Path,
        metavar="DIR",
        help="keeps the webhook's CA, certificate and key (made on the first run, reused after, "
        "so re-applying keeps the caBundle). Without it a new one is made each run, which "
        "needs --include-secrets",
    )
    p.add_argument(
        "--include-secrets",
        action="store_true",
        help="also print Secret meshcar-webhook-tls (the webhook's private key) and, with "
        "--issuer vault and --vault-approle-dir, Secret meshcar-ca-vault",
    )
    p.add_argument(
        "--ca-root",
        type=Path,
        metavar="FILE",
        help="the CA's root.pem (after the first start): renders ConfigMap meshcar-ca-bundle",
    )
    p.add_argument(
        "--k8s-issuer",
        default=d.k8s_issuer,
        metavar="URL",
        help=f"the cluster's service-account issuer (`kubectl get --raw "
        f"/.well-known/openid-configuration`; default {d.k8s_issuer})",
    )
    p.add_argument("--token-audience", default=d.token_audience, help=f"default {d.token_audience}")
    p.add_argument(
        "--storage-size", default=d.storage_size, help=f"CA volume (default {d.storage_size})"
    )
    p.add_argument("--storage-class", help="CA volume's StorageClass (default: the cluster's)")
    v = p.add_argument_group("Vault / OpenBao issuer (--issuer vault; deploy/vault/README.md)")
    v.add_argument(
        "--issuer", choices=("builtin", "vault"), default="builtin", help="default builtin"
    )
    v.add_argument(
        "--vault-addr", metavar="URL", help="Vault address (required with --issuer vault)"
    )
    v.add_argument("--vault-role", default=d.vault_role, help=f"PKI role (default {d.vault_role})")
    v.add_argument(
        "--vault-mount", default=d.vault_mount, help=f"PKI mount (default {d.vault_mount})"
    )
    v.add_argument(
        "--vault-ca-cert", type=Path, metavar="FILE", help="CA of Vault's TLS certificate"
    )
    v.add_argument(
        "--vault-approle-dir",
        type=Path,
        metavar="DIR",
        help="setup.sh's output: meshcar-ca.role-id and meshcar-ca.secret-id (with --include-secrets)",
    )
    return p


def _read_pem(path: Path, flag: str) -> str:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII"
        raise InstallError(f"{flag} {path}: cannot read: {reason}") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise InstallError(f"{flag} {path}: not a PEM certificate")
    if "PRIVATE KEY" in text:
        raise InstallError(f"{flag} {path}: holds a private key; give the certificate only")
    try:
        x509.load_pem_x509_certificates(text.encode())
    except ValueError as exc:
        raise InstallError(f"{flag} {path}: not a PEM certificate: {exc}") from None
    return text


def _check_flags(args: argparse.Namespace) -> None:
    if not _DNS_LABEL.match(args.namespace):
        raise InstallError(f"--namespace {args.namespace!r}: not a DNS label (a-z, 0-9, -)")
    if not _TRUST_DOMAIN.match(args.trust_domain):
        raise InstallError(f"--trust-domain {args.trust_domain!r}: not a SPIFFE trust domain")
    if not _QUANTITY.match(args.storage_size):
        raise InstallError(f"--storage-size {args.storage_size!r}: not a quantity such as 1Gi")
    if not args.image or any(c.isspace() for c in args.image):
        raise InstallError(f"--image {args.image!r}: not an image reference")
    for flag, url in (("--k8s-issuer", args.k8s_issuer), ("--vault-addr", args.vault_addr)):
        if url is not None and not re.match(r"^https?://[^\s/]+", url):
            raise InstallError(f"{flag} {url!r}: not an http(s) URL")


def _vault_credentials(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """Checks the --vault-* flags; the CA's AppRole (role_id, secret_id) when they are read."""
    given = [
        f
        for f, v in (
            ("--vault-addr", args.vault_addr),
            ("--vault-ca-cert", args.vault_ca_cert),
            ("--vault-approle-dir", args.vault_approle_dir),
        )
        if v is not None
    ]
    if args.issuer == "builtin":
        if given:
            raise InstallError(f"{', '.join(given)}: only with --issuer vault")
        return None, None
    if not args.vault_addr:
        raise InstallError("--issuer vault needs --vault-addr URL")
    if not args.vault_approle_dir:
        return None, None
    if not args.include_secrets:
        raise InstallError(
            "--vault-approle-dir is read only to print Secret meshcar-ca-vault: add "
            "--include-secrets, or create the Secret yourself (docs/DEPLOY.md)"
        )
    try:
        role_id = (args.vault_approle_dir / "meshcar-ca.role-id").read_text().strip()
        secret_id = (args.vault_approle_dir / "meshcar-ca.secret-id").read_text().strip()
    except OSError as exc:
        raise InstallError(f"--vault-approle-dir: cannot read: {exc}") from None
    return role_id, secret_id


def settings_from_args(args: argparse.Namespace) -> Settings:
    _check_flags(args)
    role_id, secret_id = _vault_credentials(args)
    return Settings(
        namespace=args.namespace,
        trust_domain=args.trust_domain,
        image=args.image,
        issuer=args.issuer,
        vault_addr=args.vault_addr,
        vault_role=args.vault_role,
        vault_mount=args.vault_mount,
        vault_ca_pem=_read_pem(args.vault_ca_cert, "--vault-ca-cert")
        if args.vault_ca_cert
        else None,
        vault_role_id=role_id,
        vault_secret_id=secret_id,
        k8s_issuer=args.k8s_issuer,
        token_audience=args.token_audience,
        storage_size=args.storage_size,
        storage_class=args.storage_class,
        ca_root_pem=_read_pem(args.ca_root, "--ca-root") if args.ca_root else None,
        include_secrets=args.include_secrets,
    )


def next_steps(s: Settings, cert_dir: Path | None) -> list[str]:
    """What the operator still has to do, printed to stderr after the manifests."""
    ns = s.namespace
    steps = []
    if not s.include_secrets:
        steps.append(
            f"create the webhook's TLS Secret: kubectl -n {ns} create secret tls "
            f"{WEBHOOK_TLS_SECRET} --cert={cert_dir}/tls.crt --key={cert_dir}/tls.key"
        )
    if s.issuer == "vault" and not (s.include_secrets and s.vault_role_id):
        steps.append(
            f"create the CA's Vault AppRole Secret: kubectl -n {ns} create secret generic "
            f"{VAULT_SECRET} --from-file=role-id=OUT/meshcar-ca.role-id "
            "--from-file=secret-id=OUT/meshcar-ca.secret-id"
        )
    if not s.ca_root_pem:
        steps.append(
            f"once the CA runs, publish its root: kubectl -n {ns} exec deploy/{CA_NAME} -c ca "
            f"-- cat {CA_DATA}/root.pem > root.pem, then re-run with --ca-root root.pem"
        )
    steps.append(f"label each namespace to mesh: kubectl label namespace NS {ANN_INJECT}=enabled")
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        s = settings_from_args(args)
        if args.webhook_cert_dir is None:
            if not s.include_secrets:
                raise InstallError(
                    "the webhook's certificate needs a home: --webhook-cert-dir DIR (kept "
                    "there, Secret created by you) or --include-secrets (Secret printed)"
                )
            pki, notes = generate_webhook_pki(s.webhook_dns_names), list[str]()
        else:
            pki, notes = webhook_pki_from_dir(args.webhook_cert_dir, s.webhook_dns_names)
    except InstallError as exc:
        parser.print_usage(sys.stderr)
        print(f"meshcar install: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(f"# meshcar install: the control plane in namespace {s.namespace}\n")
    dump(render(s, pki), sys.stdout)
    for line in notes:
        print(f"meshcar install: {line}", file=sys.stderr)
    for line in next_steps(s, args.webhook_cert_dir):
        print(f"meshcar install: next: {line}", file=sys.stderr)
    return 0
