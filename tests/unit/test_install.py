"""`meshcar install` (meshcar/inject/install.py): the control plane's manifests.

Validation is schema-level (kubernetes_validate, strict, 1.29 and the newest schema it has):
there is no cluster (kind/k3s) on these machines. The webhook's certificate is checked by a
real TLS handshake on loopback against the rendered caBundle.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from meshcar_ca import files
from meshcar_ca.cli import _parser as ca_parser

from meshcar.inject import install
from meshcar.inject.cli import add_option_arguments, inject_stream, options_from_args
from meshcar.inject.patch import (
    CONFIG_ENV,
    SIDECAR_NAME,
    TRUST_CONFIGMAP,
    TRUST_KEY,
    InjectOptions,
    inject_object,
)
from meshcar.inject.webhook import server_ssl_context

VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
MESHCAR = [sys.executable, "-c", "import sys; from meshcar.cli import main; sys.exit(main())"]


def run(
    tmp_path: Path, *args: str, cert_dir: bool = True
) -> tuple[int, list[dict[str, Any]], str, str]:
    """`meshcar install` as a real process: (exit status, documents, stdout, stderr)."""
    extra = ["--webhook-cert-dir", str(tmp_path / "wh")] if cert_dir else []
    proc = subprocess.run(
        [*MESHCAR, "install", *extra, *args], capture_output=True, text=True, timeout=60
    )
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d] if proc.returncode == 0 else []
    return proc.returncode, docs, proc.stdout, proc.stderr


def render(tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    """In process (fast): the documents main() would print."""
    parser = install.build_parser()
    ns = parser.parse_args(["--webhook-cert-dir", str(tmp_path / "wh"), *args])
    s = install.settings_from_args(ns)
    pki, _ = install.webhook_pki_from_dir(ns.webhook_cert_dir, s.webhook_dns_names)
    return install.render(s, pki)


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, [(d["kind"], d["metadata"]["name"]) for d in docs]
    return found[0]


def pod(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]


def flag(command: list[str], name: str) -> list[str]:
    return [a.split("=", 1)[1] for a in command if a.startswith(name + "=")]


@pytest.fixture
def ca_root(tmp_path: Path) -> Path:
    """A real CA made by `meshcar ca init`'s code; its root.pem is what --ca-root takes."""
    paths = files.create_ca(
        tmp_path / "ca", "meshcar.demo", 3600, datetime.datetime.now(datetime.UTC)
    )
    return paths.root_pem


@pytest.fixture
def approle(tmp_path: Path) -> Path:
    out = tmp_path / "vault-out"
    out.mkdir()
    (out / "meshcar-ca.role-id").write_text("role-1234\n")
    (out / "meshcar-ca.secret-id").write_text("secret-5678\n")
    return out


# --- schema --------------------------------------------------------------------------


