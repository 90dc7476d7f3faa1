"""meshcar inject: the gRPC (`meshcar.io/app-protocol: h2c`) and opaque TCP
(`meshcar.io/inbound-tcp-ports`, `meshcar.io/tcp-upstreams`) annotations (issue 16, the
follow-up of issue 13). Outputs validate strictly against Kubernetes 1.29 and the newest
schema, and every rendered sidecar config goes through the sidecar's own loader."""

from __future__ import annotations

import pytest
import yaml

from meshcar.inject import cli
from meshcar.inject.patch import InjectOptions, inject_object
from tests.unit.test_inject import ANNOTATIONS, _refused, workload
from tests.unit.test_inject_modes import injected, loaded, raw_config

DB = "payments-db=payments.default.svc:7003=default/payments"
UPS = ANNOTATIONS["meshcar.io/upstreams"] + ", " + DB


def test_app_protocol_h2c_reaches_the_sidecar() -> None:
    out = injected(workload("Deployment", {**ANNOTATIONS, "meshcar.io/app-protocol": "h2c"}))
    assert raw_config(out)["app"]["protocol"] == "h2c"
    assert loaded(out).app_protocol == "h2c"


def test_app_protocol_defaults_to_http1_and_is_not_rendered() -> None:
    out = injected(workload("Deployment"))
    assert "protocol" not in raw_config(out)["app"]
    assert loaded(out).app_protocol == "http1"
    out = injected(workload("Deployment", {**ANNOTATIONS, "meshcar.io/app-protocol": "http1"}))
    assert loaded(out).app_protocol == "http1"


@pytest.mark.parametrize("mode", ["native", "classic"])
def test_inbound_tcp_ports(mode: str) -> None:
    ann = {**ANNOTATIONS, "meshcar.io/inbound-tcp-ports": "9013, 5432:proxy-v2"}
    out = injected(workload("Deployment", ann), InjectOptions(sidecar_mode=mode))
    assert raw_config(out)["inbound"]["tcp"] == [
        {"port": 9013},
        {"port": 5432, "proxy_protocol": "v2"},
    ]
    cfg = loaded(out)
    assert [(t.port, t.host, t.proxy_protocol) for t in cfg.tcp_ports] == [
        (9013, "127.0.0.1", "none"),
        (5432, "127.0.0.1", "v2"),
    ]
    # the same allow list admits tunnels as HTTP callers
    assert list(cfg.allow) == [
        "spiffe://meshcar.demo/ns/default/sa/web",
        "spiffe://meshcar.demo/ns/edge/sa/edge",
    ]


@pytest.mark.parametrize("capture", ["proxy", "transparent"])
def test_tcp_upstream(capture: str) -> None:
    ann = {
        **ANNOTATIONS,
        "meshcar.io/upstreams": UPS,
        "meshcar.io/tcp-upstreams": "payments-db=7312:9013",
        "meshcar.io/capture": capture,
    }
    if capture == "transparent":  # the http upstream needs an original destination
        ann["meshcar.io/match"] = "payments=10.96.0.7:7003"
    out = injected(workload("Deployment", ann))
    raw = raw_config(out)["outbound"]["upstreams"]
    assert raw["payments-db"] == {
        "protocol": "tcp",
        "endpoints": ["payments.default.svc:7003"],
        "spiffe_id": "spiffe://meshcar.demo/ns/default/sa/payments",
        "local_port": 7312,
        "target_port": 9013,
    }
    assert "protocol" not in raw["payments"]
    ups = {u.name: u for u in loaded(out).upstreams}
    assert (ups["payments-db"].protocol, ups["payments-db"].local_port) == ("tcp", 7312)
    assert ups["payments-db"].target_port == 9013 and ups["payments-db"].match == ()
    assert ups["payments"].protocol == "http"


def test_tcp_upstream_with_an_ip_endpoint_gets_no_match_in_transparent_capture() -> None:
    ann = {
        "meshcar.io/app-port": "9002",
        "meshcar.io/capture": "transparent",
        "meshcar.io/upstreams": "db=10.96.0.9:7003=default/payments",
        "meshcar.io/tcp-upstreams": "db=7312:9013",
    }
    out = injected(workload("Deployment", ann))
    assert "match" not in raw_config(out)["outbound"]["upstreams"]["db"]
    assert {u.name: u.match for u in loaded(out).upstreams} == {"db": ()}


