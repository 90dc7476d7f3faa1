"""What `meshcar sidecar` loads for a join-token identity (issue 12: memory).

hvac/requests (Vault), PyYAML (config loading only) and the demo/inject/edge commands are
not imported by the sidecar's entry and its config-dependent setup; a real sidecar that
bootstrapped from the built-in CA and served has not loaded httpx or the rest of
`RUNNING_NOT_LOADED` either. Nothing here is timed; the RSS figures are in
docs/PERFORMANCE.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.procs import Procs
from tests.e2e.test_sidecar_e2e import _sidecar_cfg, init_pair_dir

pytestmark = pytest.mark.e2e

NOT_LOADED = (
    "hvac",
    "requests",
    "urllib3",
    "httpx",
    "httpcore",
    "kubernetes",
    "yaml",
    "meshcar.demo",
    "meshcar.inject",
    "meshcar.edge",
    "meshcar.identity.vaultclient",
    "meshcar.admin.certcli",
    "meshcar.configcli",
    "meshcar_ca",
    "h2",  # HTTP/2: imported when the first HTTP/2 connection arrives (docs/PROTOCOLS.md)
    "hpack",
    "hyperframe",
    "meshcar.net.h2conn",
    "meshcar.common.h2proxy",
)

# What `meshcar sidecar --config F` runs before serving: the CLI dispatch, the command's module,
# then the config-dependent part (the issuer the identity names). The config loader imports
# yaml (it stays in sys.modules, ~1.7 MB), so only the import step is checked for it.
PROG = """
import json, sys
from pathlib import Path
import meshcar.cli, importlib
mod = importlib.import_module(meshcar.cli.COMMANDS["sidecar"][0])
after_import = sorted(sys.modules)
from meshcar.sidecar.config import load_config
from meshcar.common.issuer import issuer_for
cfg = load_config(Path(sys.argv[1]))
issuer_for(cfg.identity)
print(json.dumps({"import": after_import, "configured": sorted(sys.modules)}))
"""


def _loaded(mods: list[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in mods)


def _cfg(tmp_path: Path, identity: dict) -> Path:
    cfg = {
        "identity": {
            "spiffe_id": "spiffe://td/svc/a",
            "state_dir": str(tmp_path / "st"),
            **identity,
        },
        "app": {"port": 1},
        "inbound": {"listen": "127.0.0.1:1"},
        "outbound": {"listen": "127.0.0.1:2", "upstreams": {}},
        "admin": {"listen": "127.0.0.1:3"},
    }
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _modules(cfg: Path) -> dict[str, list[str]]:
    r = subprocess.run(
        [sys.executable, "-c", PROG, str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_join_token_sidecar_imports_no_vault_httpx_yaml_or_other_commands(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("")
    (tmp_path / "t").write_text("tok")
    mods = _modules(
        _cfg(
            tmp_path,
            {
                "ca_url": "https://127.0.0.1:1",
                "ca_bundle": str(tmp_path / "ca.pem"),
                "token_file": str(tmp_path / "t"),
            },
        )
    )
    present = [n for n in NOT_LOADED if _loaded(mods["import"], n)]
    assert not present, f"importing the sidecar command loads {present}"
    configured = [n for n in NOT_LOADED if n != "yaml" and _loaded(mods["configured"], n)]
    assert not configured, f"a join-token identity loads {configured}"
    for needed in (
        "trio",
        "prometheus_client",
        "meshcar.sidecar.inbound",
        "meshcar.identity.caclient",
    ):
        assert _loaded(mods["configured"], needed), needed


def test_k8s_token_sidecar_imports_no_vault_httpx_or_jwt(tmp_path: Path) -> None:
    """The Kubernetes path is a token file read at bootstrap: no JWT library, no httpx."""
    (tmp_path / "ca.pem").write_text("")
    (tmp_path / "sa").write_text("header.payload.sig")
    mods = _modules(
        _cfg(
            tmp_path,
            {
                "ca_url": "https://127.0.0.1:1",
                "ca_bundle": str(tmp_path / "ca.pem"),
                "k8s_token_file": str(tmp_path / "sa"),
            },
        )
    )
    configured = [n for n in (*NOT_LOADED, "jwt") if n != "yaml" and _loaded(mods["configured"], n)]
    assert not configured, f"a Kubernetes-token identity loads {configured}"
    assert _loaded(mods["configured"], "meshcar.identity.httpsclient")


def test_vault_identity_still_loads_hvac(tmp_path: Path) -> None:
    """The lazy import is taken when Vault is configured (and only then)."""
    (tmp_path / "tok").write_text("x")
    mods = _modules(
        _cfg(
            tmp_path,
            {
                "vault": {
                    "addr": "https://127.0.0.1:1",
                    "role": "r",
                    "token_file": str(tmp_path / "tok"),
                }
            },
        )
    )
    assert not _loaded(mods["import"], "hvac")
    assert _loaded(mods["configured"], "hvac") and _loaded(
        mods["configured"], "meshcar.identity.vaultclient"
    )


# A running sidecar with the built-in CA issuer, after bootstrap and a request through the
# pair: the CA client speaks HTTPS itself (identity/httpsclient.py), so nothing of httpx.
RUNNING_NOT_LOADED = (
    *(n for n in NOT_LOADED if n != "yaml"),
    "anyio",
    "h11",
    "certifi",
    "http.cookiejar",
)

# `meshcar ...` that writes sys.modules as it exits (after SIGTERM and the drain, so a superset
# of what the idle sidecar had loaded)
RUN = """
import atexit, json, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
runpy.run_module("meshcar.cli", run_name="__main__", alter_sys=True)
"""


def test_running_join_token_sidecar_has_not_loaded_httpx_or_vault(tmp_path: Path) -> None:
    ports = init_pair_dir(tmp_path)
    procs = Procs(tmp_path)
    mods_file = tmp_path / "modules.json"
    try:
        procs.start(
            "ca",
            "ca",
            "serve",
            "--dir",
            str(tmp_path / "ca"),
            "--listen",
            f"127.0.0.1:{ports['ca']}",
        )
        procs.wait_http(
            f"https://127.0.0.1:{ports['ca']}/healthz",
            verify=str(tmp_path / "ca" / "root.pem"),
            name="ca",
        )
        cfg = _sidecar_cfg(tmp_path, "web", ports, [], {})
        log = open(tmp_path / "web-sidecar.log", "wb")
        side = subprocess.Popen(
            [sys.executable, "-c", RUN, str(mods_file), "sidecar", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # as Procs.start: stop_all signals its process group
        )
        log.close()
        procs.procs.append(("web-sidecar", side))
        procs.wait_http(f"http://127.0.0.1:{ports['web_admin']}/ready", name="web-sidecar")
        procs.wait_http(f"http://127.0.0.1:{ports['web_admin']}/metrics", name="web-sidecar")
        side.terminate()
        assert side.wait(timeout=30) == 0, procs.log("web-sidecar")[-3000:]
    finally:
        procs.stop_all()
    mods = json.loads(mods_file.read_text())
    present = [n for n in RUNNING_NOT_LOADED if _loaded(mods, n)]
    assert not present, f"a running join-token sidecar loaded {present}"
    for needed in ("trio", "httptools", "meshcar.identity.httpsclient", "meshcar.sidecar.inbound"):
        assert _loaded(mods, needed), needed
