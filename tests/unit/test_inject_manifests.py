"""deploy/k8s/: every manifest (and its injected form) validates offline against the
Kubernetes 1.29 schemas, and the demo workloads are the scenario of meshcar/demo/scenario.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from meshcar.demo import plan
from meshcar.demo import scenario as sc
from meshcar.inject import cli
from meshcar.inject.patch import (
    CONFIG_ENV,
    SIDECAR_NAME,
    InjectOptions,
    inject_document,
    parse_allowed_callers,
    parse_tcp_upstreams,
    parse_upstreams,
)
from meshcar.inject.webhook import INJECT_PATH
from meshcar.sidecar.config import SidecarConfig, parse_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
FILES = sorted(K8S.glob("*.yaml"))
K8S_VERSION = "1.29.0"
NS = "meshcar-demo"
OPTS = InjectOptions()


def docs_of(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


ALL = [d for f in FILES for d in docs_of(f)]


def find(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in ALL if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def test_there_are_manifests() -> None:
    kinds = {d["kind"] for d in ALL}
    assert {
        "Namespace",
        "ServiceAccount",
        "ClusterRoleBinding",
        "PersistentVolumeClaim",
        "Service",
        "Deployment",
        "MutatingWebhookConfiguration",
        "ConfigMap",
    } <= kinds


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_manifests_validate(path: Path) -> None:
    for doc in docs_of(path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("mode", ["native", "classic"])
def test_injected_manifests_validate_and_round_trip(path: Path, mode: str) -> None:
    opts = InjectOptions(sidecar_mode=mode)
    docs, _ = cli.inject_stream(path.read_text(), opts, str(path))
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    again, _ = cli.inject_stream(yaml.safe_dump_all(docs), opts)
    assert again == docs


def test_system_components_are_not_injected() -> None:
    for name, kind in (
        ("meshcar-ca", "Deployment"),
        ("meshcar-webhook", "Deployment"),
        ("edge", "Deployment"),
    ):
        obj = find(kind, name)
        assert inject_document(obj, OPTS) is obj
        # the webhook's objectSelector sees the label, the injector the annotation
        tmpl = obj["spec"]["template"]["metadata"]
        assert (
            tmpl["labels"]["meshcar.io/inject"]
            == tmpl["annotations"]["meshcar.io/inject"]
            == "disabled"
        )


@pytest.mark.parametrize("service", sc.SCENARIO.services, ids=lambda s: s.name)
def test_demo_workloads_are_the_scenario(service: sc.Service) -> None:
    dep = find("Deployment", service.name)
    assert dep["metadata"]["namespace"] == NS
    tmpl = dep["spec"]["template"]
    ann = tmpl["metadata"]["annotations"]
    assert int(ann["meshcar.io/app-port"]) == service.app_port
    assert int(ann["meshcar.io/inbound-port"]) == service.inbound_port
    assert int(ann["meshcar.io/outbound-port"]) == service.outbound_port
    assert int(ann["meshcar.io/admin-port"]) == service.admin_port
    assert tmpl["spec"]["serviceAccountName"] == service.name
    k8s_id = f"spiffe://{sc.TRUST_DOMAIN}/ns/{NS}/sa/{{}}".format
    assert parse_allowed_callers(ann["meshcar.io/allowed-callers"], sc.TRUST_DOMAIN) == [
        k8s_id(c) for c in service.allowed_callers
    ]
    ups = parse_upstreams(ann.get("meshcar.io/upstreams", ""), sc.TRUST_DOMAIN)
    tcp = parse_tcp_upstreams(ann.get("meshcar.io/tcp-upstreams", ""), ups)
    assert [n for n in ups if n not in tcp] == list(service.upstreams)
    dbs = {sc.db_upstream(peer): (peer, port) for peer, port in service.db_upstreams}
    assert list(tcp) == list(dbs)
    for name, up in ups.items():
        peer = sc.SCENARIO.service(dbs[name][0] if name in dbs else name)
        assert up == {
            "endpoints": [f"{peer.name}.{NS}.svc:{peer.inbound_port}"],
            "spiffe_id": k8s_id(peer.name),
        }
        if name in dbs:
            assert tcp[name] == (dbs[name][1], peer.ledger_port)
    assert ann.get("meshcar.io/app-protocol", "http1") == service.app_protocol
    ledger = [] if service.ledger_port is None else [str(service.ledger_port)]
    assert ann.get("meshcar.io/inbound-tcp-ports", "").split() == ledger
    app = tmpl["spec"]["containers"][0]
    # the same app arguments as `meshcar demo` and docker-compose.yml (plan.app_args)
    host = app["command"][7]
    assert app["command"] == ["meshcar", "demo-app", *plan.app_args(service, host)]
    svc = find("Service", service.name)
    ports = {p["port"]: p["targetPort"] for p in svc["spec"]["ports"]}
    assert ports[service.inbound_port] == service.inbound_port
    if service.public_tls_port:
        assert ports[service.public_tls_port] == service.public_tls_port
    assert find("ServiceAccount", service.name)["metadata"]["namespace"] == NS
    # injected: the sidecar listens where the Service and the peers' upstreams point
    injected = inject_document(dep, OPTS)
    side = injected["spec"]["template"]["spec"]["initContainers"][0]
    assert side["name"] == SIDECAR_NAME
    assert {p["containerPort"] for p in side["ports"]} == {service.inbound_port, service.admin_port}


def demo_sidecar_config(name: str, mode: str) -> SidecarConfig:
    """The sidecar config `meshcar inject` renders for a demo Deployment, through the
    sidecar's own loader (the kubelet's $(VAR) expansion done by hand)."""
    injected = inject_document(find("Deployment", name), InjectOptions(sidecar_mode=mode))
    spec = injected["spec"]["template"]["spec"]
    (side,) = [
        c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == SIDECAR_NAME
    ]
    text = next(e["value"] for e in side["env"] if e["name"] == CONFIG_ENV)
    text = text.replace("$(MESHCAR_POD_NAMESPACE)", NS).replace(
        "$(MESHCAR_POD_SERVICE_ACCOUNT)", name
    )
    data = yaml.safe_load(text)
    data["identity"]["token_file"] = data["identity"].pop("k8s_token_file")
    return parse_config(data, f"{name}:$MESHCAR_CONFIG")


@pytest.mark.parametrize("mode", ["native", "classic"])
@pytest.mark.parametrize("service", sc.SCENARIO.services, ids=lambda s: s.name)
def test_injected_demo_sidecars_carry_grpc_and_tcp(service: sc.Service, mode: str) -> None:
    """Issue 16 / 13: the Kubernetes demo has the gRPC and ledger paths of the compose one."""
    cfg = demo_sidecar_config(service.name, mode)
    compose = yaml.safe_load((ROOT / "deploy" / "compose" / f"{service.name}.yaml").read_text())
    assert cfg.app_protocol == service.app_protocol == compose["app"].get("protocol", "http1")
    assert cfg.app.port == service.app_port
    assert [(t.port, t.host, t.proxy_protocol) for t in cfg.tcp_ports] == [
        (t["port"], "127.0.0.1", t.get("proxy_protocol", "none"))
        for t in compose["inbound"].get("tcp", [])
    ]
    assert list(cfg.allow) == [
        f"spiffe://{sc.TRUST_DOMAIN}/ns/{NS}/sa/{c}" for c in service.allowed_callers
    ]
    ups = {u.name: u for u in cfg.upstreams}
    want = compose["outbound"]["upstreams"]
    assert sorted(ups) == sorted(want)
    for name, u in want.items():
        got = ups[name]
        peer = u["endpoints"][0].split(":")[0]
        assert got.protocol == u.get("protocol", "http")
        assert (got.local_port, got.target_port) == (u.get("local_port"), u.get("target_port"))
        assert [str(e) for e in got.endpoints] == [
            f"{peer}.{NS}.svc:{u['endpoints'][0].split(':')[1]}"
        ]
        assert got.spiffe_id == f"spiffe://{sc.TRUST_DOMAIN}/ns/{NS}/sa/{peer}"


def test_demo_namespace_is_opted_in_and_matches_the_webhook() -> None:
    ns = find("Namespace", NS)
    mwc = find("MutatingWebhookConfiguration", "meshcar-injector")
    (hook,) = mwc["webhooks"]
    assert hook["namespaceSelector"]["matchLabels"].items() <= ns["metadata"]["labels"].items()
    assert hook["objectSelector"]["matchExpressions"] == [
        {"key": "meshcar.io/inject", "operator": "NotIn", "values": ["disabled"]}
    ]
    assert hook["sideEffects"] == "None" and hook["admissionReviewVersions"] == ["v1"]
    assert hook["failurePolicy"] in ("Ignore", "Fail")
    assert hook["rules"][0]["resources"] == ["pods"] and hook["rules"][0]["operations"] == [
        "CREATE"
    ]
    ref = hook["clientConfig"]["service"]
    assert ref["path"] == INJECT_PATH
    svc = find("Service", ref["name"])
    assert svc["metadata"]["namespace"] == ref["namespace"]
    assert ref["port"] in [p["port"] for p in svc["spec"]["ports"]]
    assert "meshcar.io/inject" not in find("Namespace", "meshcar-system")["metadata"]["labels"]


def test_webhook_and_ca_agree() -> None:
    ca_svc = find("Service", "meshcar-ca")
    assert [p["port"] for p in ca_svc["spec"]["ports"]] == [sc.CA_PORT]
    ca_url = f"https://meshcar-ca.meshcar-system.svc:{sc.CA_PORT}"
    webhook = find("Deployment", "meshcar-webhook")["spec"]["template"]["spec"]["containers"][0]
    assert f"--ca-url={ca_url}" in webhook["command"]
    assert f"--trust-domain={sc.TRUST_DOMAIN}" in webhook["command"]
    assert f"--token-audience={OPTS.token_audience}" in webhook["command"]
    ca = find("Deployment", "meshcar-ca")["spec"]["template"]["spec"]["containers"][0]
    assert "--san=meshcar-ca.meshcar-system.svc" in ca["command"]
    assert f"--k8s-audience={OPTS.token_audience}" in ca["command"]
    assert OPTS.ca_url == ca_url


def test_edge_config_is_the_scenario() -> None:
    from tests.support.edge_scenario import assert_edge_is_the_scenario

    raw = yaml.safe_load(find("ConfigMap", "edge-config")["data"]["edge.yaml"])
    assert_edge_is_the_scenario(
        raw,
        host=lambda name: f"{name}.{NS}.svc",
        spiffe=lambda name: f"spiffe://{sc.TRUST_DOMAIN}/ns/{NS}/sa/{name}",
    )
    for r in sc.SCENARIO.edge_routes:
        port = {
            "terminate": sc.SCENARIO.service(r.backend).app_port,
            "bridge": sc.SCENARIO.service(r.backend).inbound_port,
            "passthrough": sc.SCENARIO.service(r.backend).public_tls_port,
        }[r.mode]
        assert port in [p["port"] for p in find("Service", r.backend)["spec"]["ports"]]
    edge_svc = find("Service", "edge")
    assert {p["targetPort"] for p in edge_svc["spec"]["ports"]} == {
        sc.EDGE_HTTPS_PORT,
        sc.EDGE_HTTP_PORT,
    }
