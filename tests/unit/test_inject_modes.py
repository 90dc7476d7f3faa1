"""Injection without annotations, outbound-only workloads, mixed streams, proxy variables
already set, transparent capture (issue 16); every output validates strictly against the
Kubernetes 1.29 schemas, and every rendered sidecar config passes the sidecar's loader."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from meshcar.inject import cli
from meshcar.inject.iptables import main as iptables_main
from meshcar.inject.patch import (
    CONFIG_ENV,
    INIT_NAME,
    SIDECAR_NAME,
    SIDECAR_UID,
    InjectError,
    InjectOptions,
    inject_object,
)
from meshcar.sidecar.config import parse_config
from tests.unit.test_inject import pod_spec, validate, workload

OPTS = InjectOptions()
NEWEST = kubernetes_validate.latest_version()  # besides 1.29 (test_inject.validate)
UPSTREAMS = {"meshcar.io/upstreams": "payments=10.96.0.7:4143=default/payments"}


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj)["spec"]
    return list(spec.get("initContainers") or []) + list(spec["containers"])


def named(obj: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in containers(obj) if c["name"] == name]
    assert len(found) == 1, [c["name"] for c in containers(obj)]
    return found[0]


def raw_config(obj: dict[str, Any]) -> dict[str, Any]:
    env = {e["name"]: e for e in named(obj, SIDECAR_NAME)["env"]}
    return yaml.safe_load(env[CONFIG_ENV]["value"])


def loaded(obj: dict[str, Any]):  # the sidecar's own parse of what it will read
    env = {e["name"]: e for e in named(obj, SIDECAR_NAME)["env"]}
    text = (
        env[CONFIG_ENV]["value"]
        .replace("$(MESHCAR_POD_NAMESPACE)", "default")
        .replace("$(MESHCAR_POD_SERVICE_ACCOUNT)", "api")
    )
    data = yaml.safe_load(text)
    data["identity"]["token_file"] = data["identity"].pop("k8s_token_file")
    return parse_config(data, "$MESHCAR_CONFIG")


def env_of(c: dict[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in c.get("env") or []}


def injected(obj: dict[str, Any], opts: InjectOptions = OPTS) -> dict[str, Any]:
    out = inject_object(obj, opts)
    assert out is not obj
    validate(out)
    kubernetes_validate.validate(out, NEWEST, strict=True)
    assert inject_object(out, opts) == out  # idempotent
    return out


# --- without annotations -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet", "Pod", "Job"])
def test_the_single_declared_container_port_is_the_app_port(kind: str) -> None:
    out = injected(workload(kind, {}))
    cfg = loaded(out)
    assert cfg.app.port == 9002 and str(cfg.inbound_listen) == "0.0.0.0:4143"
    assert cfg.allow == () and cfg.upstreams == ()
    assert pod_spec(out)["metadata"]["annotations"]["meshcar.io/app-port"] == "9002"


def test_ports_of_several_containers_count_together_udp_not() -> None:
    obj = workload("Deployment", {})
    spec = pod_spec(obj)["spec"]
    spec["containers"][0]["ports"].append({"containerPort": 53, "protocol": "UDP"})
    spec["containers"].append(
        {"name": "metrics", "image": "m:1", "ports": [{"containerPort": 9100}]}
    )
    with pytest.raises(InjectError, match=r"several ports \(9002, 9100\)"):
        inject_object(obj, OPTS)
    obj["spec"]["template"]["metadata"]["annotations"]["meshcar.io/app-port"] = "9002"
    assert loaded(injected(obj)).app.port == 9002


# --- outbound-only -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["no ports", "annotated none"])
def test_outbound_only_cronjob(how: str) -> None:
    obj = workload("CronJob", dict(UPSTREAMS))
    app = pod_spec(obj)["spec"]["containers"][0]
    if how == "no ports":
        del app["ports"]
    else:
        pod_spec(obj)["metadata"]["annotations"]["meshcar.io/app-port"] = "none"
    out = injected(obj)
    cfg = loaded(out)
    # the inbound accepts no caller and only on loopback: nothing reaches the app
    assert str(cfg.inbound_listen) == "127.0.0.1:4143" and cfg.allow == ()
    assert [u.name for u in cfg.upstreams] == ["payments"]
    assert str(cfg.outbound_listen) == "127.0.0.1:4140" and cfg.egress == "allow"
    assert env_of(pod_spec(out)["spec"]["containers"][0])["HTTP_PROXY"] == "http://127.0.0.1:4140"
    assert pod_spec(out)["metadata"]["annotations"]["meshcar.io/app-port"] == "none"


# --- proxy variables already set -----------------------------------------------------


def test_existing_no_proxy_is_merged_and_http_proxy_becomes_the_egress_proxy() -> None:
    obj = workload("Deployment", {})
    app = pod_spec(obj)["spec"]["containers"][0]
    app["env"] = [
        {"name": "HTTP_PROXY", "value": "http://squid.corp:3128"},
        {"name": "no_proxy", "value": ".corp.example, 10.0.0.0/8"},
        {"name": "NO_PROXY", "value": "localhost,internal.svc"},
        {"name": "HTTPS_PROXY", "value": "http://squid.corp:3128"},
    ]
    out = injected(obj)
    env = env_of(pod_spec(out)["spec"]["containers"][0])
    assert env["HTTP_PROXY"] == env["http_proxy"] == "http://127.0.0.1:4140"
    want = ".corp.example,10.0.0.0/8,localhost,internal.svc,127.0.0.1,::1"
    assert env["NO_PROXY"] == env["no_proxy"] == want
    assert env["HTTPS_PROXY"] == "http://squid.corp:3128"  # https is not the sidecar's
    names = [e["name"] for e in pod_spec(out)["spec"]["containers"][0]["env"]]
    assert len(names) == len(set(names))
    cfg = loaded(out)
    assert cfg.egress == "allow" and str(cfg.egress_proxy) == "squid.corp:3128"


def test_egress_deny_renders_no_egress_proxy() -> None:
    out = injected(workload("Deployment", {"meshcar.io/egress": "deny"}))
    cfg = loaded(out)
    assert cfg.egress == "deny" and cfg.egress_proxy is None
    out = injected(workload("Deployment", {}), InjectOptions(egress="deny"))
    assert raw_config(out)["outbound"]["egress"] == "deny"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        (
            [{"name": "HTTP_PROXY", "valueFrom": {"configMapKeyRef": {"name": "p", "key": "k"}}}],
            "valueFrom",
        ),
        ([{"name": "HTTP_PROXY", "value": "https://squid:3128"}], "only an http://HOST:PORT"),
        (
            [
                {"name": "http_proxy", "value": "http://a:1"},
                {"name": "HTTP_PROXY", "value": "http://b:1"},
            ],
            "different HTTP_PROXY",
        ),
    ],
)
def test_proxy_variables_that_cannot_be_merged(env: list[dict[str, Any]], needle: str) -> None:
    obj = workload("Deployment", {})
    pod_spec(obj)["spec"]["containers"][0]["env"] = env
    with pytest.raises(InjectError, match=needle):
        inject_object(obj, OPTS)


# --- mixed streams through the CLI ---------------------------------------------------


def _mixed() -> str:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}}
    two = workload("StatefulSet", {})
    pod_spec(two)["spec"]["containers"][0]["ports"].append({"containerPort": 9100})
    two["metadata"]["name"] = "two"
    cron = workload("CronJob", dict(UPSTREAMS))
    del pod_spec(cron)["spec"]["containers"][0]["ports"]
    lst = {"apiVersion": "v1", "kind": "List", "items": [workload("Job", {}), two]}
    return yaml.safe_dump_all(
        [workload("Deployment", {}), workload("Pod", {}, hostNetwork=True), cm, cron, lst]
    )


def test_mixed_stream_is_reported_per_workload(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.yaml"
    src.write_text(_mixed())
    assert cli.main(["-f", str(src)]) == 0
    out, err = capsys.readouterr()
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["Deployment", "Pod", "ConfigMap", "CronJob", "List"]
    for d in docs:
        validate(d)
    before = list(yaml.safe_load_all(_mixed()))
    assert docs[1] == before[1] and docs[4]["items"][1] == before[4]["items"][1]  # unchanged
    named(docs[0], SIDECAR_NAME)
    named(docs[3], SIDECAR_NAME)
    named(docs[4]["items"][0], SIDECAR_NAME)
    lines = err.splitlines()
    assert lines == [
        "deployment/api (namespace default) injected (proxy; app port 9002)",
        "pod/api (namespace default) skipped (warning: hostNetwork pods cannot be injected "
        "(the sidecar's ports would be the node's))",
        "configmap/c skipped (not a workload)",
        "cronjob/api (namespace default) injected (proxy; outbound only: no "
        "meshcar.io/app-port and no containerPort)",
        "job/api (namespace default) injected (proxy; app port 9002)",
        "statefulset/two (namespace default) skipped (warning: the containers declare several "
        "ports (9002, 9100): set annotation meshcar.io/app-port to the one the mesh should reach)",
    ]
    src.write_text(out)  # again: what was injected stays, the rest is skipped again
    assert cli.main(["-f", str(src)]) == 0
    out2, _ = capsys.readouterr()
    assert out2 == out


def test_mixed_stream_strict_writes_nothing(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.yaml"
    src.write_text(_mixed())
    assert cli.main(["-f", str(src), "--strict"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "pod/api (namespace default): hostNetwork" in err
    assert "statefulset/two (namespace default): the containers declare several ports" in err


# --- transparent capture -------------------------------------------------------------


@pytest.mark.parametrize("how", ["annotation", "option"])
def test_transparent_mode_native(how: str) -> None:
    ann = dict(UPSTREAMS, **{"meshcar.io/match": "payments=10.96.0.8:80"})
    opts = OPTS
    if how == "annotation":
        ann["meshcar.io/capture"] = "transparent"
    else:
        opts = InjectOptions(capture="transparent")
    obj = workload("Deployment", ann, initContainers=[{"name": "migrate", "image": "m:1"}])
    out = injected(obj, opts)
    spec = pod_spec(out)["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [INIT_NAME, SIDECAR_NAME, "migrate"]
    init = named(out, INIT_NAME)
    assert init["command"] == [
        "meshcar",
        "init-iptables",
        "--proxy-uid",
        str(SIDECAR_UID),
        "--redirect-port",
        "4140",
    ]
    assert init["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["NET_ADMIN", "NET_RAW"],
    }
    others = [c for c in containers(out) if c["name"] != INIT_NAME]
    for c in others:  # nobody else may touch the pod's network
        assert "add" not in ((c.get("securityContext") or {}).get("capabilities") or {})
    assert named(out, SIDECAR_NAME)["securityContext"]["runAsUser"] == SIDECAR_UID
    # the app needs no proxy variables; what it had is left as it was
    assert env_of(spec["containers"][0]) == {"KEEP": "1", "HTTP_PROXY": "http://old:1"}
    cfg = loaded(out)
    assert cfg.outbound_listen is None and str(cfg.transparent_listen) == "127.0.0.1:4140"
    (up,) = cfg.upstreams
    assert [str(m) for m in up.match] == ["10.96.0.7:4143", "10.96.0.8:80"]
    assert cfg.egress == "allow" and cfg.egress_proxy is None
    assert pod_spec(out)["metadata"]["annotations"]["meshcar.io/capture"] == "transparent"


def test_transparent_mode_classic_captures_after_the_pods_init_containers() -> None:
    ann = {"meshcar.io/capture": "transparent", "meshcar.io/sidecar-mode": "classic"}
    obj = workload("Deployment", ann, initContainers=[{"name": "migrate", "image": "m:1"}])
    spec = pod_spec(injected(obj))["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["migrate", INIT_NAME]
    assert [c["name"] for c in spec["containers"]] == [SIDECAR_NAME, "app"]


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("meshcar.io/capture", "ebpf", "not proxy or transparent"),
        ("meshcar.io/egress", "maybe", "not allow or deny"),
        ("meshcar.io/match", "nosuch=10.0.0.1:80", "known upstream"),
        ("meshcar.io/match", "payments=10.0.0.1", "not HOST:PORT"),
    ],
)
def test_bad_capture_annotations(key: str, value: str, needle: str) -> None:
    ann = dict(UPSTREAMS, **{"meshcar.io/capture": "transparent", key: value})
    with pytest.raises(InjectError, match=needle):
        inject_object(workload("Deployment", ann), OPTS)


def test_transparent_refusals() -> None:
    hostnames = {
        "meshcar.io/capture": "transparent",
        "meshcar.io/upstreams": "payments=payments.default.svc:4143=default/payments",
    }
    with pytest.raises(InjectError, match="upstream 'payments' has no IP:PORT to capture"):
        inject_object(workload("Deployment", hostnames), OPTS)
    hostnames["meshcar.io/match"] = "payments=10.96.0.7:80"  # its Service's ClusterIP
    (up,) = loaded(injected(workload("Deployment", hostnames))).upstreams
    assert [str(m) for m in up.match] == ["10.96.0.7:80"]
    taken = workload(
        "Deployment",
        {"meshcar.io/capture": "transparent"},
        initContainers=[{"name": INIT_NAME, "image": "x:1"}],
    )
    with pytest.raises(InjectError, match="'meshcar-init' is reserved"):
        inject_object(taken, OPTS)


def test_init_container_command_is_a_real_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    out = injected(workload("Deployment", {"meshcar.io/capture": "transparent"}))
    argv = named(out, INIT_NAME)["command"][2:]
    assert iptables_main([*argv, "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "iptables -w -t nat -A OUTPUT -p tcp -j MESHCAR_OUTPUT" in printed
    assert (
        f"iptables -w -t nat -A MESHCAR_OUTPUT -p tcp -m owner --uid-owner {SIDECAR_UID} -j RETURN"
        in printed
    )
    assert printed[-1].endswith("-d 0.0.0.0/0 -j REDIRECT --to-ports 4140")
    assert not any("PREROUTING" in line for line in printed)  # inbound capture is opt-in


@pytest.mark.parametrize(
    "argv",
    [
        ["--proxy-uid", "0", "--redirect-port", "4140"],
        ["--proxy-uid", "1", "--redirect-port", "70000"],
        ["--proxy-uid", "1", "--redirect-port", "4140", "--app-port", "9002"],
    ],
)
def test_init_iptables_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        iptables_main([*argv, "--dry-run"])
    assert exc.value.code == 2
