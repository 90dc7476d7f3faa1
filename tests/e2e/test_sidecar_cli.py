"""`meshcar sidecar` as a command: bad configuration is reported at once, with file and key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.procs import free_port, meshcar_cmd

pytestmark = pytest.mark.e2e


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        meshcar_cmd(*args),
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_bad_config_lists_every_problem(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("identity: {spiffe_id: nope}\napp: {port: 0}\ninbound: {listen: x}\n")
    r = run("sidecar", "--config", str(f))
    assert r.returncode == 2
    for key in (
        "identity.spiffe_id",
        "identity.ca_url",
        "identity.state_dir",
        "app.port",
        "inbound.listen",
        "admin: missing section",
    ):
        assert f"{f}: {key}" in r.stderr, r.stderr
    assert r.stdout == ""


def test_missing_file_and_env(tmp_path: Path) -> None:
    r = run("sidecar", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "cannot read" in r.stderr
    r = run("sidecar", "--config-env", "MESHCAR_NOT_SET_ANYWHERE")
    assert (
        r.returncode == 2
        and "$MESHCAR_NOT_SET_ANYWHERE: environment variable is not set" in r.stderr
    )


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "s.yaml"
        (tmp_path / "ca.pem").write_text("")  # exists: start-up checks the files first
        cfg.write_text(
            "identity: {spiffe_id: 'spiffe://td/x', ca_url: 'https://127.0.0.1:1', ca_bundle: ca.pem,"
            " state_dir: st}\n"
            f"app: {{port: 1}}\ninbound: {{listen: '127.0.0.1:{free_port()}'}}\n"
            f"admin: {{listen: '127.0.0.1:{port}'}}\n"
        )
        r = run("sidecar", "--config", str(cfg))
    assert r.returncode == 1 and "Address already in use" in r.stderr, r.stderr


def test_unknown_command_and_help() -> None:
    r = run("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr
    r = run("--help")
    assert r.returncode == 0 and "sidecar" in r.stdout and "demo" in r.stdout


def test_edge_bad_config_and_unreadable_certificate(tmp_path: Path) -> None:
    f = tmp_path / "edge.yaml"
    f.write_text("listen: {https: nope}\nroutes: []\n")
    r = run("edge", "--config", str(f))
    assert r.returncode == 2
    for key in ("listen.https", "admin: missing section", "routes: must be a non-empty list"):
        assert key in r.stderr, r.stderr
    f.write_text(
        "listen: {https: '127.0.0.1:1'}\nadmin: {listen: '127.0.0.1:2'}\n"
        "routes: [{host: a.test, mode: terminate, tls: {cert: missing.pem, key: missing.pem},"
        " backend: {endpoints: ['127.0.0.1:3']}}]\n"
    )
    r = run("edge", "--config", str(f))
    assert r.returncode == 2, r.stderr
    # the edge names each missing file by its key, not only the config file (issue 15)
    missing = tmp_path / "missing.pem"
    assert f"{f}: routes[0] (a.test).tls.cert: {missing} does not exist" in r.stderr, r.stderr
    assert f"{f}: routes[0] (a.test).tls.key: {missing} does not exist" in r.stderr, r.stderr
    # present but not a certificate: both files named
    (tmp_path / "missing.pem").write_text("not a certificate\n")
    r = run("edge", "--config", str(f))
    assert r.returncode == 2, r.stderr
    assert (
        f"routes[0] (a.test).tls: certificate {missing} with key {missing} does not load"
        in r.stderr
    ), r.stderr


def test_every_missing_file_is_reported_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        "identity: {spiffe_id: 'spiffe://td/x', ca_url: 'https://127.0.0.1:1', ca_bundle: ca.pem,"
        " token_file: token, state_dir: st}\n"
        f"app: {{port: 1}}\ninbound: {{listen: '127.0.0.1:{free_port()}'}}\n"
        f"admin: {{listen: '127.0.0.1:{free_port()}'}}\n"
    )
    r = run("sidecar", "--config", str(cfg))
    assert r.returncode == 2, r.stderr
    assert f"{cfg}: identity.ca_bundle: {tmp_path / 'ca.pem'} does not exist" in r.stderr
    assert f"{cfg}: identity.token_file: {tmp_path / 'token'} does not exist" in r.stderr
