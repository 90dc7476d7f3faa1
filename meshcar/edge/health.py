"""Active health checks of the edge's backends: HTTP GET for L7 routes, TCP connect for
passthrough. Endpoints failing `fall` checks in a row are ejected from their balancer and
readmitted after `rise` good ones; every change is logged and shown as a gauge."""

from __future__ import annotations

import json
import logging

import trio

from meshcar.edge.config import HealthCheck, Mode, Route
from meshcar.edge.http import Backends
from meshcar.edge.policy import EndpointState
from meshcar.errors import MeshcarError
from meshcar.net.connect import open_tcp, open_tls
from meshcar.net.errors import HANDSHAKE_ERRORS
from meshcar.net.httpconn import HttpConn
from meshcar.proto.http1 import ResponseHead

log = logging.getLogger("meshcar.edge.health")
HEALTH_ERRORS: tuple[type[BaseException], ...] = (MeshcarError, *HANDSHAKE_ERRORS)


async def check_once(
    route: Route, state: EndpointState, hc: HealthCheck, backends: Backends
) -> bool:
    ep = state.endpoint
    try:
        with trio.fail_after(hc.timeout):
            stream: trio.abc.Stream
            if route.mode is Mode.PASSTHROUGH:
                stream = await open_tcp(ep.host, ep.port, hc.timeout)
                await stream.aclose()
                return True
            if route.mode is Mode.BRIDGE:
                assert backends.store is not None
                stream = await open_tls(
                    ep.host, ep.port, backends.store.client_context(), timeout=hc.timeout
                )
            else:
                stream = await open_tcp(ep.host, ep.port, hc.timeout)
            conn = HttpConn(stream, "response")
            try:
                await conn.send(
                    f"GET {hc.path} HTTP/1.1\r\nHost: {route.host}\r\n"
                    "User-Agent: meshcar-edge-health\r\nConnection: close\r\n\r\n".encode()
                )
                ev = await conn.next_event()
                return isinstance(ev, ResponseHead) and 200 <= ev.status < 400
            finally:
                await conn.aclose()
    except HEALTH_ERRORS:
        return False


async def health_loop(route: Route, backends: Backends, gauge, target: str = "") -> None:  # noqa: ANN001
    """Checks one backend of `route`: `target` names it (a split's; default: the route's
    one backend, keyed by its host)."""
    target = target or route.host
    hc = backends.targets[target][1].health if target in backends.targets else route.backend.health
    assert hc is not None
    balancer = backends.balancers[target]
    kind = "tcp" if route.mode is Mode.PASSTHROUGH else "http"
    while True:
        for state in balancer.states:
            ok = await check_once(route, state, hc, backends)
            change = balancer.report(state, ok)
            backends.health_changed(target, state)  # a policy's balancer (edge/http.py)
            gauge.labels(route.host, str(state.endpoint), kind).set(1 if state.healthy else 0)
            if change:
                log.warning(
                    json.dumps(
                        {
                            "event": f"edge.backend_{change}",
                            "route": route.host,
                            "endpoint": str(state.endpoint),
                            "check": kind,
                        }
                    )
                )
        await trio.sleep(hc.interval)
