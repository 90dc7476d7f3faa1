"""Hot reload of a real `meshcar sidecar` process's outbound side (sidecar/outbound.py
`Outbound.reconfigure`): web (`workers: 2`) gets SIGHUP under continuous load through its
outbound; the reload adds an upstream, adds an endpoint to api and moves the `shop` split,
both workers apply it, no request fails, the new upstream answers and the traffic moves (the
demo apps name themselves in their answers); the unchanged upstream's pooled mTLS connection
is reused (no new handshake at its peer); an invalid outbound change is rejected by both
workers with file and key while the old outbound serves; the new upstream's `local_port` is
opened by the reload in both workers and closed by the one that removes it."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import threading
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import Procs, ca_token, free_port, sidecar_identity, wait_until
from tests.e2e.test_reload_sidecar import _reloads
from tests.e2e.test_workers import _ports, ca, sid, sidecar_cfg  # noqa: F401 (fixture)

pytestmark = pytest.mark.e2e


def _get(conn: http.client.HTTPConnection, host: str) -> tuple[int, str | None]:
    """(status, the answering demo app's name) of one keep-alive GET through the outbound."""
    conn.request("GET", f"http://{host}/hello")
    r = conn.getresponse()
    body = r.read()
    try:
        return r.status, json.loads(body).get("service")
    except ValueError:
        return r.status, None


def _handshakes(admin: int) -> float:
    """TLS handshakes a sidecar's inbound completed (full or resumed)."""
    text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10).text
    pat = r'^meshcar_tls_handshakes_total\{[^}]*direction="inbound"[^}]*result="(?:full|resumed)"[^}]*\} (\S+)$'
    return sum(float(v) for v in re.findall(pat, text, re.M))


def _rewrite(path: Path, outbound: dict) -> None:
    cfg = json.loads(path.read_text())
    cfg["outbound"].update(outbound)
    new = path.with_suffix(".new")
    new.write_text(json.dumps(cfg))
    new.replace(path)