def test_the_demo_payments_pod() -> None:
    """payments of the demo: gRPC over h2c and its ledger on 9013, for api only."""
    ann = {
        "meshcar.io/app-port": "9003",
        "meshcar.io/allowed-callers": "default/api",
        "meshcar.io/app-protocol": "h2c",
        "meshcar.io/inbound-tcp-ports": "9013",
    }
    cfg = loaded(injected(workload("Deployment", ann)))
    assert (cfg.app.port, cfg.app_protocol) == (9003, "h2c")
    assert [t.port for t in cfg.tcp_ports] == [9013]


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        ({"meshcar.io/app-protocol": "h2"}, ["meshcar.io/app-protocol", "'h2'"]),
        ({"meshcar.io/inbound-tcp-ports": "9013:v2"}, ["inbound-tcp-ports", "PORT:proxy-v2"]),
        ({"meshcar.io/inbound-tcp-ports": "70000"}, ["inbound-tcp-ports", "1..65535"]),
        ({"meshcar.io/inbound-tcp-ports": "9013 9013"}, ["inbound-tcp-ports", "twice"]),
        ({"meshcar.io/inbound-tcp-ports": "4191"}, ["inbound-tcp-ports", "admin"]),
        ({"meshcar.io/tcp-upstreams": "nope=7312:9013"}, ["tcp-upstreams", "'nope'"]),
        ({"meshcar.io/tcp-upstreams": "payments=7312"}, ["LOCAL_PORT:TARGET_PORT"]),
        ({"meshcar.io/tcp-upstreams": "payments=4140:9013"}, ["local port 4140", "outbound"]),
        ({"meshcar.io/tcp-upstreams": "payments=9002:9013"}, ["local port 9002", "app"]),
        ({"meshcar.io/tcp-upstreams": "payments=x:9013"}, ["local port 'x'"]),
    ],
)
def test_bad_protocol_annotations_are_refused(extra: dict[str, str], needles: list[str]) -> None:
    _refused(workload("Deployment", {**ANNOTATIONS, **extra}), *needles)


def test_two_tcp_upstreams_on_one_local_port_are_refused() -> None:
    ann = {
        **ANNOTATIONS,
        "meshcar.io/upstreams": UPS,
        "meshcar.io/tcp-upstreams": "payments=7312:9013 payments-db=7312:9013",
    }
    _refused(workload("Deployment", ann), "local port 7312", "upstream 'payments'")


def test_match_of_a_tcp_upstream_is_refused() -> None:
    ann = {
        **ANNOTATIONS,
        "meshcar.io/capture": "transparent",
        "meshcar.io/tcp-upstreams": "payments=7312:9013",
        "meshcar.io/match": "payments=10.96.0.7:7003",
    }
    _refused(workload("Deployment", ann), "meshcar.io/match", "tcp upstream")


def test_inbound_tcp_ports_need_an_app_port() -> None:
    ann = {"meshcar.io/app-port": "none", "meshcar.io/inbound-tcp-ports": "9013"}
    _refused(workload("Deployment", ann), "inbound-tcp-ports", "needs an app port")


def test_outbound_only_pod_with_a_tcp_upstream() -> None:
    ann = {
        "meshcar.io/app-port": "none",
        "meshcar.io/upstreams": DB,
        "meshcar.io/tcp-upstreams": "payments-db=7312:9013",
    }
    obj = workload("Deployment", ann)
    del obj["spec"]["template"]["spec"]["containers"][0]["ports"]
    cfg = loaded(injected(obj))
    assert [(u.name, u.protocol, u.local_port) for u in cfg.upstreams] == [
        ("payments-db", "tcp", 7312)
    ]
    assert inject_object(obj, InjectOptions()) != obj


def test_the_cli_report_names_the_protocol_pieces() -> None:
    ann = {
        **ANNOTATIONS,
        "meshcar.io/upstreams": UPS,
        "meshcar.io/app-protocol": "h2c",
        "meshcar.io/inbound-tcp-ports": "9013",
        "meshcar.io/tcp-upstreams": "payments-db=7312:9013",
    }
    _, report = cli.inject_stream(yaml.safe_dump(workload("Deployment", ann)), InjectOptions())
    assert report == [
        "deployment/api (namespace default) injected (proxy; app port 9002; app protocol h2c; "
        "inbound tcp 9013; tcp upstreams payments-db=7312:9013)"
    ]
