"""`meshcar config schema`: the JSON Schema is rendered from the same key description the
checkers use, so every example config validates against it, unknown keys are refused by both,
and the keys the checker accepts in each section equal the schema's (drift fails here)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from meshcar.configcli import guess_kind, schema
from meshcar.demo import scenario as sc
from meshcar.demo.plan import DemoPaths, edge_config, sidecar_config
from meshcar.edge.config import parse_edge_config
from meshcar.errors import ConfigError
from meshcar.inject.patch import CONFIG_ENV, InjectOptions, inject_object
from meshcar.sidecar.config import parse_config
from tests.unit import test_edge_config_policy, test_sidecar_config
from tests.unit.test_inject import PEM, sidecar_of, workload

ROOT = Path(__file__).resolve().parents[2]
PARSE = {"sidecar": parse_config, "edge": parse_edge_config}
UNKNOWN = "zz_unknown"

# Every key of every section, with values both the checker and the schema accept.
FULL_SIDECAR: dict[str, Any] = {
    "identity": {
        "spiffe_id": "spiffe://t.test/svc/a",
        "ca_url": "https://127.0.0.1:8600",
        "ca_bundle": "ca.pem",
        "token_file": "a.token",
        "state_dir": "state",
        "ttl_seconds": 3600,
        "renew_fraction": 0.5,
        "bundle_refresh_seconds": 60,
    },
    "app": {"host": "127.0.0.1", "port": 9000},
    "inbound": {
        "listen": "127.0.0.1:7000",
        "allow": ["spiffe://t.test/svc/b"],
        "policies": [
            {
                "name": "read",
                "from": ["spiffe://t.test/ns/x/*"],
                "hosts": ["*.t.test"],
                "methods": ["GET"],
                "paths": ["/v1/*"],
                "mode": "audit",
            }
        ],
        "tcp": [{"port": 5432, "host": "127.0.0.1", "proxy_protocol": "v2", "idle_seconds": 60}],
    },
    "outbound": {
        "listen": "127.0.0.1:7100",
        "transparent_listen": "127.0.0.1:15001",
        "pool_idle_seconds": 5,
        "upstreams": {
            "b": {
                "endpoints": ["127.0.0.1:7001"],
                "spiffe_id": "spiffe://t.test/svc/b",
                "local_port": 7300,
                "match": ["10.0.0.2:80"],
                "protocol": "http",
                "timeouts": {
                    "connect_seconds": 2,
                    "request_seconds": 20,
                    "per_try_seconds": 5,
                    "idle_seconds": 10,
                },
                "retries": {
                    "retry_on": ["connect-failure", "reset", "timeout", "5xx", 503],
                    "max_attempts": 2,
                    "budget_ratio": 0.1,
                    "min_per_second": 1,
                    "window_seconds": 5,
                    "buffer_bytes": 1024,
                },
                "outlier": {
                    "consecutive_failures": 3,
                    "base_ejection_seconds": 5,
                    "max_ejection_seconds": 60,
                    "max_ejected_percent": 50,
                },
                "circuit": {"max_connections": 10, "max_pending": 5, "max_requests": 50},
                "dns_refresh_seconds": 5,
            },
            "db": {
                "endpoints": ["127.0.0.1:7001"],
                "spiffe_id": "spiffe://t.test/svc/b",
                "local_port": 7301,
                "protocol": "tcp",
                "target_port": 5432,
                "idle_seconds": 60,
            },
        },
        "splits": {"svc": [{"upstream": "b", "weight": 9}]},
    },
    "admin": {"listen": "127.0.0.1:7200", "public_paths": ["/live", "/certs"]},
    "log_level": "warning",
    "drain_seconds": 0,
    "workers": 2,
    "access_log": {"fields": ["status", "request_id", "reason"]},
    "reload": {"watch_seconds": 2},
    "timeouts": {
        "request_head_seconds": 1,
        "idle_seconds": 2,
        "request_body_seconds": 3,
        "response_head_seconds": 4,
        "response_body_seconds": 5,
        "write_seconds": 6,
    },
    "limits": {"max_connections": 10, "max_upstream_connections": 5},
    "http": {
        "path": {"merge_slashes": False, "escaped_slashes": "keep"},
        "headers": {"underscores": "drop", "max_count": 50, "max_value_bytes": 4096},
    },
}
VAULT_IDENTITY: dict[str, Any] = {
    "spiffe_id": "spiffe://t.test/svc/a",
    "state_dir": "state",
    "vault": {
        "addr": ["https://v0:8200", "https://v1:8200"],
        "role": "r",
        "mount": "pki",
        "approle_role_id_file": "rid",
        "approle_secret_id_file": "sid",
        "ca_cert": "v.pem",
        "connect_timeout_seconds": 1,
        "timeout_seconds": 5,
    },
}
K8S_IDENTITY: dict[str, Any] = {
    "spiffe_id": "spiffe://t.test/svc/a",
    "state_dir": "state",
    "ca_url": "https://ca:8600",
    "ca_bundle_pem": PEM,
    "k8s_token_file": "/var/run/token",
}
FULL_EDGE: dict[str, Any] = {
    "listen": {"https": "127.0.0.1:8443", "http": "127.0.0.1:8080"},
    "admin": {"listen": "127.0.0.1:7204", "public_paths": []},
    "identity": dict(FULL_SIDECAR["identity"]),
    "trusted_hops": 1,
    "default_route": "www.t.test",
    "log_level": "debug",
    "hello_timeout": 5,
    "handshake_timeout": 5.5,
    "pool_idle_seconds": 10,
    "drain_seconds": 3,
    "workers": "auto",
    "access_log": {"fields": ["host", "status", "reason"]},
    "reload": {"watch_seconds": 0.5},
    "timeouts": dict(FULL_SIDECAR["timeouts"]),
    "limits": dict(FULL_SIDECAR["limits"]),
    "http": copy.deepcopy(FULL_SIDECAR["http"]),
    "routes": [
        {
            "host": "www.t.test",
            "mode": "terminate",
            "tls": {"cert": "site.pem", "key": "site.key"},
            "path_prefix": "/app",
            "hsts": True,
            "rate_limit": {"per_second": 5, "burst": 10},
            "max_body_bytes": 1024,
            "timeouts": dict(FULL_SIDECAR["outbound"]["upstreams"]["b"]["timeouts"]),
            "retries": dict(FULL_SIDECAR["outbound"]["upstreams"]["b"]["retries"]),
            "outlier": dict(FULL_SIDECAR["outbound"]["upstreams"]["b"]["outlier"]),
            "circuit": dict(FULL_SIDECAR["outbound"]["upstreams"]["b"]["circuit"]),
            "client_auth": {"mode": "optional", "ca": "clients.pem"},
            "headers": {"add": {"X-Edge": "1"}, "remove": ["X-Internal"]},
            "deny": [
                {
                    "name": "admin",
                    "methods": ["POST"],
                    "path": "^/admin",
                    "header": {"name": "x-bad", "pattern": "yes"},
                }
            ],
            "backend": {
                "endpoints": ["127.0.0.1:9001", "127.0.0.1:9002"],
                "balance": "least_connections",
                "health": {"interval": 1, "timeout": 0.5, "path": "/healthz", "fall": 3, "rise": 2},
            },
        },
        {
            "host": "api.t.test",
            "mode": "bridge",
            "tls": {"cert": "site.pem", "key": "site.key"},
            "path_exact": "/v1",
            "hsts": "max-age=60",
            "backend": {"endpoints": ["127.0.0.1:7002"], "spiffe_id": "spiffe://t.test/svc/api"},
        },
        {
            "host": "*.t.test",
            "mode": "terminate",
            "tls": {"cert": "site.pem", "key": "site.key"},
            "backends": [
                {"weight": 90, "endpoints": ["127.0.0.1:9003"], "balance": "round_robin"},
                {"weight": 10, "endpoints": ["127.0.0.1:9004"], "health": {"interval": 1}},
            ],
            "rules": [
                {
                    "match": {
                        "path_prefix": "/api/",
                        "path_exact": "/api/x",
                        "path_regex": "/api/[a-z]+",
                        "methods": ["GET"],
                        "headers": [{"name": "x-canary", "value": "1", "pattern": "^1$"}],
                    },
                    "backend": {"endpoints": ["127.0.0.1:9005"], "health": {"interval": 1}},
                },
                {
                    "match": {"path_prefix": "/b/"},
                    "backends": [
                        {"weight": 1, "endpoints": ["127.0.0.1:9006"], "health": {"rise": 1}}
                    ],
                },
            ],
        },
        {
            "host": "db.t.test",
            "mode": "passthrough",
            "proxy_protocol": "v2",
            "source_address": "127.0.0.1",
            "backend": {"endpoints": ["127.0.0.1:5432"]},
        },
    ],
}


def _full_configs() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        ("full-sidecar", "sidecar", FULL_SIDECAR),
        ("vault-sidecar", "sidecar", dict(FULL_SIDECAR, identity=VAULT_IDENTITY)),
        ("k8s-sidecar", "sidecar", dict(FULL_SIDECAR, identity=K8S_IDENTITY)),
        ("full-edge", "edge", FULL_EDGE),
        ("vault-edge", "edge", dict(FULL_EDGE, identity=VAULT_IDENTITY)),
    ]


def _injected(bundle: str | None) -> dict[str, Any]:
    env = {
        e["name"]: e
        for e in sidecar_of(
            inject_object(workload("Deployment"), InjectOptions(ca_bundle_pem=bundle))
        )["env"]
    }
    return yaml.safe_load(
        env[CONFIG_ENV]["value"]
        .replace("$(MESHCAR_POD_NAMESPACE)", "default")
        .replace("$(MESHCAR_POD_SERVICE_ACCOUNT)", "api")
    )


def example_configs() -> list[tuple[str, str, dict[str, Any]]]:
    """(name, kind, config) of every example config in the repository."""
    out = []
    for path in sorted((ROOT / "deploy" / "compose").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        out.append((f"deploy/compose/{path.name}", guess_kind(data), data))
    for doc in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "40-edge.yaml").read_text()):
        if doc and doc.get("kind") == "ConfigMap" and "edge.yaml" in doc.get("data", {}):
            out.append(
                ("deploy/k8s/40-edge.yaml", "edge", yaml.safe_load(doc["data"]["edge.yaml"]))
            )
    paths = DemoPaths(Path("/demo"))
    for service in sc.SCENARIO.services:
        out.append((f"demo:{service.name}", "sidecar", sidecar_config(sc.SCENARIO, service, paths)))
    out.append(("demo:edge", "edge", edge_config(sc.SCENARIO, paths)))
    out.append(("inject", "sidecar", _injected(None)))
    out.append(("inject+pem", "sidecar", _injected(PEM)))
    out.append(("test_sidecar_config.GOOD", "sidecar", yaml.safe_load(test_sidecar_config.GOOD)))
    out.append(("test_edge_config_policy.GOOD", "edge", test_edge_config_policy.GOOD))
    return out + _full_configs()


def _validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema(kind))


@pytest.mark.parametrize("kind", ["sidecar", "edge"])
def test_schema_is_valid_draft_2020_12(kind: str) -> None:
    doc = schema(kind)
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(doc)


def test_examples_are_found() -> None:
    names = [n for n, _, _ in example_configs()]
    assert {
        "deploy/compose/edge.yaml",
        "deploy/compose/web.yaml",
        "deploy/k8s/40-edge.yaml",
        "demo:edge",
        "demo:api",
        "inject",
    } <= set(names)


@pytest.mark.parametrize(
    ("name", "kind", "data"), example_configs(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_example_config_is_valid_for_checker_and_schema(name: str, kind: str, data: dict) -> None:
    PARSE[kind](data, name, Path("/cfg"))  # raises ConfigError with every problem
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in _validator(kind).iter_errors(data)
    ]
    assert not errors, errors


def _objects(
    data: Any, frag: dict[str, Any], path: str, norm: str
) -> Iterator[tuple[Any, str, str, set[str]]]:
    """Every fixed-key section in `data` (walked along the schema): (the mapping, its key path
    as the checker writes it, the path normalised ([] for items, * for named entries), its
    schema keys)."""
    if not isinstance(data, dict) and not isinstance(data, list):
        return
    if isinstance(data, list):
        if "items" in frag:
            for i, item in enumerate(data):
                yield from _objects(item, frag["items"], f"{path}[{i}]", norm + "[]")
        return
    if "properties" in frag:
        yield data, path, norm, set(frag["properties"])
        for k, v in data.items():
            if k in frag["properties"]:
                dot = "." if path else ""
                yield from _objects(v, frag["properties"][k], f"{path}{dot}{k}", f"{norm}{dot}{k}")
    elif isinstance(frag.get("additionalProperties"), dict):
        for k, v in data.items():
            yield from _objects(v, frag["additionalProperties"], f"{path}.{k}", f"{norm}.*")


def _schema_sections(frag: dict[str, Any], norm: str = "") -> set[str]:
    """The normalised paths of every fixed-key section the schema describes."""
    out: set[str] = set()
    if "properties" in frag:
        out.add(norm)
        for k, v in frag["properties"].items():
            out |= _schema_sections(v, f"{norm}{'.' if norm else ''}{k}")
    if "items" in frag:
        out |= _schema_sections(frag["items"], norm + "[]")
    if isinstance(frag.get("additionalProperties"), dict):
        out |= _schema_sections(frag["additionalProperties"], norm + ".*")
    return out


def _located(obj: Any, path: str, root: Any) -> Any:
    """The object at `path` in `root` (a deep copy of the walked data)."""
    cur = root
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        cur = cur[int(part[1:-1])] if part.startswith("[") else cur[part]
    return cur


@pytest.mark.parametrize("kind", ["sidecar", "edge"])
def test_checker_accepts_exactly_the_schema_keys_in_every_section(kind: str) -> None:
    """For each section of the full configs, an unknown key is refused by the checker (with
    file and key path) and by the schema, and the keys the checker lists as expected are
    exactly the schema's keys. Together the full configs reach every section of the schema."""
    doc = schema(kind)
    seen: set[str] = set()
    for name, k, data in _full_configs():
        if k != kind:
            continue
        for obj, path, norm, keys in _objects(data, doc, "", ""):
            seen.add(norm)
            bad = copy.deepcopy(data)
            _located(obj, path, bad)[UNKNOWN] = 1
            where = f"{path}.{UNKNOWN}" if path else UNKNOWN
            with pytest.raises(ConfigError) as exc:
                PARSE[kind](bad, f"{name}.yaml", Path("/cfg"))
            hits = [
                p for p in exc.value.problems if p.startswith(f"{name}.yaml: {where}: unknown key")
            ]
            assert len(hits) == 1, (where, exc.value.problems)
            expected = set(re.search(r"expected one of: (.*)\)$", hits[0]).group(1).split(", "))
            assert expected == keys, (
                f"{norm or '<top>'}: checker {sorted(expected)} != schema {sorted(keys)}"
            )
            errors = list(_validator(kind).iter_errors(bad))
            assert [e.validator for e in errors] == ["additionalProperties"], (where, errors)
            assert ".".join(map(str, errors[0].absolute_path)) == re.sub(r"\[(\d+)\]", r".\1", path)
    assert seen == _schema_sections(doc), (
        f"sections no full config reaches: {sorted(_schema_sections(doc) - seen)}"
    )