VARIANTS = {
    "default": [],
    "other-namespace": ["--namespace", "mesh", "--trust-domain", "example.org", "--image", "r/m:1"],
    "storage-class": ["--storage-class", "fast", "--storage-size", "5Gi"],
    "vault": ["--issuer", "vault", "--vault-addr", "https://vault.example:8200"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_document_validates_strictly(tmp_path: Path, variant: str) -> None:
    docs = render(tmp_path, *VARIANTS[variant])
    for doc in docs:
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_everything_with_secrets_and_the_root_validates(
    tmp_path: Path, ca_root: Path, approle: Path
) -> None:
    args = ["--include-secrets", "--ca-root", str(ca_root), "--issuer", "vault"]
    args += ["--vault-addr", "https://vault:8200", "--vault-ca-cert", str(ca_root)]
    args += ["--vault-approle-dir", str(approle)]
    rc, docs, out, err = run(tmp_path, *args)
    assert rc == 0, err
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Secret", "meshcar-webhook-tls") in kinds and ("Secret", "meshcar-ca-vault") in kinds
    assert ("ConfigMap", TRUST_CONFIGMAP) in kinds and ("ConfigMap", "meshcar-vault-ca") in kinds
    # PEM goes through the printed YAML unchanged (as `|` blocks)
    assert one(docs, "ConfigMap", TRUST_CONFIGMAP)["data"][TRUST_KEY] == ca_root.read_text()
    assert f"{TRUST_KEY}: |\n    -----BEGIN CERTIFICATE-----" in out
    for doc in docs:
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_stream_has_the_whole_control_plane(tmp_path: Path) -> None:
    rc, docs, out, err = run(tmp_path)
    assert rc == 0, err
    assert out.startswith("# meshcar install: ")
    assert "&id0" not in out and "*id0" not in out  # no YAML anchors: plain to read
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == sorted(
        [
            ("Namespace", "meshcar-system"),
            ("ServiceAccount", "meshcar-ca"),
            ("ClusterRoleBinding", "meshcar-ca-meshcar-system-issuer-discovery"),
            ("PersistentVolumeClaim", "meshcar-ca-state"),
            ("Service", "meshcar-ca"),
            ("Deployment", "meshcar-ca"),
            ("ServiceAccount", "meshcar-webhook"),
            ("Service", "meshcar-webhook"),
            ("Deployment", "meshcar-webhook"),
            ("PodDisruptionBudget", "meshcar-webhook"),
            ("MutatingWebhookConfiguration", "meshcar-injector"),
            ("NetworkPolicy", "meshcar-default-deny-ingress"),
            ("NetworkPolicy", "meshcar-ca-ingress"),
            ("NetworkPolicy", "meshcar-webhook-ingress"),
        ]
    )
    # the Namespace comes first so that `kubectl apply -f -` can create the rest in it
    assert docs[0]["kind"] == "Namespace"
    assert all(d["metadata"].get("namespace") in (None, "meshcar-system") for d in docs)
    # what is left to do is said on stderr, with the commands
    assert "kubectl -n meshcar-system create secret tls meshcar-webhook-tls" in err
    assert "--ca-root root.pem" in err


# --- the webhook's certificate ---------------------------------------------------------


def _handshake(cert_dir: Path, ca_bundle_pem: str, server_name: str) -> x509.Certificate:
    """A TLS handshake on loopback: the webhook's own server context with the rendered key
    pair, a client that trusts only the caBundle and checks the name (as the API server)."""
    server_ctx = server_ssl_context(str(cert_dir / "tls.crt"), str(cert_dir / "tls.key"))
    client_ctx = ssl.create_default_context(cadata=ca_bundle_pem)
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                der = tls.getpeercert(binary_form=True)
                tls.sendall(b"x")
    finally:
        t.join(10)
        listener.close()
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_ca_bundle_verifies_the_serving_cert_for_the_service_name(tmp_path: Path) -> None:
    docs = render(tmp_path)
    mwc = one(docs, "MutatingWebhookConfiguration", "meshcar-injector")
    hook = mwc["webhooks"][0]
    bundle = base64.b64decode(hook["clientConfig"]["caBundle"]).decode("ascii")
    svc = hook["clientConfig"]["service"]
    service = one(docs, "Service", svc["name"])
    assert service["metadata"]["namespace"] == svc["namespace"]
    assert [p["port"] for p in service["spec"]["ports"]] == [svc["port"]]
    name = f"{svc['name']}.{svc['namespace']}.svc"  # what the API server checks
    cert = _handshake(tmp_path / "wh", bundle, name)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert name in sans.get_values_for_type(x509.DNSName)
    # a client that trusts the bundle still refuses another name
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tmp_path / "wh", bundle, "meshcar-webhook.other.svc")
    # the Deployment serves the Secret the key pair goes into
    vols = {
        v["name"]: v for v in pod(one(docs, "Deployment", "meshcar-webhook"))["spec"]["volumes"]
    }
    assert vols["tls"]["secret"]["secretName"] == "meshcar-webhook-tls"


def test_the_cert_dir_is_reused_so_re_applying_keeps_the_ca_bundle(tmp_path: Path) -> None:
    first = one(render(tmp_path), "MutatingWebhookConfiguration", "meshcar-injector")
    key_mode = (tmp_path / "wh" / "tls.key").stat().st_mode & 0o777
    assert key_mode == 0o600 and (tmp_path / "wh").stat().st_mode & 0o777 == 0o700
    again = one(render(tmp_path), "MutatingWebhookConfiguration", "meshcar-injector")
    assert first["webhooks"][0]["clientConfig"] == again["webhooks"][0]["clientConfig"]
    # a directory made for another namespace is refused, not silently served
    rc, _, _, err = run(tmp_path, "--namespace", "elsewhere")
    assert rc == 2
    assert "not meshcar-webhook.elsewhere.svc" in err


def test_without_a_cert_dir_include_secrets_makes_a_fresh_pair(tmp_path: Path) -> None:
    rc, docs, _, err = run(tmp_path, "--include-secrets", cert_dir=False)
    assert rc == 0, err
    secret = one(docs, "Secret", "meshcar-webhook-tls")
    hook = one(docs, "MutatingWebhookConfiguration", "meshcar-injector")["webhooks"][0]
    (tmp_path / "pair").mkdir()
    (tmp_path / "pair" / "tls.crt").write_text(secret["stringData"]["tls.crt"])
    (tmp_path / "pair" / "tls.key").write_text(secret["stringData"]["tls.key"])
    bundle = base64.b64decode(hook["clientConfig"]["caBundle"]).decode()
    _handshake(tmp_path / "pair", bundle, "meshcar-webhook.meshcar-system.svc")


# --- private keys --------------------------------------------------------------------


def test_no_private_key_in_the_output_unless_asked(tmp_path: Path, approle: Path) -> None:
    for args in ([], ["--issuer", "vault", "--vault-addr", "https://v:8200"]):
        rc, docs, out, err = run(tmp_path, *args)
        assert rc == 0, err
        assert "PRIVATE KEY" not in out and "secret-5678" not in out
        assert not [d for d in docs if d["kind"] == "Secret"]
        if args:  # the Vault AppRole Secret the CA mounts: how to create it is said
            assert "create secret generic meshcar-ca-vault" in err
    rc, docs, out, err = run(tmp_path, "--include-secrets")
    assert rc == 0, err
    secret = one(docs, "Secret", "meshcar-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["stringData"]["tls.key"] == (tmp_path / "wh" / "tls.key").read_text()
    assert "create secret tls" not in err


# --- NetworkPolicies -----------------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_network_policies_select_the_right_pods_and_ports(tmp_path: Path) -> None:
    docs = render(tmp_path)
    ca = pod(one(docs, "Deployment", "meshcar-ca"))
    hook = pod(one(docs, "Deployment", "meshcar-webhook"))
    deny = one(docs, "NetworkPolicy", "meshcar-default-deny-ingress")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}

    ca_np = one(docs, "NetworkPolicy", "meshcar-ca-ingress")["spec"]
    assert _selects(ca_np["podSelector"], ca["metadata"]["labels"])
    assert not _selects(ca_np["podSelector"], hook["metadata"]["labels"])
    (rule,) = ca_np["ingress"]
    ca_ports = ca["spec"]["containers"][0]["ports"]
    assert rule["ports"] == [{"protocol": "TCP", "port": ca_ports[0]["containerPort"]}]
    # from pods of the namespaces the webhook injects into, and nowhere else
    mwc = one(docs, "MutatingWebhookConfiguration", "meshcar-injector")
    assert rule["from"] == [{"namespaceSelector": mwc["webhooks"][0]["namespaceSelector"]}]

    hook_np = one(docs, "NetworkPolicy", "meshcar-webhook-ingress")["spec"]
    assert _selects(hook_np["podSelector"], hook["metadata"]["labels"])
    assert not _selects(hook_np["podSelector"], ca["metadata"]["labels"])
    (rule,) = hook_np["ingress"]
    assert "from" not in rule  # the API server's address differs by distribution
    port = hook["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port}] and port == 8443


# --- hardening -----------------------------------------------------------------------


def test_every_container_is_hardened_with_resources_and_probes(tmp_path: Path) -> None:
    docs = render(tmp_path, "--issuer", "vault", "--vault-addr", "https://v:8200")
    ns = one(docs, "Namespace", "meshcar-system")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name in ("meshcar-ca", "meshcar-webhook"):
        template = pod(one(docs, "Deployment", name))
        assert template["metadata"]["labels"]["meshcar.io/inject"] == "disabled"
        psc = template["spec"]["securityContext"]
        assert psc["runAsNonRoot"] and psc["seccompProfile"] == {"type": "RuntimeDefault"}
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
        for c in spec["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"] == {
                    "path": "/healthz",
                    "port": "https",
                    "scheme": "HTTPS",
                }
    assert one(docs, "ServiceAccount", "meshcar-webhook")["automountServiceAccountToken"] is False


# --- names inject expects --------------------------------------------------------------


def _webhook_options(docs: list[dict[str, Any]]) -> InjectOptions:
    """The InjectOptions the rendered webhook runs with: its command parsed by the parser the
    webhook itself uses for them."""
    command = pod(one(docs, "Deployment", "meshcar-webhook"))["spec"]["containers"][0]["command"]
    assert command[:2] == ["meshcar", "webhook"]
    parser = argparse.ArgumentParser()
    add_option_arguments(parser)
    args, rest = parser.parse_known_args(command[2:])
    assert sorted(a.split("=")[0] for a in rest) == ["--listen", "--tls-cert", "--tls-key"]
    args.ca_bundle = None  # a path in the pod
    return options_from_args(args)


@pytest.mark.parametrize("variant", ["default", "other-namespace"])
def test_names_round_trip_with_inject(tmp_path: Path, variant: str) -> None:
    docs = render(tmp_path, *VARIANTS[variant])
    opts = _webhook_options(docs)
    ns = docs[0]["metadata"]["name"]
    if variant == "default":  # `meshcar inject` without flags talks to this CA
        assert opts.ca_url == InjectOptions().ca_url
        assert opts.trust_domain == InjectOptions().trust_domain
    service = one(docs, "Service", "meshcar-ca")
    assert opts.ca_url == f"https://meshcar-ca.{ns}.svc:{service['spec']['ports'][0]['port']}"
    ca = pod(one(docs, "Deployment", "meshcar-ca"))["spec"]
    serve = ca["containers"][0]["command"]
    # the CA's own parser accepts the command, its certificate names the host in the URL,
    # and it checks the audience and trust domain the sidecars are given
    ca_args = ca_parser().parse_args(serve[2:])
    assert f"meshcar-ca.{ns}.svc" in ca_args.san
    assert ca_args.k8s_audience == opts.token_audience
    init = ca["initContainers"][0]["command"][-1]
    assert f"--trust-domain {opts.trust_domain}" in init
    assert opts.image == ca["containers"][0]["image"]
    # a pod injected with these options points at the rendered CA
    app = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "containers": [{"name": "app", "image": "web:1", "ports": [{"containerPort": 80}]}]
        },
    }
    out = inject_object(app, opts)
    sidecar = [c for c in out["spec"]["initContainers"] if c["name"] == SIDECAR_NAME][0]
    config = yaml.safe_load({e["name"]: e for e in sidecar["env"]}[CONFIG_ENV]["value"])
    assert config["identity"]["ca_url"] == opts.ca_url


