"""`protocol: tcp` upstreams and `inbound.tcp` ports: parsing, every problem reported, the
JSON Schema accepting the same keys, and the tunnel preamble."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from meshcar.common.schema import document
from meshcar.errors import ConfigError
from meshcar.sidecar.config import SIDECAR, TcpPort, load_config_text
from meshcar.sidecar.tcp import parse_preamble, preamble

BASE = """
identity:
  spiffe_id: spiffe://meshcar.demo/svc/web
  ca_url: https://127.0.0.1:8600
  ca_bundle: ca.pem
  token_file: web.token
  state_dir: state
app: {port: 9002}
inbound:
  listen: 127.0.0.1:7002
  allow: [spiffe://meshcar.demo/svc/api]
  tcp:
    - {port: 5432, proxy_protocol: v2}
    - {port: 3306, host: 127.0.0.2, idle_seconds: 60}
outbound:
  upstreams:
    db:
      protocol: tcp
      endpoints: ["127.0.0.1:7003"]
      spiffe_id: spiffe://meshcar.demo/svc/db
      local_port: 15432
      target_port: 5432
      idle_seconds: 120
    api:
      endpoints: ["127.0.0.1:7004"]
      spiffe_id: spiffe://meshcar.demo/svc/api
admin: {listen: 127.0.0.1:7202}
"""


def test_tcp_keys_parse() -> None:
    cfg = load_config_text(BASE, "s.yaml")
    assert cfg.tcp_ports == (
        TcpPort(5432, "127.0.0.1", "v2", 3600.0),
        TcpPort(3306, "127.0.0.2", "none", 60.0),
    )
    ups = {u.name: u for u in cfg.upstreams}
    db, api = ups["db"], ups["api"]
    assert (db.protocol, db.local_port, db.target_port, db.idle_seconds) == (
        "tcp",
        15432,
        5432,
        120.0,
    )
    assert api.protocol == "http" and api.target_port is None


def test_schema_accepts_the_tcp_keys() -> None:
    schema = document(SIDECAR, "sidecar", "x")
    jsonschema.validate(yaml.safe_load(BASE), schema)


@pytest.mark.parametrize(
    "old, new, msg",
    [
        ("      local_port: 15432\n", "", "outbound.upstreams.db.local_port: is required"),
        ("      target_port: 5432\n", "", "outbound.upstreams.db.target_port: is required"),
        ("      protocol: tcp\n", "      protocol: udp\n", "db.protocol: must be http or tcp"),
        (
            "      protocol: tcp\n",
            "",
            "outbound.upstreams.db: target_port and idle_seconds need protocol: tcp",
        ),
        (
            "      target_port: 5432\n",
            '      target_port: 5432\n      match: ["10.0.0.1:5432"]\n',
            "db.match: transparent capture is for http upstreams only",
        ),
        ("      idle_seconds: 120\n", "      idle_seconds: 0\n", "db.idle_seconds: must be"),
        ("proxy_protocol: v2", "proxy_protocol: v1", r"inbound.tcp\[0\].proxy_protocol"),
        ("port: 3306,", "port: 5432,", r"inbound.tcp\[1\].port: port 5432 is listed twice"),
        ("port: 3306,", "port: 70000,", r"inbound.tcp\[1\].port: must be a port"),
        ("idle_seconds: 60}", "idle_seconds: 60, allow: []}", r"inbound.tcp\[1\].allow"),
    ],
)
def test_tcp_problems_are_reported(old: str, new: str, msg: str) -> None:
    assert old in BASE
    with pytest.raises(ConfigError, match=msg):
        load_config_text(BASE.replace(old, new), "s.yaml")


def test_preamble_round_trip_and_malformed() -> None:
    assert preamble(5432) == b"meshcar-tcp/1 5432\n"
    assert parse_preamble(preamble(5432)[:-1]) == 5432
    for bad in [b"meshcar-tcp/1 0", b"meshcar-tcp/1 65536", b"meshcar-tcp/1 05432", b"GET /"]:
        assert parse_preamble(bad) is None, bad
    assert parse_preamble(b"meshcar-tcp/1 +1") is None
