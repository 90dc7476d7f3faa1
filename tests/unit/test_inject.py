"""Sidecar injection (meshcar/inject/patch.py and the `meshcar inject` CLI)."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import kubernetes_validate
import pytest
import yaml

from meshcar.inject import cli
from meshcar.inject.patch import (
    CONFIG_ENV,
    POD_TEMPLATE_PATHS,
    SIDECAR_NAME,
    InjectError,
    InjectOptions,
    inject_document,
    inject_object,
)

K8S_VERSION = "1.29.0"  # the first release with native sidecars on by default
OPTS = InjectOptions()
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

ANNOTATIONS = {
    "meshcar.io/app-port": "9002",
    "meshcar.io/upstreams": "payments=payments.default.svc:7003=default/payments",
    "meshcar.io/allowed-callers": "default/web, spiffe://meshcar.demo/ns/edge/sa/edge",
}


def pod_template(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "containers": [
            {
                "name": "app",
                "image": "example/app:1",
                "ports": [{"containerPort": 9002}],
                "env": [
                    {"name": "KEEP", "value": "1"},
                    {"name": "HTTP_PROXY", "value": "http://old:1"},
                ],
            }
        ],
    }
    s.update(spec)
    return {
        "metadata": {
            "labels": {"app": "api"},
            "annotations": dict(ANNOTATIONS if annotations is None else annotations),
        },
        "spec": s,
    }


def workload(kind: str, annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    tmpl = pod_template(annotations, **spec)
    meta = {"name": "api", "namespace": "default"}
    sel = {"matchLabels": {"app": "api"}}
    if kind == "Pod":
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {**meta, **tmpl["metadata"]},
            "spec": tmpl["spec"],
        }
    if kind in ("Job", "CronJob"):
        tmpl["spec"]["restartPolicy"] = "Never"
        job = {"template": tmpl}
        if kind == "Job":
            return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job}
        return {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": meta,
            "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": job}},
        }
    if kind == "ReplicationController":
        return {
            "apiVersion": "v1",
            "kind": kind,
            "metadata": meta,
            "spec": {"selector": {"app": "api"}, "template": tmpl},
        }
    body: dict[str, Any] = {"selector": sel, "template": tmpl}
    if kind == "StatefulSet":
        body["serviceName"] = "api"
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": meta, "spec": body}


KINDS = sorted(POD_TEMPLATE_PATHS)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    node = obj
    for key in POD_TEMPLATE_PATHS[obj["kind"]]:
        node = node[key]
    return node


def validate(obj: dict[str, Any]) -> None:
    """Strict offline schema validation; a `List` (no schema of its own) item by item."""
    if obj.get("kind") == "List":
        for item in obj["items"]:
            validate(item)
        return
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def sidecar_of(obj: dict[str, Any]) -> dict[str, Any]:
    spec = pod_spec(obj)["spec"]
    found = [
        c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == SIDECAR_NAME
    ]
    assert len(found) == 1
    return found[0]


def config_of(obj: dict[str, Any]) -> dict[str, Any]:
    env = {e["name"]: e for e in sidecar_of(obj)["env"]}
    return yaml.safe_load(env[CONFIG_ENV]["value"])


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_native(kind: str) -> None:
    before = workload(kind)
    validate(before)
    frozen = copy.deepcopy(before)
    after = inject_object(before, OPTS)
    assert before == frozen, "input must not be mutated"
    validate(after)
    tmpl = pod_spec(after)
    spec = tmpl["spec"]
    side = spec["initContainers"][0]
    assert side["name"] == SIDECAR_NAME and side["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["app"]
    assert side["command"] == ["meshcar", "sidecar", "--config-env", CONFIG_ENV]
    assert side["startupProbe"]["httpGet"] == {"path": "/ready", "port": 4191}
    assert side["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 4191}
    assert side["livenessProbe"]["httpGet"] == {"path": "/live", "port": 4191}
    assert tmpl["metadata"]["annotations"]["meshcar.io/injected"] == "true"
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env["HTTP_PROXY"] == env["http_proxy"] == "http://127.0.0.1:4140"
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,::1"
    assert env["KEEP"] == "1"
    assert [e["name"] for e in spec["containers"][0]["env"]].count("HTTP_PROXY") == 1
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["meshcar-state"]["emptyDir"]["medium"] == "Memory"
    sat = vols["meshcar-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert sat == {"audience": "meshcar-ca", "expirationSeconds": 600, "path": "token"}
    assert vols["meshcar-trust"]["configMap"]["name"] == "meshcar-ca-bundle"


def test_rendered_config() -> None:
    cfg = config_of(inject_object(workload("Deployment"), OPTS))
    assert cfg["identity"]["spiffe_id"] == (
        "spiffe://meshcar.demo/ns/$(MESHCAR_POD_NAMESPACE)/sa/$(MESHCAR_POD_SERVICE_ACCOUNT)"
    )
    assert cfg["identity"]["ca_url"] == OPTS.ca_url
    assert cfg["identity"]["k8s_token_file"] == "/var/run/secrets/meshcar/token"
    assert cfg["identity"]["ca_bundle"] == "/var/run/meshcar/trust/ca-bundle.pem"
    assert cfg["app"] == {"host": "127.0.0.1", "port": 9002}
    assert cfg["inbound"] == {
        "listen": "0.0.0.0:4143",
        "allow": [
            "spiffe://meshcar.demo/ns/default/sa/web",
            "spiffe://meshcar.demo/ns/edge/sa/edge",
        ],
    }
    assert cfg["outbound"] == {
        "listen": "127.0.0.1:4140",
        "upstreams": {
            "payments": {
                "endpoints": ["payments.default.svc:7003"],
                "spiffe_id": "spiffe://meshcar.demo/ns/default/sa/payments",
            }
        },
        "egress": "allow",
        "egress_proxy": "old:1",  # the container's HTTP_PROXY, kept for non-mesh hosts
    }
    assert cfg["admin"] == {"listen": "0.0.0.0:4191"}


def test_upstream_syntax_several_endpoints_and_lines() -> None:
    ann = dict(ANNOTATIONS)
    ann["meshcar.io/upstreams"] = (
        "payments=p-0.payments:7003;p-1.payments:7003=spiffe://meshcar.demo/ns/pay/sa/payments\n"
        "ledger=ledger.fin.svc.cluster.local:7010=fin/ledger"
    )
    ann["meshcar.io/inbound-port"] = "7002"
    ann["meshcar.io/outbound-port"] = "7102"
    ann["meshcar.io/admin-port"] = "7202"
    ann["meshcar.io/log-level"] = "debug"
    obj = inject_object(workload("Deployment", ann), OPTS)
    validate(obj)
    cfg = config_of(obj)
    assert cfg["outbound"]["upstreams"] == {
        "payments": {
            "endpoints": ["p-0.payments:7003", "p-1.payments:7003"],
            "spiffe_id": "spiffe://meshcar.demo/ns/pay/sa/payments",
        },
        "ledger": {
            "endpoints": ["ledger.fin.svc.cluster.local:7010"],
            "spiffe_id": "spiffe://meshcar.demo/ns/fin/sa/ledger",
        },
    }
    assert cfg["log_level"] == "debug"
    assert cfg["inbound"]["listen"] == "0.0.0.0:7002"
    side = sidecar_of(obj)
    assert side["readinessProbe"]["httpGet"]["port"] == 7202
    assert {p["containerPort"] for p in side["ports"]} == {7002, 7202}
    env = {e["name"]: e.get("value") for e in pod_spec(obj)["spec"]["containers"][0]["env"]}
    assert env["HTTP_PROXY"] == "http://127.0.0.1:7102"


def test_no_allowed_callers_means_empty_allow_list() -> None:
    ann = {"meshcar.io/app-port": "8080"}
    cfg = config_of(inject_object(workload("Pod", ann), OPTS))
    assert cfg["inbound"]["allow"] == [] and cfg["outbound"]["upstreams"] == {}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["annotation", "option"])
def test_classic_mode(kind: str, how: str) -> None:
    ann = dict(ANNOTATIONS)
    opts = OPTS
    if how == "annotation":
        ann["meshcar.io/sidecar-mode"] = "classic"
    else:
        opts = InjectOptions(sidecar_mode="classic")
    after = inject_object(workload(kind, ann), opts)
    validate(after)
    tmpl = pod_spec(after)
    spec = tmpl["spec"]
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == [SIDECAR_NAME, "app"]
    assert "restartPolicy" not in spec["containers"][0]
    assert tmpl["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "app"
    assert tmpl["metadata"]["annotations"]["meshcar.io/sidecar-mode"] == "classic"
    assert inject_object(after, opts) == after


def test_annotation_overrides_option() -> None:
    ann = dict(ANNOTATIONS, **{"meshcar.io/sidecar-mode": "native"})
    after = inject_object(workload("Deployment", ann), InjectOptions(sidecar_mode="classic"))
    assert pod_spec(after)["spec"]["initContainers"][0]["name"] == SIDECAR_NAME


def test_existing_init_containers_run_after_the_sidecar() -> None:
    init = [{"name": "migrate", "image": "example/migrate:1"}]
    after = inject_object(workload("Deployment", initContainers=init), OPTS)
    validate(after)
    assert [c["name"] for c in pod_spec(after)["spec"]["initContainers"]] == [
        SIDECAR_NAME,
        "migrate",
    ]


def test_ca_bundle_inline() -> None:
    after = inject_object(workload("Deployment"), InjectOptions(ca_bundle_pem=PEM))
    validate(after)
    cfg = config_of(after)
    assert cfg["identity"]["ca_bundle_pem"] == PEM and "ca_bundle" not in cfg["identity"]
    assert "meshcar-trust" not in {v["name"] for v in pod_spec(after)["spec"]["volumes"]}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["native", "classic"])
def test_idempotent(kind: str, mode: str) -> None:
    opts = InjectOptions(sidecar_mode=mode)
    once = inject_object(workload(kind), opts)
    assert once != workload(kind)
    assert inject_object(once, opts) == once
    # and through YAML text, as `meshcar inject` sees its own output
    text = yaml.safe_dump(once)
    assert inject_object(yaml.safe_load(text), opts) == once


def test_annotation_alone_does_not_count_as_injected() -> None:
    ann = dict(ANNOTATIONS, **{"meshcar.io/injected": "true"})
    after = inject_object(workload("Deployment", ann), OPTS)
    sidecar_of(after)


def test_workload_level_annotations_are_a_fallback() -> None:
    obj = workload("Deployment", annotations={})
    obj["metadata"]["annotations"] = dict(ANNOTATIONS)
    assert config_of(inject_object(obj, OPTS))["app"]["port"] == 9002


@pytest.mark.parametrize("kind", KINDS)
def test_opt_out(kind: str) -> None:
    obj = workload(kind, dict(ANNOTATIONS, **{"meshcar.io/inject": "disabled"}))
    assert inject_object(obj, OPTS) is obj


@pytest.mark.parametrize(
    "doc",
    [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "b"}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "s"},
            "spec": {"ports": [{"port": 80}], "selector": {"app": "x"}},
        },
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n"}},
        {"apiVersion": "apps/v1", "kind": "NotAWorkload", "spec": {"template": {"spec": {}}}},
        "a plain string",
        ["a", "list"],
    ],
)
def test_other_documents_untouched(doc: Any) -> None:
    frozen = copy.deepcopy(doc)
    assert inject_document(doc, OPTS) == frozen


def _refused(obj: dict[str, Any], *needles: str) -> None:
    with pytest.raises(InjectError) as info:
        inject_object(obj, OPTS)
    msg = str(info.value)
    assert "deployment/api (namespace default)" in msg or "pod/api (namespace default)" in msg, msg
    for n in needles:
        assert n in msg, msg


def test_refuse_host_network() -> None:
    _refused(workload("Deployment", hostNetwork=True), "hostNetwork")


def test_refuse_several_ports_without_an_app_port() -> None:
    ann = {k: v for k, v in ANNOTATIONS.items() if k != "meshcar.io/app-port"}
    obj = workload("Deployment", ann)
    pod_spec(obj)["spec"]["containers"][0]["ports"].append({"containerPort": 9100})
    _refused(obj, "several ports (9002, 9100)", "meshcar.io/app-port")


def test_refuse_allowed_callers_without_an_app_port() -> None:
    ann = {k: v for k, v in ANNOTATIONS.items() if k != "meshcar.io/app-port"}
    obj = workload("Deployment", ann)
    del pod_spec(obj)["spec"]["containers"][0]["ports"]
    _refused(obj, "allowed-callers needs an app port")


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("meshcar.io/app-port", "http", "not a port number"),
        ("meshcar.io/app-port", "70000", "not in 1..65535"),
        ("meshcar.io/app-port", "4143", "ports must differ"),
        ("meshcar.io/upstreams", "payments", "NAME=HOST:PORT"),
        ("meshcar.io/upstreams", "payments=payments.default.svc=default/payments", "not HOST:PORT"),
        ("meshcar.io/upstreams", "payments=p:1=x", "neither a spiffe"),
        ("meshcar.io/upstreams", "a=p:1=ns/sa,a=q:1=ns/sa", "given twice"),
        ("meshcar.io/allowed-callers", "spiffe://", "not a valid SPIFFE ID"),
        ("meshcar.io/allowed-callers", "Default/Web", "neither a spiffe"),
        ("meshcar.io/sidecar-mode", "ambient", "not native or classic"),
        ("meshcar.io/inject", "yes", "not enabled or disabled"),
        ("meshcar.io/log-level", "loud", "not a log level"),
    ],
)
def test_refuse_bad_annotations(key: str, value: str, needle: str) -> None:
    _refused(workload("Deployment", dict(ANNOTATIONS, **{key: value})), needle)


def test_refuse_port_collision_and_reserved_volume() -> None:
    obj = workload("Pod")
    obj["spec"]["containers"][0]["ports"].append({"containerPort": 4191})
    _refused(obj, "4191")
    obj = workload("Pod", volumes=[{"name": "meshcar-state", "emptyDir": {}}])
    _refused(obj, "reserved")
    _refused(workload("Pod", containers=[]), "no containers")


def test_list_documents() -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}}
    lst = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [workload("Deployment"), cm, workload("Job")],
    }
    out = inject_document(lst, OPTS)
    assert out["items"][1] == cm
    sidecar_of(out["items"][0])
    sidecar_of(out["items"][2])
    validate(out)
    assert inject_document(out, OPTS) == out


# --- the CLI ---------------------------------------------------------------------------


def _multi_doc() -> str:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v"}}
    lst = {"apiVersion": "v1", "kind": "List", "items": [workload("StatefulSet"), cm]}
    return yaml.safe_dump_all([workload("Deployment"), cm, lst, workload("CronJob")])


def test_cli_file_multi_doc(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.yaml"
    src.write_text(_multi_doc())
    assert cli.main(["-f", str(src)]) == 0
    out, err = capsys.readouterr()
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["Deployment", "ConfigMap", "List", "CronJob"]
    for d in docs:
        validate(d)
    assert docs == [inject_document(d, OPTS) for d in yaml.safe_load_all(_multi_doc())]
    assert "deployment/api (namespace default) injected" in err
    assert "configmap/c skipped (not a workload)" in err
    # round trip: injecting the output again changes nothing
    src.write_text(out)
    assert cli.main(["-f", str(src)]) == 0
    out2, err2 = capsys.readouterr()
    assert out2 == out and "already injected" in err2


def test_cli_flags(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.yaml"
    src.write_text(yaml.safe_dump(workload("Deployment")))
    bundle = tmp_path / "root.pem"
    bundle.write_text(PEM)
    assert (
        cli.main(
            [
                "-f",
                str(src),
                "--sidecar-mode",
                "classic",
                "--image",
                "reg.example/meshcar:9",
                "--ca-url",
                "https://ca.example:8600",
                "--trust-domain",
                "prod.example",
                "--ca-bundle",
                str(bundle),
            ]
        )
        == 0
    )
    doc = yaml.safe_load(capsys.readouterr().out)
    side = pod_spec(doc)["spec"]["containers"][0]
    assert side["name"] == SIDECAR_NAME and side["image"] == "reg.example/meshcar:9"
    cfg = config_of(doc)
    assert cfg["identity"]["ca_url"] == "https://ca.example:8600"
    assert cfg["identity"]["ca_bundle_pem"] == PEM
    assert cfg["identity"]["spiffe_id"].startswith("spiffe://prod.example/ns/")
    assert cfg["inbound"]["allow"][0] == "spiffe://prod.example/ns/default/sa/web"


def test_cli_strict_refusal_writes_nothing(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.yaml"
    src.write_text(yaml.safe_dump_all([workload("Deployment"), workload("Pod", hostNetwork=True)]))
    assert cli.main(["-f", str(src), "--strict"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert str(src) in err and "pod/api (namespace default)" in err and "hostNetwork" in err


@pytest.mark.parametrize(
    ("text", "needle"), [(":\n  - [", "not valid YAML"), (None, "cannot read")]
)
def test_cli_bad_input(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], text: str | None, needle: str
) -> None:
    src = tmp_path / "in.yaml"
    if text is not None:
        src.write_text(text)
    assert cli.main(["-f", str(src)]) == 1
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "needle"), [(None, "cannot read"), ("hello", "not a PEM certificate")]
)
def test_cli_bad_ca_bundle(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], content: str | None, needle: str
) -> None:
    src = tmp_path / "in.yaml"
    src.write_text(yaml.safe_dump(workload("Pod")))
    bundle = tmp_path / "root.pem"
    if content is not None:
        bundle.write_text(content)
    assert cli.main(["-f", str(src), "--ca-bundle", str(bundle)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and str(bundle) in err and needle in err


def test_cli_stdin_through_meshcar_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meshcar.cli", "inject", "-f", "-"],
        input=_multi_doc(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(proc.stdout))
    assert docs == [inject_document(d, OPTS) for d in yaml.safe_load_all(_multi_doc())]


def test_label_opt_out() -> None:
    obj = workload("Deployment")
    pod_spec(obj)["metadata"]["labels"]["meshcar.io/inject"] = "disabled"
    assert inject_object(obj, OPTS) is obj


@pytest.mark.parametrize("bundle", [None, PEM])
def test_rendered_config_is_accepted_by_the_sidecar_loader(bundle: str | None) -> None:
    """Everything but the two Kubernetes-only identity keys (k8s_token_file, ca_bundle_pem,
    which the sidecar does not read yet) passes the sidecar's own config validation once the
    kubelet has expanded $(MESHCAR_POD_NAMESPACE) and $(MESHCAR_POD_SERVICE_ACCOUNT)."""
    from meshcar.sidecar.config import parse_config

    env = {
        e["name"]: e
        for e in sidecar_of(
            inject_object(workload("Deployment"), InjectOptions(ca_bundle_pem=bundle))
        )["env"]
    }
    assert (
        env["MESHCAR_POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    )
    assert (
        env["MESHCAR_POD_SERVICE_ACCOUNT"]["valueFrom"]["fieldRef"]["fieldPath"]
        == "spec.serviceAccountName"
    )
    text = (
        env[CONFIG_ENV]["value"]
        .replace("$(MESHCAR_POD_NAMESPACE)", "default")
        .replace("$(MESHCAR_POD_SERVICE_ACCOUNT)", "api")
    )
    data = yaml.safe_load(text)
    ident = data["identity"]
    ident["token_file"] = ident.pop("k8s_token_file")
    if "ca_bundle_pem" in ident:
        del ident["ca_bundle_pem"]
        ident["ca_bundle"] = "/var/run/meshcar/trust/ca-bundle.pem"
    cfg = parse_config(data, "$MESHCAR_CONFIG")
    assert cfg.identity.spiffe_id == "spiffe://meshcar.demo/ns/default/sa/api"
    assert cfg.app.port == 9002
    assert cfg.allow == (
        "spiffe://meshcar.demo/ns/default/sa/web",
        "spiffe://meshcar.demo/ns/edge/sa/edge",
    )
    assert [u.name for u in cfg.upstreams] == ["payments"]
