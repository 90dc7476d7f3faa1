"""`meshcar dashboard`: one web page showing the mesh, read from the admin endpoints.

    meshcar dashboard --admin web=http://127.0.0.1:15000 --admin edge=http://127.0.0.1:9901
    meshcar dashboard --from-demo      # the admin listeners of `meshcar demo`

serves on 127.0.0.1:9900 (`--listen`) `GET /` (static/index.html: vanilla JS, inline CSS, no
build step) and `GET /api/mesh` (model.py's JSON). Each `/api/mesh` asks every target, in
parallel, for /ready, /certs, /metrics, /requests/recent and /routes (the edge's), with a
short timeout; a target that does not answer is shown with its error. Those endpoints (except
/ready and /metrics) are served on loopback only (admin/server.py), so the dashboard runs on
the same host (or pod) as the processes it reads, like `meshcar cert`. It binds loopback
only unless `--allow-remote` is given: the page shows identities and request paths.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from importlib import resources

import httpx
import trio

from meshcar.dashboard.model import Snapshot, build_mesh
from meshcar.net.httpconn import HttpConn
from meshcar.net.httpserver import send_error, serve_http
from meshcar.proto.headers import simple_response
from meshcar.proto.http1 import EndOfMessage, RequestHead

FETCH_TIMEOUT = 2.0


def parse_target(text: str) -> tuple[str, str]:
    """NAME=URL (the URL of an admin listener, e.g. http://127.0.0.1:15000)."""
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected NAME=http://HOST:PORT, got {text!r}")
    return name, url.rstrip("/")


async def _get_json(client: httpx.AsyncClient, url: str) -> tuple[int, object]:
    r = await client.get(url)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, None


async def fetch(client: httpx.AsyncClient, name: str, url: str) -> Snapshot:
    """One target's admin endpoints as a Snapshot (its error, if it cannot be read)."""
    snap = Snapshot(name, url)
    try:
        status, ready = await _get_json(client, url + "/ready")
        if isinstance(ready, dict):
            snap.ready, snap.ready_reason = bool(ready.get("ready")), str(ready.get("reason", ""))
        _, certs = await _get_json(client, url + "/certs")
        snap.certs = certs if isinstance(certs, dict) else {}
        r = await client.get(url + "/metrics")
        snap.metrics = r.text if r.status_code == 200 else ""
        _, recent = await _get_json(client, url + "/requests/recent")
        if isinstance(recent, dict):
            snap.recent = list(recent.get("entries", []))
        elif status == 200:
            snap.error = "no /requests/recent (a meshcar older than the dashboard?)"
        code, routes = await _get_json(client, url + "/routes")
        if code == 200 and isinstance(routes, dict):
            snap.routes = list(routes.get("routes", []))
    except httpx.HTTPError as exc:
        snap.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return snap


async def collect(targets: list[tuple[str, str]]) -> list[Snapshot]:
    out: list[Snapshot | None] = [None] * len(targets)

    async def one(i: int, name: str, url: str) -> None:
        out[i] = await fetch(client, name, url)

    async with httpx.AsyncClient(timeout=FETCH_TIMEOUT) as client:
        async with trio.open_nursery() as nursery:
            for i, (name, url) in enumerate(targets):
                nursery.start_soon(one, i, name, url)
    return [s for s in out if s is not None]


def index_html() -> bytes:
    return resources.files("meshcar.dashboard").joinpath("static/index.html").read_bytes()


class Dashboard:
    def __init__(self, targets: list[tuple[str, str]]) -> None:
        self.targets = targets
        self.page = index_html()

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        await serve_http(HttpConn(stream, "request"), self.handle_request)

    async def handle_request(self, req: RequestHead, conn: HttpConn) -> bool:
        ev = await conn.next_event()
        while not isinstance(ev, EndOfMessage):  # a GET carries no body; skip one if sent
            ev = await conn.next_event()
        path = req.target.split(b"?", 1)[0]
        if req.method not in (b"GET", b"HEAD"):
            await send_error(conn, 405, "the dashboard is read-only", close=False)
        elif path in (b"/", b"/index.html"):
            await conn.send(
                simple_response(200, self.page, content_type=b"text/html; charset=utf-8")
            )
        elif path == b"/api/mesh":
            mesh = build_mesh(await collect(self.targets))
            body = json.dumps(mesh, default=str).encode()
            await conn.send(
                simple_response(
                    200,
                    body,
                    content_type=b"application/json",
                    extra=[(b"Cache-Control", b"no-store")],
                )
            )
        else:
            await send_error(conn, 404, f"no page {path.decode('latin-1')}", close=False)
        return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(
    dash: Dashboard,
    host: str,
    port: int,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    print(json.dumps({"event": "dashboard.listening", "url": f"http://{host}:{bound}/"}))
    sys.stdout.flush()
    task_status.started(bound)
    await trio.serve_listeners(dash.handle_connection, listeners)  # type: ignore[arg-type]


def demo_targets() -> list[tuple[str, str]]:
    """The admin listeners of `meshcar demo` (meshcar/demo/scenario.py): each service, the edge."""
    from meshcar.demo import scenario as sc

    out = [(s.name, f"http://127.0.0.1:{s.admin_port}") for s in sc.SCENARIO.services]
    return out + [("edge", f"http://127.0.0.1:{sc.EDGE_ADMIN_PORT}")]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="meshcar dashboard", description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="127.0.0.1:9900", help="HOST:PORT (default %(default)s)")
    p.add_argument(
        "--admin",
        action="append",
        type=parse_target,
        default=[],
        metavar="NAME=URL",
        help="an admin listener to read, e.g. api=http://127.0.0.1:15001 (repeat)",
    )
    p.add_argument(
        "--from-demo",
        action="store_true",
        help="read the admin listeners of `meshcar demo` (its services and the edge)",
    )
    p.add_argument(
        "--allow-remote", action="store_true", help="allow a non-loopback --listen address"
    )
    args = p.parse_args(argv)
    targets = (demo_targets() if args.from_demo else []) + args.admin
    if not targets:
        p.error("give at least one --admin NAME=URL (or --from-demo)")
    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        p.error(f"--listen: expected HOST:PORT, got {args.listen!r}")
    if not _is_loopback(host) and not args.allow_remote:
        p.error(
            f"--listen {args.listen}: not a loopback address; the dashboard shows identities "
            "and request paths to anyone who reaches it (add --allow-remote to do so anyway)"
        )
    try:
        trio.run(serve, Dashboard(targets), host, int(port))
    except KeyboardInterrupt:
        return 0
    return 0