def test_outbound_reload_under_load_two_workers(ca, tmp_path: Path, procs: Procs) -> None:  # noqa: ANN001, F811
    d, ca_port = ca
    api, api2, pay, web = _ports(), _ports(), _ports(), _ports()
    api_cfg = sidecar_cfg(d, ca_port, "api", api, {})
    pay_cfg = sidecar_cfg(d, ca_port, "pay", pay, {})
    (d / "api2.token").write_text(ca_token(d / "ca", sid("api")))  # a second api instance
    api2_cfg = d / "api2.yaml"
    raw = json.loads(api_cfg.read_text())
    raw["identity"] = sidecar_identity(d, "api2", sid("api"), ca_port)
    raw["app"] = {"port": api2["app"]}
    raw["inbound"]["listen"] = f"127.0.0.1:{api2['in']}"
    raw["outbound"]["listen"] = f"127.0.0.1:{api2['out']}"
    raw["admin"] = {"listen": f"127.0.0.1:{api2['admin']}"}
    api2_cfg.write_text(json.dumps(raw))

    def up(name: str, *ports: dict[str, int]) -> dict:
        return {"endpoints": [f"127.0.0.1:{p['in']}" for p in ports], "spiffe_id": sid(name)}

    before = {"api": up("api", api), "pay": up("pay", pay)}
    web_cfg = sidecar_cfg(d, ca_port, "web", web, before, workers=2)
    _rewrite(web_cfg, {"splits": {"shop": [{"upstream": "api"}]}})
    for name, ports in (("api", api), ("api2", api2), ("pay", pay)):
        procs.start(f"{name}-app", "demo-app", "--name", name, "--port", str(ports["app"]))
    for name, cfg in (("api", api_cfg), ("api2", api2_cfg), ("pay", pay_cfg)):
        procs.start(name, "sidecar", "--config", str(cfg))
    web_p = procs.start("web", "sidecar", "--config", str(web_cfg))
    for name, ports in (("api", api), ("api2", api2), ("pay", pay), ("web", web)):
        procs.wait_ready(ports["admin"], name)

    # the unchanged upstream: a keep-alive connection to one worker, its pooled mesh conn
    pay_conn = http.client.HTTPConnection("127.0.0.1", web["out"], timeout=10)
    assert [_get(pay_conn, "pay") for _ in range(3)] == [(200, "pay")] * 3
    pay_handshakes = _handshakes(pay["admin"])

    seen: dict[str, list[tuple[int, str | None]]] = {"api": [], "shop": []}
    errors: list[str] = []
    stop = threading.Event()

    def load(host: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", web["out"], timeout=10)
        while not stop.is_set():
            try:
                seen[host].append(_get(conn, host))
            except (OSError, http.client.HTTPException) as exc:
                errors.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", web["out"], timeout=10)
        conn.close()

    threads = [threading.Thread(target=load, args=(h,)) for h in ("api", "api", "shop", "shop")]
    for t in threads:
        t.start()
    wait_until(lambda: len(seen["api"]) >= 30 and len(seen["shop"]) >= 30, "load to run")
    assert {s for _, s in seen["api"] + seen["shop"]} == {"api"}
    assert _get(pay_conn, "api-b")[0] == 502  # not an upstream yet

    # valid: api-b added, api gets a second endpoint, shop moves to api-b; both workers
    fixed = free_port()  # api-b's local_port: a listener opened by the reload
    after = {
        **before,
        "api": up("api", api, api2),
        "api-b": {**up("api", api2), "local_port": fixed},
    }
    _rewrite(web_cfg, {"upstreams": after, "splits": {"shop": [{"upstream": "api-b"}]}})
    web_p.send_signal(signal.SIGHUP)
    wait_until(lambda: _reloads(web["admin"], "success") == {"0": 1, "1": 1}, "both workers")
    st = httpx.get(f"http://127.0.0.1:{web['admin']}/config/status", timeout=5).json()
    assert st["restart_required"] == [], st
    for _ in range(8):  # new connections: both workers (SO_REUSEPORT) route to api-b
        fresh = http.client.HTTPConnection("127.0.0.1", web["out"], timeout=10)
        assert _get(fresh, "api-b") == (200, "api2")
        fresh.close()
        fresh = http.client.HTTPConnection("127.0.0.1", fixed, timeout=10)  # its fixed port
        fresh.request("GET", "/hello")
        r = fresh.getresponse()
        assert (r.status, json.loads(r.read())["service"]) == (200, "api2")
        fresh.close()
    at_api, at_shop = len(seen["api"]), len(seen["shop"])
    wait_until(
        lambda: (
            ("api2" in {s for _, s in seen["api"][at_api:]}) and len(seen["shop"]) >= at_shop + 30
        ),
        "api's new endpoint and shop's new backend to take traffic",
    )
    assert {s for _, s in seen["shop"][at_shop + 4 :]} == {"api2"}  # past the 4 in flight
    assert _get(pay_conn, "pay") == (200, "pay")
    assert _handshakes(pay["admin"]) == pay_handshakes  # the pooled connection was reused

    # invalid: rejected by both workers with file and key; the old outbound serves
    bad = {**after, "api-b": {"endpoints": ["127.0.0.1:notaport"], "spiffe_id": sid("api")}}
    _rewrite(web_cfg, {"upstreams": bad})
    web_p.send_signal(signal.SIGHUP)
    wait_until(lambda: _reloads(web["admin"], "failure") == {"0": 1, "1": 1}, "both rejected")
    st = httpx.get(f"http://127.0.0.1:{web['admin']}/config/status", timeout=5).json()
    error = st["last_reload"]["error"]
    assert str(web_cfg) in error and "outbound.upstreams.api-b.endpoints" in error, st
    assert _get(pay_conn, "api-b") == (200, "api2")
    at = len(seen["shop"])
    wait_until(lambda: len(seen["shop"]) >= at + 30, "load to go on")
    stop.set()
    for t in threads:
        t.join(timeout=30)
    pay_conn.close()
    statuses = {s for s, _ in seen["api"] + seen["shop"]}
    assert errors == [] and statuses == {200}, (errors[:3], statuses)

    # api-b removed: both workers close its fixed port
    _rewrite(web_cfg, {"upstreams": before, "splits": {"shop": [{"upstream": "api"}]}})
    web_p.send_signal(signal.SIGHUP)
    wait_until(lambda: _reloads(web["admin"], "success") == {"0": 2, "1": 2}, "both removed")
    for _ in range(8):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", fixed), timeout=5).close()

    # a local_port in use: the reload applies the rest and names the port
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = taken.getsockname()[1]
        _rewrite(web_cfg, {"upstreams": {**after, "api-b": {**after["api-b"], "local_port": busy}}})
        web_p.send_signal(signal.SIGHUP)
        wait_until(lambda: _reloads(web["admin"], "success") == {"0": 3, "1": 3}, "both applied")
        st = httpx.get(f"http://127.0.0.1:{web['admin']}/config/status", timeout=5).json()
        assert st["restart_required"] == ["outbound.upstreams.api-b.local_port"], st
        wait_until(lambda: "sidecar.config.listen_failed" in procs.log("web"), "the log line")
        conn = http.client.HTTPConnection("127.0.0.1", web["out"], timeout=10)
        assert _get(conn, "api-b") == (200, "api2")
        conn.close()