def test_ca_root_becomes_the_bundle_the_webhook_mounts(tmp_path: Path, ca_root: Path) -> None:
    docs = render(tmp_path, "--ca-root", str(ca_root))
    cm = one(docs, "ConfigMap", TRUST_CONFIGMAP)
    assert cm["data"][TRUST_KEY] == ca_root.read_text()
    spec = pod(one(docs, "Deployment", "meshcar-webhook"))["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["ca-bundle"]["configMap"]["name"] == TRUST_CONFIGMAP
    command = spec["containers"][0]["command"]
    mount = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "ca-bundle"][0]
    assert flag(command, "--ca-bundle") == [f"{mount['mountPath']}/{TRUST_KEY}"]


def test_vault_variant_runs_the_ca_api_on_vault(tmp_path: Path, approle: Path) -> None:
    docs = render(
        tmp_path,
        *["--issuer", "vault", "--vault-addr", "https://vault.example:8200"],
        *["--vault-role", "meshcar-workloads", "--include-secrets"],
        *["--vault-approle-dir", str(approle)],
    )
    spec = pod(one(docs, "Deployment", "meshcar-ca"))["spec"]
    serve = spec["containers"][0]["command"]
    ca_args = ca_parser().parse_args(serve[2:])
    assert ca_args.backend == "vault" and ca_args.vault_addr == "https://vault.example:8200"
    assert ca_args.k8s_issuer  # pods still authenticate with their service-account tokens
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert str(ca_args.vault_approle_secret_id_file).startswith(mounts["vault"])
    vols = {v["name"]: v for v in spec["volumes"]}
    secret = one(docs, "Secret", vols["vault"]["secret"]["secretName"])
    assert secret["stringData"] == {"role-id": "role-1234", "secret-id": "secret-5678"}


