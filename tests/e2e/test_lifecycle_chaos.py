"""The whole certificate lifecycle under traffic, with real processes (issue 9's chaos test).

Processes: the built-in CA (`meshcar ca serve`), api's demo app, the api sidecar (inbound),
the web sidecar (outbound proxy to api) and an edge with a bridge route to api's inbound.
Certificates live `TTL` = 20 s (+10 s backdating by the CA); both pools (web's outbound,
the edge's bridge backends) close idle connections after `IDLE` = 2 s.

Traffic (threads, real clients, every request recorded with wall-clock start and end):

- keep-alive: one httpx client through web's outbound proxy, one to the edge's bridge route;
- fresh: a new TCP connection per request to web's outbound proxy, a new TLS connection per
  request to the edge;
- a rhythm, over the whole run: 2 s of the above, a burst (6 + 6 concurrent new
  connections), an idle gap of IDLE + 1 s in which nothing is sent (every pooled connection
  is then past its idle timeout), another burst right after it.

Scenario, each step advanced on observable events (serials, /certs, `ca status`):
forced renewals (`meshcar cert renew`, web then api); a full root rotation (stage 1 is the
bundle change: the new root joins the bundle; stages 2 and 3 as `ca status` allows); a CA
outage of 11 s (shorter than the lifetime; it starts when every process has just renewed, so
their next renewals, 8-12 s later, fail in it); a CA outage longer than the lifetime (every
certificate expires; the CA returns; every process re-bootstraps with its join token,
which was minted with several uses as the re-bootstrap credential).

Asserted: no process exits; no request fails except, on each path (web -> api, edge -> api),
inside the window in which no valid certificate could exist: from the earliest notAfter of
that path's certificates during the long outage until the later of their first re-issues
after the CA returned (observed by polling /certs every 0.1 s; +/- 1 s for notAfter's whole
seconds and the polling); every process is ready again afterwards and a full rhythm cycle
after recovery is clean. docs/ROTATION.md records a run.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trustme
from cryptography import x509

from tests.e2e.procs import Procs, free_port, meshcar_cmd
from tests.e2e.test_rotation_soak import (
    TD,
    Mesh,
    _read_all,
    _report,
    run_root_rotation,
    sid,
    sidecar_config,
    wait_until,
)

pytestmark = pytest.mark.e2e
TTL = 20
IDLE = 2.0
NAMES = ("web", "api", "edge")
PATHS = {"mesh": ("web", "api"), "edge": ("edge", "api")}


def _roots(bundle: Path) -> set[int]:
    return {c.serial_number for c in x509.load_pem_x509_certificates(bundle.read_bytes())}


def _ts(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


@dataclass
class Rec:
    t0: float
    t1: float
    path: str  # "mesh" or "edge"
    stream: str
    ok: bool
    detail: str = ""


@dataclass
class Traffic:
    mesh: Mesh
    edge_ctx: ssl.SSLContext
    records: list[Rec] = field(default_factory=list)
    cycles: int = 0
    _go: threading.Event = field(default_factory=threading.Event)  # cleared for idle gaps
    _stop: threading.Event = field(default_factory=threading.Event)
    _busy: dict[str, bool] = field(default_factory=dict)
    _gap: threading.Lock = field(default_factory=threading.Lock)  # one idle gap at a time
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Traffic:
        self._go.set()
        for f in (
            self._mesh_keepalive,
            self._edge_keepalive,
            self._mesh_fresh,
            self._edge_fresh,
            self._rhythm,
        ):
            t = threading.Thread(target=self._guard, args=(f,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._go.set()
        for t in self._threads:
            t.join(timeout=60)

    def _guard(self, f) -> None:
        try:
            f()
        except BaseException as exc:  # a crashed stream must fail the test
            self.records.append(
                Rec(time.time(), time.time(), "mesh", f.__name__, False, f"crashed: {exc!r}")
            )

    # -- one request of each kind ------------------------------------------------------------

    def _record(self, path: str, stream: str, fn) -> None:
        t0 = time.time()
        try:
            status, body = fn()
            ok = status == 200 and b'"service": "api"' in body
            detail = "" if ok else f"{status} {body[:160]!r}"
        except (OSError, ssl.SSLError, httpx.HTTPError) as exc:
            ok, detail = False, repr(exc)
        self.records.append(Rec(t0, time.time(), path, stream, ok, detail))

    def mesh_fresh_once(self, stream: str, n: int) -> None:
        def go() -> tuple[int, bytes]:
            with socket.create_connection(
                ("127.0.0.1", self.mesh.ports["web_out"]), timeout=10
            ) as s:
                s.sendall(
                    f"GET http://api/{stream}/{n} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n".encode()
                )
                data = _read_all(s)
            return (int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0), data

        self._record("mesh", stream, go)

    def edge_fresh_once(self, stream: str, n: int) -> None:
        def go() -> tuple[int, bytes]:
            with (
                socket.create_connection(
                    ("127.0.0.1", self.mesh.ports["edge_https"]), timeout=10
                ) as raw,
                self.edge_ctx.wrap_socket(raw, server_hostname="api.test") as s,
            ):
                s.sendall(
                    f"GET /{stream}/{n} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n".encode()
                )
                data = _read_all(s)
            return (int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0), data

        self._record("edge", stream, go)

    # -- the streams -------------------------------------------------------------------------

    def _loop(self, name: str, once) -> None:
        n = 0
        while not self._stop.is_set():
            self._busy[name] = True  # before looking at _go: idle_gap clears _go, then reads this
            if not self._go.is_set():
                self._busy[name] = False
                self._go.wait()
                continue
            n += 1
            once(n)
            self._busy[name] = False
            self._stop.wait(0.02)

    def _mesh_keepalive(self) -> None:
        with httpx.Client(proxy=f"http://127.0.0.1:{self.mesh.ports['web_out']}", timeout=10) as c:

            def once(n: int) -> None:
                self._record(
                    "mesh",
                    "keepalive",
                    lambda: (lambda r: (r.status_code, r.content))(
                        c.get(f"http://api/keepalive/{n}")
                    ),
                )

            self._loop("mesh_keepalive", once)

    def _edge_keepalive(self) -> None:
        with httpx.Client(verify=self.edge_ctx, timeout=10) as c:
            url = f"https://127.0.0.1:{self.mesh.ports['edge_https']}/keepalive/"

            def once(n: int) -> None:
                self._record(
                    "edge",
                    "keepalive",
                    lambda: (lambda r: (r.status_code, r.content))(
                        c.get(
                            f"{url}{n}",
                            headers={"Host": "api.test"},
                            extensions={"sni_hostname": "api.test"},
                        )
                    ),
                )

            self._loop("edge_keepalive", once)

    def _mesh_fresh(self) -> None:
        self._loop("mesh_fresh", lambda n: self.mesh_fresh_once("fresh", n))

    def _edge_fresh(self) -> None:
        self._loop("edge_fresh", lambda n: self.edge_fresh_once("fresh", n))

    def burst(self, n: int = 6) -> None:
        with ThreadPoolExecutor(2 * n) as ex:
            for i in range(n):
                ex.submit(self.mesh_fresh_once, "burst", i)
                ex.submit(self.edge_fresh_once, "burst", i)

    def idle_gap(self) -> None:
        """Nothing is sent for IDLE + 1 s: every pooled connection is then past its idle
        timeout (a scenario parameter; the streams are parked first, observed)."""
        with self._gap:
            self._idle_gap()

    def _idle_gap(self) -> None:
        self._go.clear()
        deadline = time.monotonic() + 30
        while any(
            self._busy.get(k, True)
            for k in ("mesh_keepalive", "edge_keepalive", "mesh_fresh", "edge_fresh")
        ):
            if time.monotonic() > deadline or self._stop.is_set():
                break
            time.sleep(0.01)  # polling the streams' parked flags
        self._stop.wait(IDLE + 1.0)
        self._go.set()

    def _rhythm(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(2.0)
            self.burst()
            self.idle_gap()
            self.burst()
            self.cycles += 1


# -- set-up ----------------------------------------------------------------------------------


def _token(ca_dir: Path, name: str, uses: int) -> str:
    out = subprocess.run(
        meshcar_cmd(
            "ca", "token", "--dir", str(ca_dir), "--spiffe-id", sid(name), "--uses", str(uses)
        ),
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def start_lifecycle_mesh(d: Path) -> tuple[Mesh, ssl.SSLContext]:
    names = ["ca", "edge_https", "edge_admin"] + [
        f"{n}_{k}" for n in ("web", "api") for k in ("app", "in", "out", "admin")
    ]
    ports = {n: free_port() for n in names}
    ca_dir = d / "ca"
    subprocess.run(
        meshcar_cmd("ca", "init", "--dir", str(ca_dir), "--trust-domain", TD, "--max-ttl", "1h"),
        check=True,
        capture_output=True,
    )
    for n in NAMES:  # the re-bootstrap credential after an expiry: a token with a few uses
        (d / f"{n}.token").write_text(_token(ca_dir, n, 10))
    bootstrap = d / "bootstrap-root.pem"
    shutil.copy(ca_dir / "root.pem", bootstrap)  # handed out of band: never updated
    public = trustme.CA()
    public.cert_pem.write_to_path(str(d / "public-ca.pem"))
    leaf = public.issue_cert("api.test")
    leaf.private_key_pem.write_to_path(str(d / "edge-site.key"))
    (d / "edge-site.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    edge_ctx = ssl.create_default_context(cafile=str(d / "public-ca.pem"))

    procs = Procs(d)
    mesh = Mesh(
        d,
        procs,
        ports,
        ["ca", "serve", "--dir", str(ca_dir), "--listen", f"127.0.0.1:{ports['ca']}"],
    )
    try:
        mesh.start_ca()
        api = sidecar_config(d, "api", ports, TTL, 2.0, [sid("web"), sid("edge")], {}, bootstrap)
        web = sidecar_config(
            d,
            "web",
            ports,
            TTL,
            2.0,
            [],
            {"api": {"endpoints": [f"127.0.0.1:{ports['api_in']}"], "spiffe_id": sid("api")}},
            bootstrap,
        )
        cfg = json.loads(web.read_text())
        cfg["outbound"]["pool_idle_seconds"] = IDLE
        web.write_text(json.dumps(cfg))
        edge = d / "edge.yaml"
        edge.write_text(
            json.dumps(
                {
                    "listen": {"https": f"127.0.0.1:{ports['edge_https']}"},
                    "admin": {"listen": f"127.0.0.1:{ports['edge_admin']}"},
                    "identity": {
                        "spiffe_id": sid("edge"),
                        "ca_url": f"https://127.0.0.1:{ports['ca']}",
                        "ca_bundle": str(bootstrap),
                        "token_file": str(d / "edge.token"),
                        "state_dir": str(d / "edge-state"),
                        "ttl_seconds": TTL,
                        "bundle_refresh_seconds": 2.0,
                    },
                    "pool_idle_seconds": IDLE,
                    "routes": [
                        {
                            "host": "api.test",
                            "mode": "bridge",
                            "tls": {
                                "cert": str(d / "edge-site.pem"),
                                "key": str(d / "edge-site.key"),
                            },
                            "backend": {
                                "endpoints": [f"127.0.0.1:{ports['api_in']}"],
                                "spiffe_id": sid("api"),
                            },
                        }
                    ],
                }
            )
        )
        procs.start("api-app", "demo-app", "--name", "api", "--port", str(ports["api_app"]))
        procs.start("api-sidecar", "sidecar", "--config", str(api))
        procs.start("web-sidecar", "sidecar", "--config", str(web))
        procs.start("edge", "edge", "--config", str(edge))
        for n in NAMES:
            procs.wait_http(
                f"{mesh.admin(n)}/ready", name=n if n == "edge" else f"{n}-sidecar", timeout=30
            )
    except BaseException:
        procs.stop_all()
        raise
    return mesh, edge_ctx


# -- the scenario ------------------------------------------------------------------------------


def forced_renewals(mesh: Mesh, traffic: Traffic) -> None:
    for who in ("web", "api"):
        r = subprocess.run(
            meshcar_cmd("cert", "renew", "--admin", f"127.0.0.1:{mesh.ports[f'{who}_admin']}"),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0 and json.loads(r.stdout)["renewed"], r.stdout + r.stderr
        traffic.idle_gap()
        traffic.burst()


def short_outage(mesh: Mesh, seconds: float) -> dict:
    """Stop the CA for `seconds` (< the lifetime) starting just after every process got a
    fresh certificate (the edge's own renewal, observed; web's and api's forced), so their
    next renewals (8-12 s later) fall inside the outage and fail, and the retries after the
    CA's return still come well before expiry (20 s), even if its start is slow."""
    edge_serial = mesh.certs("edge")["serial"]
    wait_until(
        "the edge's next renewal", lambda: mesh.certs("edge")["serial"] != edge_serial, 2 * TTL, 0.1
    )
    for n in ("web", "api"):
        assert httpx.post(f"{mesh.admin(n)}/renew", timeout=30).json()["renewed"]
    mesh.stop_ca()
    down = time.time()
    failures = {n: mesh.renewals(n, "failure") for n in NAMES}
    held = {n: mesh.certs(n)["serial"] for n in NAMES}
    not_after = min(_ts(mesh.certs(n)["not_after"]) for n in NAMES)
    time.sleep(seconds)  # the outage's length is the scenario, not a synchronisation
    failed = {n: mesh.renewals(n, "failure") - failures[n] for n in NAMES}
    assert sum(failed.values()) >= 1, f"renewals should have failed in the outage: {failed}"
    mesh.start_ca()
    up = time.time()
    # every process renews again through the returned CA, none ever lost its certificate
    wait_until(
        "every process to renew after the short outage",
        lambda: all(mesh.certs(n)["serial"] != held[n] for n in NAMES),
        2 * TTL,
    )
    assert time.time() < not_after, "renewed before the certificates held in the outage expired"
    assert all(httpx.get(f"{mesh.admin(n)}/ready", timeout=5).status_code == 200 for n in NAMES)
    return {"outage_s": round(up - down, 1), "failed_renewals_during": failed}


def long_outage(mesh: Mesh) -> dict:
    """Stop the CA for longer than the certificates' whole validity; measure each process's
    last notAfter and first re-issue after the CA returns."""
    mesh.stop_ca()
    down = time.time()
    held = {n: mesh.certs(n) for n in NAMES}  # read once the CA is down: nothing replaces them now
    not_after = {n: _ts(held[n]["not_after"]) for n in NAMES}
    lifetime = max(_ts(held[n]["not_after"]) - _ts(held[n]["not_before"]) for n in ("web", "api"))
    # every process notices that it holds no valid certificate (observed on /ready)
    wait_until(
        "every process to report no valid certificate",
        lambda: all(
            httpx.get(f"{mesh.admin(n)}/ready", timeout=5).status_code == 503 for n in NAMES
        ),
        lifetime + 15,
        interval=0.1,
    )
    assert all(
        mesh.certs(n)["serial"] == held[n]["serial"] for n in NAMES
    )  # nothing issued meanwhile
    remaining = down + lifetime + 1.0 - time.time()
    time.sleep(max(0.0, remaining))  # the outage outlasts a whole lifetime: the scenario
    mesh.start_ca()
    up = time.time()
    reissued: dict[str, float] = {}
    deadline = time.monotonic() + 120  # retries after expiry are 15-30 s apart
    while len(reissued) < len(NAMES):
        for n in NAMES:
            if n not in reissued and mesh.certs(n)["serial"] != held[n]["serial"]:
                reissued[n] = time.time()
        assert time.monotonic() < deadline, (
            f"not re-issued within 120 s of the CA's return: {reissued}"
        )
        time.sleep(0.1)  # polling /certs; the window's end is measured to this resolution
    for n in NAMES:
        wait_until(
            f"{n} to be ready again",
            lambda n=n: httpx.get(f"{mesh.admin(n)}/ready", timeout=5).status_code == 200,
            10,
        )
    return {
        "down": down,
        "up": up,
        "not_after": not_after,
        "reissued": reissued,
        "outage_s": round(up - down, 1),
        "lifetime_s": lifetime,
    }


def windows(lo: dict) -> dict[str, tuple[float, float]]:
    """Per path, the span in which no valid certificate could exist for one of its ends."""
    return {
        p: (min(lo["not_after"][n] for n in ends) - 1.0, max(lo["reissued"][n] for n in ends) + 1.0)
        for p, ends in PATHS.items()
    }


def test_lifecycle_chaos_with_real_processes(tmp_path: Path) -> None:
    mesh, edge_ctx = start_lifecycle_mesh(tmp_path)
    t_start = time.time()
    timeline: dict[str, float] = {}

    def mark(what: str) -> None:
        timeline[what] = round(time.time() - t_start, 1)

    try:
        with Traffic(mesh, edge_ctx) as traffic:
            wait_until("a first rhythm cycle", lambda: traffic.cycles >= 1, 60)
            mark("warm")
            forced_renewals(mesh, traffic)
            mark("forced_renewals")
            rotation = run_root_rotation(mesh, TTL)
            for n in NAMES:  # the edge follows the rotation too
                wait_until(
                    f"{n} to hold the final bundle",
                    lambda n=n: (
                        _roots(mesh.dir / f"{n}-state" / "bundle.pem")
                        == _roots(mesh.ca_dir / "bundle.pem")
                    ),
                    3 * TTL,
                )
            mark("root_rotation")
            short = short_outage(mesh, 11.0)
            mark("short_outage")
            before_long = len(traffic.records)
            assert [r for r in traffic.records if not r.ok] == [], (
                f"failures before the long outage: {[r for r in traffic.records if not r.ok][:5]}"
            )
            lo = long_outage(mesh)
            mark("long_outage")
            c = traffic.cycles
            wait_until("two rhythm cycles after recovery", lambda: traffic.cycles >= c + 2, 60)
            mark("end")
        alive = {name: p.poll() for name, p in mesh.procs.procs}
        assert all(rc is None for rc in alive.values()), alive

        win = windows(lo)
        records = traffic.records
        outside = [
            r
            for r in records
            if not r.ok and not (r.t0 <= win[r.path][1] and r.t1 >= win[r.path][0])
        ]
        inside_failed = [r for r in records if not r.ok and r not in outside]
        after = [r for r in records if r.t0 > max(w[1] for w in win.values())]
        assert not outside, (
            f"{len(outside)} failures outside the no-valid-certificate window {win}: "
            f"{[(round(r.t0 - t_start, 1), r.path, r.stream, r.detail) for r in outside[:8]]}"
        )
        assert after and all(r.ok for r in after)
        for p in PATHS:
            assert {r.stream for r in after if r.path == p} >= {"keepalive", "fresh", "burst"}, p
        for name in ("web-sidecar", "api-sidecar", "edge"):
            assert "Traceback" not in mesh.procs.log(name), mesh.procs.log(name)[-3000:]
        hs = {
            k: int(
                mesh.metric(
                    "web", f'meshcar_tls_handshakes_total{{direction="outbound",result="{k}"}}'
                )
            )
            for k in ("full", "resumed", "failure")
        }
        assert hs["full"] + hs["resumed"] >= traffic.cycles, (
            hs
        )  # the idle gaps did retire pooled connections
        result = {
            "ttl_s": TTL,
            "pool_idle_s": IDLE,
            "timeline_s": timeline,
            "rotation": rotation,
            "short_outage": short,
            "long_outage": {
                "outage_s": lo["outage_s"],
                "lifetime_s": lo["lifetime_s"],
                "ca_back_after_expiry_s": {
                    n: round(lo["up"] - lo["not_after"][n], 1) for n in NAMES
                },
                "reissued_after_ca_back_s": {
                    n: round(lo["reissued"][n] - lo["up"], 1) for n in NAMES
                },
                "window_s": {p: round(w[1] - w[0], 1) for p, w in win.items()},
                "failed_in_window": {
                    p: sum(1 for r in inside_failed if r.path == p) for p in PATHS
                },
                "ok_in_window": {
                    p: sum(
                        1
                        for r in records
                        if r.ok and r.path == p and win[p][0] <= r.t0 <= win[p][1]
                    )
                    for p in PATHS
                },
            },
            "requests": len(records),
            "before_long_outage": before_long,
            "failed": len(inside_failed) + len(outside),
            "failed_outside_window": len(outside),
            "cycles": traffic.cycles,
            "web_outbound_handshakes": hs,
            "renewals": {n: mesh.renewals(n) for n in NAMES},
            "seconds": round(time.time() - t_start, 1),
        }
        _report(mesh, "lifecycle", result)
    finally:
        mesh.procs.stop_all()
