"""End to end: a real CA and two real sidecars as processes; curl and openssl as clients."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.procs import Procs, free_port, meshcar_cmd

pytestmark = pytest.mark.e2e
TD = "meshcar.demo"


def sid(n: str) -> str:
    return f"spiffe://{TD}/svc/{n}"


@dataclass
class Pair:
    dir: Path
    procs: Procs
    ports: dict[str, int]


def _token(ca_dir: Path, name: str) -> str:
    out = subprocess.run(
        meshcar_cmd("ca", "token", "--dir", str(ca_dir), "--spiffe-id", sid(name)),
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def _sidecar_cfg(
    d: Path, name: str, ports: dict[str, int], allow: list[str], upstreams: dict
) -> Path:
    cfg = {
        "identity": {
            "spiffe_id": sid(name),
            "ca_url": f"https://127.0.0.1:{ports['ca']}",
            "ca_bundle": str(d / "ca" / "root.pem"),
            "token_file": str(d / f"{name}.token"),
            "state_dir": str(d / f"{name}-state"),
        },
        "app": {"port": ports[f"{name}_app"]},
        "inbound": {"listen": f"127.0.0.1:{ports[f'{name}_in']}", "allow": allow},
        "outbound": {"listen": f"127.0.0.1:{ports[f'{name}_out']}", "upstreams": upstreams},
        "admin": {"listen": f"127.0.0.1:{ports[f'{name}_admin']}"},
    }
    path = d / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def init_pair_dir(d: Path) -> dict[str, int]:
    """A CA initialised in d/ca and a join token file per sidecar; returns the ports to use."""
    names = ["ca"] + [f"{n}_{k}" for n in ("web", "api") for k in ("app", "in", "out", "admin")]
    ports = {n: free_port() for n in names}
    subprocess.run(
        meshcar_cmd("ca", "init", "--dir", str(d / "ca"), "--trust-domain", TD),
        check=True,
        capture_output=True,
    )
    for n in ("web", "api"):
        (d / f"{n}.token").write_text(_token(d / "ca", n))
    return ports


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Pair:
    d = tmp_path_factory.mktemp("pair")
    ports = init_pair_dir(d)
    procs = Procs(d)
    try:
        procs.start(
            "ca", "ca", "serve", "--dir", str(d / "ca"), "--listen", f"127.0.0.1:{ports['ca']}"
        )
        procs.wait_http(
            f"https://127.0.0.1:{ports['ca']}/healthz", verify=str(d / "ca" / "root.pem"), name="ca"
        )
        api_cfg = _sidecar_cfg(d, "api", ports, [sid("web")], {})
        web_cfg = _sidecar_cfg(
            d,
            "web",
            ports,
            [],
            {"api": {"endpoints": [f"127.0.0.1:{ports['api_in']}"], "spiffe_id": sid("api")}},
        )
        procs.start("api-app", "demo-app", "--name", "api", "--port", str(ports["api_app"]))
        procs.start("api-sidecar", "sidecar", "--config", str(api_cfg))
        procs.start("web-sidecar", "sidecar", "--config", str(web_cfg))
        for n in ("api", "web"):
            procs.wait_http(f"http://127.0.0.1:{ports[f'{n}_admin']}/ready", name=f"{n}-sidecar")
        yield Pair(d, procs, ports)
    finally:
        procs.stop_all()


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True
    )


def test_curl_through_the_outbound_proxy(pair: Pair) -> None:
    r = curl(
        "-x",
        f"http://127.0.0.1:{pair.ports['web_out']}",
        "-H",
        "X-Forwarded-Client-Cert: URI=spiffe://meshcar.demo/svc/root",
        "http://api/v1/hello",
    )
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["service"] == "api" and body["path"] == "/v1/hello"
    xfcc = [h for h in body["headers"] if h.lower().startswith("x-forwarded-client-cert:")]
    assert len(xfcc) == 1 and xfcc[0].endswith(f"URI={sid('web')}"), xfcc
    assert f"By={sid('api')}" in xfcc[0]


def test_unknown_service_is_refused(pair: Pair) -> None:
    r = curl(
        "-x",
        f"http://127.0.0.1:{pair.ports['web_out']}",
        "-w",
        "%{http_code}",
        "http://example.org/",
    )
    assert r.stdout.endswith("502") and "unknown service" in r.stdout


def test_openssl_shows_the_mesh_certificate_and_needs_a_client_cert(pair: Pair) -> None:
    port = pair.ports["api_in"]
    bundle = pair.dir / "ca" / "bundle.pem"
    # without a client certificate: TLS 1.3 finishes the client side, then the server refuses
    r = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-CAfile",
            str(bundle),
            "-showcerts",
            "-ign_eof",
        ],
        input="GET / HTTP/1.1\r\nHost: api\r\n\r\n",
        capture_output=True,
        text=True,
        timeout=20,
    )
    text = r.stdout + r.stderr
    assert "Protocol  : TLSv1.3" in text or "TLSv1.3" in text
    # the server aborts the connection (alert or reset) and never answers the request
    assert "certificate required" in text, text
    assert "HTTP/1.1" not in r.stdout
    # the certificate shown is the mesh SVID
    pem = text[
        text.index("-----BEGIN CERTIFICATE-----") : text.index("-----END CERTIFICATE-----") + 25
    ]
    shown = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName"],
        input=pem,
        capture_output=True,
        text=True,
    )
    assert f"URI:{sid('api')}" in shown.stdout
    # with web's certificate it works
    state = pair.dir / "web-state"
    r = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-CAfile",
            str(bundle),
            "-cert",
            str(state / "chain.pem"),
            "-cert_chain",
            str(state / "chain.pem"),
            "-key",
            str(state / "key.pem"),
            "-quiet",
        ],
        input="GET /x HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert "HTTP/1.1 200" in r.stdout, r.stdout + r.stderr


def test_admin_endpoints(pair: Pair) -> None:
    admin = f"http://127.0.0.1:{pair.ports['api_admin']}"
    certs = json.loads(curl(f"{admin}/certs").stdout)
    assert certs["spiffe_id"] == sid("api") and certs["serial"]
    metrics = curl(f"{admin}/metrics").stdout
    assert "meshcar_requests_total" in metrics
    assert "meshcar_certificate_not_after_seconds" in metrics
    assert "meshcar_tls_handshakes_total" in metrics
    assert json.loads(curl(f"{admin}/live").stdout) == {"live": True}


def test_keys_are_private(pair: Pair) -> None:
    state = pair.dir / "api-state"
    assert state.stat().st_mode & 0o777 == 0o700
    assert (state / "key.pem").stat().st_mode & 0o777 == 0o600


def test_access_log_is_json_lines(pair: Pair) -> None:
    import time

    curl("-x", f"http://127.0.0.1:{pair.ports['web_out']}", "http://api/logged")
    deadline = time.monotonic() + 5  # the line is written just after the response is sent
    reqs: list[dict] = []
    while not reqs and time.monotonic() < deadline:
        lines = [
            json.loads(x) for x in pair.procs.log("api-sidecar").splitlines() if x.startswith("{")
        ]
        reqs = [x for x in lines if x.get("type") == "request" and x.get("path") == "/logged"]
    assert reqs and reqs[-1]["direction"] == "inbound" and reqs[-1]["peer"] == sid("web")
    assert reqs[-1]["status"] == 200 and "duration_ms" in reqs[-1]


def test_cert_show_and_renew_without_dropping_pooled_connections(pair: Pair) -> None:
    admin = f"127.0.0.1:{pair.ports['web_admin']}"
    proxy = f"http://127.0.0.1:{pair.ports['web_out']}"
    assert curl("-x", proxy, "http://api/before").returncode == 0
    shown = subprocess.run(
        meshcar_cmd("cert", "show", "--admin", admin), capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    before = json.loads(shown.stdout)
    assert before["spiffe_id"] == sid("web") and before["next_renewal"]
    renewed = subprocess.run(
        meshcar_cmd("cert", "renew", "--admin", admin), capture_output=True, text=True
    )
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    after = json.loads(renewed.stdout)
    assert after["renewed"] and after["serial"] != before["serial"]
    assert after["previous_serial"] == before["serial"]
    # renewal was authenticated by the current certificate: the join token was single-use
    r = curl("-x", proxy, "-w", "%{http_code}", "-o", "/dev/null", "http://api/after")
    assert r.stdout == "200"
    metrics = curl(f"http://{admin}/metrics").stdout
    assert 'meshcar_certificate_renewals_total{result="success"}' in metrics


def test_cert_cli_reports_unreachable_admin() -> None:
    r = subprocess.run(
        meshcar_cmd("cert", "show", "--admin", "127.0.0.1:1"), capture_output=True, text=True
    )
    assert r.returncode == 1 and "cannot reach the admin API" in r.stderr


def test_post_shutdown_drains_and_exits(tmp_path: Path) -> None:
    """The native-sidecar case: the app (or a preStop hook) asks the sidecar to stop."""
    import httpx

    ports = {n: free_port() for n in ["ca", "api_app", "api_in", "api_out", "api_admin"]}
    subprocess.run(
        meshcar_cmd("ca", "init", "--dir", str(tmp_path / "ca"), "--trust-domain", TD),
        check=True,
        capture_output=True,
    )
    (tmp_path / "api.token").write_text(_token(tmp_path / "ca", "api"))
    procs = Procs(tmp_path)
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
            f"https://127.0.0.1:{ports['ca']}/healthz", verify=str(tmp_path / "ca" / "root.pem")
        )
        side = procs.start(
            "api", "sidecar", "--config", str(_sidecar_cfg(tmp_path, "api", ports, [], {}))
        )
        admin = f"http://127.0.0.1:{ports['api_admin']}"
        procs.wait_http(f"{admin}/ready")
        r = httpx.post(f"{admin}/shutdown")
        assert r.status_code == 202 and r.json() == {"shutting_down": True}
        assert side.wait(timeout=20) == 0
        assert '"event": "sidecar.draining"' in procs.log("api")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{admin}/live")
    finally:
        procs.stop_all()