# --- bad flags -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--namespace", "Bad_NS"], "--namespace 'Bad_NS': not a DNS label"),
        (["--trust-domain", "spiffe://x"], "not a SPIFFE trust domain"),
        (["--issuer", "vault"], "--issuer vault needs --vault-addr URL"),
        (["--vault-addr", "https://v:8200"], "--vault-addr: only with --issuer vault"),
        (["--issuer", "nope"], "invalid choice: 'nope'"),
        (["--storage-size", "lots"], "--storage-size 'lots': not a quantity"),
        (["--k8s-issuer", "kubernetes"], "--k8s-issuer 'kubernetes': not an http(s) URL"),
        (["--ca-root", "/nonexistent/root.pem"], "--ca-root /nonexistent/root.pem: cannot read"),
        (
            ["--issuer", "vault", "--vault-addr", "https://v", "--vault-approle-dir", "/x"],
            "add --include-secrets",
        ),
    ],
)
def test_bad_flags_exit_2_with_a_clear_error(tmp_path: Path, args: list[str], message: str) -> None:
    rc, _, out, err = run(tmp_path, *args)
    assert rc == 2 and out == ""
    assert message in err, err
    assert "usage: meshcar install" in err


def test_the_key_needs_a_home(tmp_path: Path) -> None:
    rc, _, out, err = run(tmp_path, cert_dir=False)
    assert rc == 2 and out == ""
    assert "--webhook-cert-dir DIR" in err and "--include-secrets" in err


