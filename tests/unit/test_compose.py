"""docker-compose.yml, deploy/compose/*.yaml and deploy/docker/Dockerfile: valid against the
Compose Specification schema (vendored, offline) and the same scenario as meshcar/demo/scenario.py."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from meshcar.demo import scenario as sc
from meshcar.demo.plan import DemoPaths, app_args, sidecar_config
from meshcar.sidecar.config import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "tests" / "fixtures" / "compose-spec.json"
SCHEMA_SHA256 = "56bab44c85c0ce8affb74474950293f37d510673283a243bcd7eeadb900fa35c"
SECRETS = "/var/lib/meshcar/secrets"
SERVICES = sc.SCENARIO.services


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def test_schema_is_the_vendored_one() -> None:
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256


def test_compose_file_validates(compose: dict[str, Any]) -> None:
    errors = [f"{list(e.path)}: {e.message}" for e in validator().iter_errors(compose)]
    assert errors == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("services", "web-sidecar", "netwrk_mode"), "service:web"),
        (("services", "web-app", "depends_on", "web-sidecar", "condition"), "service_ready"),
        (("services", "ca", "healthcheck", "retries"), "many"),
    ],
)
def test_schema_catches_mistakes(
    compose: dict[str, Any], path: tuple[str, ...], value: Any
) -> None:
    doc = json.loads(json.dumps(compose))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert list(validator().iter_errors(doc))


def expected_sidecar_config(service: sc.Service) -> dict[str, Any]:
    """The demo's config for this service (meshcar/demo/plan.py) moved into containers:
    peers by compose DNS name, the mesh listener on the namespace's address, files in the
    per-service secrets volume."""
    cfg = sidecar_config(sc.SCENARIO, service, DemoPaths(Path("/unused")))
    cfg["identity"].update(
        ca_url=f"https://ca:{sc.CA_PORT}",
        ca_bundle=f"{SECRETS}/ca-root.pem",
        token_file=f"{SECRETS}/join.token",
        state_dir="/tmp/meshcar/state",
    )
    cfg["inbound"]["listen"] = f"0.0.0.0:{service.inbound_port}"
    for up in cfg["outbound"]["upstreams"].values():
        peer = up["spiffe_id"].rsplit("/", 1)[1]  # payments-db (opaque TCP) is payments too
        up["endpoints"] = [f"{peer}:{sc.SCENARIO.service(peer).inbound_port}"]
    return cfg


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
def test_sidecar_configs_are_the_scenario(service: sc.Service) -> None:
    path = ROOT / "deploy" / "compose" / f"{service.name}.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert cfg == expected_sidecar_config(service)
    # and the sidecar's own loader accepts it
    loaded = load_config(path)
    assert loaded.identity.spiffe_id == service.spiffe_id


def _ids(names: tuple[str, ...]) -> list[str]:
    return [sc.spiffe_id(n) for n in names]


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
def test_pod_of_three(compose: dict[str, Any], service: sc.Service) -> None:
    services = compose["services"]
    name = service.name
    holder, side, app = services[name], services[f"{name}-sidecar"], services[f"{name}-app"]
    assert "network_mode" not in holder  # it owns the namespace and the DNS name
    assert side["network_mode"] == f"service:{name}" and app["network_mode"] == f"service:{name}"
    assert f"./deploy/compose/{name}.yaml:/etc/meshcar/sidecar.yaml:ro" in side["volumes"]
    assert side["command"] == ["sidecar", "--config", "/etc/meshcar/sidecar.yaml"]
    assert f"{name}-secrets:{SECRETS}:ro" in side["volumes"]
    hc = " ".join(side["healthcheck"]["test"])
    assert f"http://127.0.0.1:{service.admin_port}/ready" in hc
    assert side["depends_on"]["ca"]["condition"] == "service_healthy"
    assert app["depends_on"] == {f"{name}-sidecar": {"condition": "service_healthy"}}
    cmd = app["command"]
    assert cmd[:5] == ["demo-app", "--name", name, "--port", str(service.app_port)]
    # then --host, then what `meshcar demo` passes too: --h2c, --ledger-port, --db (issue 13)
    assert cmd[5] == "--host" and cmd[7:] == list(app_args(service))[6:]
    proxy = f"http://127.0.0.1:{service.outbound_port}"
    assert app["environment"]["HTTP_PROXY"] == app["environment"]["http_proxy"] == proxy


def test_only_scenario_services_and_tokens(compose: dict[str, Any]) -> None:
    names = {s.name for s in SERVICES}
    expected = {"init", "ca", "edge", "payments-public"}
    for n in names:
        expected |= {n, f"{n}-sidecar", f"{n}-app"}
    assert set(compose["services"]) == expected
    script = compose["services"]["init"]["command"][0]
    loop = re.search(r"for s in ([a-z ]+); do\n\s*meshcar ca token", script)
    assert loop and set(loop.group(1).split()) == names | {"edge"}
    assert '--spiffe-id "spiffe://meshcar.demo/svc/$$s"' in script
    assert sc.TRUST_DOMAIN in script and "--uses 1" in script
    ca = compose["services"]["ca"]
    assert ca["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert (
        f"0.0.0.0:{sc.CA_PORT}" in ca["command"] and "ca-state:/var/lib/meshcar/ca" in ca["volumes"]
    )
    assert "ca-state" in compose["volumes"]


def test_payments_public_endpoint(compose: dict[str, Any]) -> None:
    pay = sc.SCENARIO.service("payments")
    pub = compose["services"]["payments-public"]
    assert pub["network_mode"] == "service:payments"
    assert (
        f"--port={pay.public_tls_port}" in pub["command"] and "--proxy-protocol" in pub["command"]
    )


def test_edge_is_the_scenario(compose: dict[str, Any]) -> None:
    edge = compose["services"]["edge"]
    assert set(edge["ports"]) == {
        f"127.0.0.1:{sc.EDGE_HTTPS_PORT}:{sc.EDGE_HTTPS_PORT}",
        f"127.0.0.1:{sc.EDGE_HTTP_PORT}:{sc.EDGE_HTTP_PORT}",
    }
    assert f"http://127.0.0.1:{sc.EDGE_ADMIN_PORT}/ready" in " ".join(edge["healthcheck"]["test"])
    from tests.support.edge_scenario import assert_edge_is_the_scenario

    raw = yaml.safe_load((ROOT / "deploy" / "compose" / "edge.yaml").read_text())
    assert raw["admin"]["listen"] == f"127.0.0.1:{sc.EDGE_ADMIN_PORT}"
    assert_edge_is_the_scenario(raw, host=lambda name: name, spiffe=sc.spiffe_id)
    for r in sc.SCENARIO.edge_routes:
        if r.mode == "bridge":
            assert sc.spiffe_id("edge") in _ids(sc.SCENARIO.service(r.backend).allowed_callers)


def test_dockerfile() -> None:
    text = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(stages) >= 2 and all(s.startswith("python:3.11-slim") for s in stages)
    final = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER\s+10001", final, re.M)
    assert 'ENTRYPOINT ["meshcar"]' in final
    assert "COPY --from=build /opt/meshcar /opt/meshcar" in final
    assert not re.search(r"gcc|build-essential", final)
    # the one package the final stage adds: iptables, for `meshcar init-iptables` (issue 16)
    installs = re.findall(r"apt-get install -y --no-install-recommends (.*?) \\", final)
    assert installs == ["iptables"]
    assert re.search(r"^ && iptables --version$", final, re.M)
    # no `# syntax=` line: it makes BuildKit pull a frontend image (issue 16)
    assert not re.search(r"^#\s*syntax=", text, re.M)
    # the ignore file at the context root (read by every builder) lets in what COPY uses
    ignore = {line.rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for src in re.findall(r"^COPY (?!--from)(.*) \S+$", text, re.M):
        for part in src.split():
            assert f"!{part.rstrip('/')}" in ignore, part
    assert not (ROOT / "deploy" / "docker" / "Dockerfile.dockerignore").exists()
    assert "pip uninstall --yes pip setuptools wheel" in text
    # bytecode compiled at build time for the venv and the base image's stdlib (issue 12: a
    # sidecar that compiles its modules at start-up holds ~2 MB more, docs/PERFORMANCE.md)
    assert "__pycache__" not in re.sub(r"#.*", "", text), "compiled bytecode is kept"
    assert re.search(r"/opt/meshcar/bin/python -m compileall .* /opt/meshcar$", text, re.M)
    assert re.search(r"^RUN python -m compileall .*stdlib", final, re.M)


def test_every_package_is_installed() -> None:
    """The image installs with `pip install .` (not editable): a package missing from
    pyproject's list is absent there (meshcar.edge.routes was: the edge container failed with
    ModuleNotFoundError, seen by tests/e2e/test_compose_containers.py; issue 16)."""
    import tomllib

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {v: k for k, v in conf.get("package-dir", {}).items()}
    listed = set(conf["packages"])
    found = set()
    for top in ("meshcar", "ca", "meshcar_spiffe", "meshcar_tlsprofile", "meshcar_x509"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            found.add(".".join((dirs.get(rel[0], rel[0]), *rel[1:])))
    assert found - listed == set()