def test_deny_header_unknown_key_is_refused() -> None:
    """routes[].deny[].header took any key (a typo such as `patern` was silently ignored)."""
    cfg = copy.deepcopy(test_edge_config_policy.GOOD)
    cfg["routes"][0]["deny"] = [{"header": {"name": "x-a", "pattern": "b", "patern": "c"}}]
    with pytest.raises(ConfigError) as exc:
        parse_edge_config(cfg, "edge.yaml")
    assert any(
        p.startswith("edge.yaml: routes[0].deny[0].header.patern: unknown key")
        for p in exc.value.problems
    ), exc.value.problems


def test_edge_admin_unknown_key_is_refused() -> None:
    cfg = dict(test_edge_config_policy.GOOD, admin={"listen": "127.0.0.1:7204", "lsiten": "x"})
    with pytest.raises(ConfigError) as exc:
        parse_edge_config(cfg, "edge.yaml")
    assert exc.value.problems == [
        "edge.yaml: admin.lsiten: unknown key (expected one of: listen, public_paths)"
    ]


def _meshcar(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshcar.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_schema_and_check(tmp_path: Path) -> None:
    for kind in ("sidecar", "edge"):
        out = _meshcar("config", "schema", kind, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == schema(kind)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(FULL_EDGE))
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            dict(
                FULL_SIDECAR,
                bogus=1,
                app={"port": 0},
                outbound={"upstreams": {"b": {"endpoints": [], "spiffe_id": "x"}}},
            )
        )
    )
    out = _meshcar("config", "check", str(good), str(bad), cwd=tmp_path)
    assert out.returncode == 2
    assert out.stdout == f"{good}: ok (edge config)\n"
    assert sorted(out.stderr.splitlines()) == sorted(
        [
            f"{bad}: bogus: unknown key (expected one of: access_log, admin, app, drain_seconds, "
            "http, identity, "
            "inbound, limits, log_level, outbound, reload, timeouts, workers)",
            f"{bad}: app.port: must be a port number 1-65535, got 0",
            f"{bad}: outbound.upstreams.b.endpoints: must be a non-empty list of HOST:PORT",
            f"{bad}: outbound.upstreams.b.spiffe_id: SPIFFE ID 'x' must start with spiffe://",
        ]
    ), out.stderr
    assert "Traceback" not in out.stderr
    for args, msg in [
        ((str(tmp_path / "missing.yaml"),), "cannot read"),
        ((str(good), "--kind", "sidecar"), "app: missing section"),
    ]:
        out = _meshcar("config", "check", *args, cwd=tmp_path)
        assert out.returncode == 2 and msg in out.stderr and "Traceback" not in out.stderr, (
            out.stderr
        )
    (tmp_path / "notyaml.yaml").write_text("a: [\n")
    out = _meshcar("config", "check", "notyaml.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "notyaml.yaml: not valid YAML" in out.stderr


def _doc_blocks() -> list[tuple[str, str, Any]]:
    out = []
    for doc, kind in (("docs/CONFIG.md", "sidecar"), ("docs/EDGE.md", "edge")):
        text = (ROOT / doc).read_text()
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", text, re.S)):
            block = block.replace("$(MESHCAR_POD_NAMESPACE)", "default").replace(
                "$(MESHCAR_POD_SERVICE_ACCOUNT)", "api"
            )
            out.append((f"{doc}#{i}", kind, yaml.safe_load(block)))
    return out


@pytest.mark.parametrize(
    ("name", "kind", "data"), _doc_blocks(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_doc_examples_are_valid(name: str, kind: str, data: Any) -> None:
    """The YAML examples of docs/CONFIG.md and docs/EDGE.md: against the schema (a fragment
    need not carry the required sections), and through the checker when complete."""
    doc = schema(kind)
    required = doc.pop("required")
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft202012Validator(doc).iter_errors(data)
    ]
    assert not errors, errors
    if all(k in data for k in required):
        PARSE[kind](data, name, Path("/cfg"))


def test_relative_paths_resolve_from_the_config_files_directory(tmp_path: Path) -> None:
    """As docs/CONFIG.md says: from the file's directory, not the working directory."""
    from meshcar.edge.config import load_edge_config
    from meshcar.sidecar.config import load_config

    (tmp_path / "etc").mkdir()
    side = tmp_path / "etc" / "sidecar.yaml"
    side.write_text(yaml.safe_dump(FULL_SIDECAR))
    ident = load_config(side).identity
    assert (ident.ca_bundle, ident.token_file, ident.state_dir) == (
        tmp_path / "etc" / "ca.pem",
        tmp_path / "etc" / "a.token",
        tmp_path / "etc" / "state",
    )
    edge = tmp_path / "etc" / "edge.yaml"
    edge.write_text(yaml.safe_dump(FULL_EDGE))
    route = load_edge_config(edge).routes[0]
    assert (route.cert_file, route.client_auth.ca_file if route.client_auth else None) == (
        tmp_path / "etc" / "site.pem",
        tmp_path / "etc" / "clients.pem",
    )