def test_ca_root_must_be_a_certificate_only(tmp_path: Path) -> None:
    (tmp_path / "wh").mkdir()
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    rc, _, _, err = run(tmp_path, "--ca-root", str(junk))
    assert rc == 2 and "not a PEM certificate" in err
    both = tmp_path / "both.pem"
    render(tmp_path)  # makes wh/
    both.write_text(
        (tmp_path / "wh" / "tls.crt").read_text() + (tmp_path / "wh" / "tls.key").read_text()
    )
    rc, _, _, err = run(tmp_path, "--ca-root", str(both))
    assert rc == 2 and "holds a private key" in err


def test_a_half_written_cert_dir_is_refused(tmp_path: Path) -> None:
    render(tmp_path)
    (tmp_path / "wh" / "tls.key").unlink()
    rc, _, _, err = run(tmp_path)
    assert rc == 2 and "has ca.crt, tls.crt but not tls.key" in err


def _write_pki(directory: Path, pki: install.WebhookPKI) -> None:
    directory.mkdir()
    (directory / "ca.crt").write_text(pki.ca_pem)
    (directory / "tls.crt").write_text(pki.cert_pem)
    (directory / "tls.key").write_text(pki.key_pem)


def test_an_expired_or_mismatched_cert_dir_is_refused(tmp_path: Path) -> None:
    names = ["meshcar-webhook.meshcar-system.svc"]
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    _write_pki(tmp_path / "wh", install.generate_webhook_pki(names, now=old, days=2))
    rc, _, _, err = run(tmp_path)
    assert rc == 2 and "tls.crt expired on" in err and "delete the directory" in err

    a, b = install.generate_webhook_pki(names), install.generate_webhook_pki(names)
    _write_pki(tmp_path / "mixed", install.WebhookPKI(a.ca_pem, a.cert_pem, b.key_pem))
    with pytest.raises(install.InstallError, match="tls.key does not belong to tls.crt"):
        install.webhook_pki_from_dir(tmp_path / "mixed", names)
    _write_pki(tmp_path / "foreign", install.WebhookPKI(b.ca_pem, a.cert_pem, a.key_pem))
    with pytest.raises(install.InstallError, match="tls.crt is not signed by ca.crt"):
        install.webhook_pki_from_dir(tmp_path / "foreign", names)


def test_a_cert_dir_near_expiry_is_used_with_a_warning(tmp_path: Path) -> None:
    names = ["meshcar-webhook.meshcar-system.svc"]
    _write_pki(tmp_path / "wh", install.generate_webhook_pki(names, days=10))
    rc, docs, _, err = run(tmp_path)
    assert rc == 0 and "expires in 9 days" in err
    hook = one(docs, "MutatingWebhookConfiguration", "meshcar-injector")["webhooks"][0]
    ca_pem = (tmp_path / "wh" / "ca.crt").read_text()
    assert base64.b64decode(hook["clientConfig"]["caBundle"]).decode() == ca_pem


def test_inject_leaves_the_control_plane_alone(tmp_path: Path) -> None:
    """`meshcar install | meshcar inject -f -` changes nothing: the CA and the webhook are
    opted out (the same label keeps the webhook from injecting them, objectSelector)."""
    rc, docs, out, err = run(tmp_path)
    assert rc == 0, err
    again, report = inject_stream(out, InjectOptions())
    assert again == docs
    workloads = [line for line in report if line.startswith("deployment/")]
    assert len(workloads) == 2
    assert all("skipped (already injected or meshcar.io/inject: disabled)" in w for w in workloads)
