"""The `timeouts:` and `limits:` sections of the sidecar and edge configs: defaults, values
taken, and every bad value reported at once with its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshcar.edge.config import parse_edge_config
from meshcar.errors import ConfigError
from meshcar.net.forward import Timeouts
from meshcar.net.limits import ConnectionLimit, Limits
from meshcar.sidecar.config import parse_config


def sidecar(tmp: Path, **top: object):  # noqa: ANN201
    return parse_config(
        {
            "identity": {
                "spiffe_id": "spiffe://t/svc/a",
                "ca_url": "https://127.0.0.1:1",
                "ca_bundle": "x",
                "state_dir": str(tmp),
            },
            "app": {"port": 8080},
            "inbound": {"listen": "127.0.0.1:1", "allow": []},
            "admin": {"listen": "127.0.0.1:2"},
            **top,
        },
        "s.yaml",
        tmp,
    )


def edge(tmp: Path, **top: object):  # noqa: ANN201
    return parse_edge_config(
        {
            "listen": {"https": "127.0.0.1:1"},
            "admin": {"listen": "127.0.0.1:2"},
            "routes": [
                {"host": "a.test", "mode": "passthrough", "backend": {"endpoints": ["127.0.0.1:3"]}}
            ],
            **top,
        },
        "e.yaml",
        tmp,
    )


@pytest.mark.parametrize("parse", [sidecar, edge])
def test_defaults(parse, tmp_path: Path) -> None:  # noqa: ANN001
    cfg = parse(tmp_path)
    assert cfg.timeouts == Timeouts() and cfg.limits == Limits()
    assert (cfg.timeouts.request_body, cfg.timeouts.write, cfg.timeouts.response_body) == (
        60,
        60,
        60,
    )
    assert (cfg.limits.max_connections, cfg.limits.max_upstream_connections) == (10000, 1024)


@pytest.mark.parametrize("parse", [sidecar, edge])
def test_values_are_taken(parse, tmp_path: Path) -> None:  # noqa: ANN001
    cfg = parse(
        tmp_path,
        timeouts={
            "request_head_seconds": 5,
            "idle_seconds": 7,
            "request_body_seconds": 1,
            "response_head_seconds": 2,
            "response_body_seconds": 3,
            "write_seconds": 0.5,
        },
        limits={"max_connections": 3, "max_upstream_connections": 4},
    )
    assert cfg.timeouts == Timeouts(
        request_head=5, idle=7, request_body=1, response_head=2, response_body=3, write=0.5
    )
    assert cfg.limits == Limits(3, 4)


@pytest.mark.parametrize("parse", [sidecar, edge])
def test_bad_values_are_all_reported(parse, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError) as info:
        parse(
            tmp_path,
            timeouts={"write_seconds": 0, "idle_seconds": "x", "body": 1},
            limits={"max_connections": 0, "max_upstream_connections": 1.5, "other": 1},
        )
    text = str(info.value)
    for key in (
        "timeouts.write_seconds",
        "timeouts.idle_seconds",
        "timeouts.body",
        "limits.max_connections",
        "limits.max_upstream_connections",
        "limits.other",
    ):
        assert key in text
    with pytest.raises(ConfigError, match="timeouts: must be a mapping"):
        parse(tmp_path, timeouts=[1])


def test_connection_limit_counts_and_refuses() -> None:
    refused: list[str] = []
    limit = ConnectionLimit("x", 2, refused.append)
    assert limit.try_enter() and limit.try_enter()
    assert not limit.try_enter() and refused == ["x"] and limit.open == 2
    limit.leave()
    assert limit.try_enter()
