"""Sidecar config validation: good configs parse, every problem is reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshcar.errors import ConfigError
from meshcar.sidecar.config import load_config, load_config_text

GOOD = """
identity:
  spiffe_id: spiffe://meshcar.demo/svc/api
  ca_url: https://127.0.0.1:8600
  ca_bundle: ca.pem
  token_file: api.token
  state_dir: state
app: {port: 9002}
inbound:
  listen: 127.0.0.1:7002
  allow: [spiffe://meshcar.demo/svc/web]
outbound:
  listen: 127.0.0.1:7102
  upstreams:
    Payments:
      endpoints: ["127.0.0.1:7003"]
      spiffe_id: spiffe://meshcar.demo/svc/payments
      local_port: 7302
admin: {listen: 127.0.0.1:7202}
"""


def test_good_config(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(GOOD)
    cfg = load_config(f)
    assert cfg.identity.spiffe_id == "spiffe://meshcar.demo/svc/api"
    assert cfg.identity.ca_bundle == tmp_path / "ca.pem"  # relative to the config file
    assert cfg.app.port == 9002 and cfg.app.host == "127.0.0.1"
    assert cfg.allow == ("spiffe://meshcar.demo/svc/web",)
    (up,) = cfg.upstreams
    assert (
        up.name == "payments" and up.local_port == 7302 and str(up.endpoints[0]) == "127.0.0.1:7003"
    )
    assert cfg.trust_domain == "meshcar.demo"


def test_every_problem_is_reported_with_file_and_key() -> None:
    bad = """
identity:
  spiffe_id: http://nope
  ca_url: http://127.0.0.1:8600
  state_dir: s
  colour: blue
app: {port: 70000}
inbound:
  listen: nohost
  allow: [spiffe://meshcar.demo/svc/web, 42]
outbound:
  listen: 0.0.0.0:7102
  upstreams:
    payments: {endpoints: [], spiffe_id: spiffe://x/}
admin: {}
"""
    with pytest.raises(ConfigError) as err:
        load_config_text(bad, "bad.yaml")
    problems = err.value.problems
    text = "\n".join(problems)
    for key in [
        "identity.spiffe_id",
        "identity.ca_url",
        "identity.ca_bundle",
        "identity.colour",
        "app.port",
        "inbound.listen",
        "inbound.allow[1]",
        "outbound.listen",
        "outbound.upstreams.payments.endpoints",
        "outbound.upstreams.payments.spiffe_id",
        "admin.listen",
    ]:
        assert f"bad.yaml: {key}:" in text, (key, text)
    assert len(problems) >= 11


@pytest.mark.parametrize(
    "text,msg",
    [
        ("[1, 2]", "top level must be a mapping"),
        ("a: [", "not valid YAML"),
        ("", "top level must be a mapping"),
    ],
)
def test_not_a_config(text: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        load_config_text(text, "x.yaml")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "value, ok",
    [(30, True), (0.5, True), (0, False), (-1, False), ("30", False), (True, False), (4000, False)],
)
def test_pool_idle_seconds(value: object, ok: bool) -> None:
    import json

    text = GOOD.replace(
        "  listen: 127.0.0.1:7102\n",
        f"  listen: 127.0.0.1:7102\n  pool_idle_seconds: {json.dumps(value)}\n",
    )
    if ok:
        assert load_config_text(text, "s.yaml").pool_idle_seconds == float(value)  # type: ignore[arg-type]
    else:
        with pytest.raises(ConfigError, match="outbound.pool_idle_seconds"):
            load_config_text(text, "s.yaml")
    assert load_config_text(GOOD, "s.yaml").pool_idle_seconds == 30.0


@pytest.mark.parametrize(
    "paths, expect",
    [
        (None, {b"/live", b"/ready", b"/metrics"}),  # the default
        (["/live", "/ready"], {b"/live", b"/ready"}),
        ([], set()),  # nothing off loopback
        (["/live", "/ready", "/metrics", "/certs"], {b"/live", b"/ready", b"/metrics", b"/certs"}),
    ],
)
def test_admin_public_paths(paths: list[str] | None, expect: set[bytes]) -> None:
    import json

    text = (
        GOOD
        if paths is None
        else GOOD.replace(
            "admin: {listen: 127.0.0.1:7202}",
            f"admin: {{listen: 127.0.0.1:7202, public_paths: {json.dumps(paths)}}}",
        )
    )
    assert load_config_text(text, "s.yaml").admin_public_paths == expect


@pytest.mark.parametrize(
    "paths, msg",
    [
        (["/live", "/shutdown"], "'/shutdown' cannot be served off loopback"),
        (["/renew"], "'/renew' cannot be served off loopback"),
        (["/anything"], "'/anything' cannot be served off loopback"),
        ("/live", "must be a list of paths"),
        ([1], "must be a list of paths"),
    ],
)
def test_admin_public_paths_refuses_mutating_and_unknown(paths: object, msg: str) -> None:
    import json

    text = GOOD.replace(
        "admin: {listen: 127.0.0.1:7202}",
        f"admin: {{listen: 127.0.0.1:7202, public_paths: {json.dumps(paths)}}}",
    )
    with pytest.raises(ConfigError, match="admin.public_paths") as e:
        load_config_text(text, "s.yaml")
    assert msg in str(e.value)


def test_admin_server_refuses_public_mutating_paths() -> None:
    from meshcar.admin.metrics import Metrics
    from meshcar.admin.server import AdminHooks, AdminServer

    with pytest.raises(ValueError, match="/shutdown"):
        AdminServer(
            Metrics(), AdminHooks(lambda: (True, ""), dict), frozenset({b"/live", b"/shutdown"})
        )
