"""Passthrough routes: the edge reads the SNI and splices TCP to the backend, which
terminates the client's TLS itself; only a PROXY protocol header and the source address of
the backend connection can be set."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, ClassVar

from meshcar.common.config import Checker
from meshcar.edge.routes.base import ROUTE_KEYS, Mode, Route

OWN_KEYS = {"host", "mode", "backend", "proxy_protocol", "source_address"}


@dataclass(frozen=True)
class PassthroughRoute(Route):
    mode: ClassVar[Mode] = Mode.PASSTHROUGH


def parse_passthrough(c: Checker, raw: dict, p: str) -> dict[str, Any]:
    """The keyword arguments of a PassthroughRoute beyond host and backend."""
    kw: dict[str, Any] = {}
    for k in ROUTE_KEYS - OWN_KEYS:
        if k in raw:
            c.bad(f"{p}.{k}", "passthrough routes never decrypt: L7 settings do not apply")
    pp = raw.get("proxy_protocol")
    if pp not in (None, "v1", "v2"):
        c.bad(p + ".proxy_protocol", "must be v1 or v2")
    kw["proxy_protocol"] = pp
    src = raw.get("source_address")
    if src is not None:
        try:
            kw["source_address"] = str(ipaddress.ip_address(src))
        except ValueError:
            c.bad(p + ".source_address", f"must be an IP address of this host, got {src!r}")
    return kw
