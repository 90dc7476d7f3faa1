"""Bridge routes: TLS ends at the edge, which talks mTLS to the backend's sidecar (the
backend names its `spiffe_id`, checked in routes/base.py `parse_backend`); the L7 features
(routes/l7.py) apply and the edge needs a mesh identity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from meshcar.edge.routes.base import Mode, Route
from meshcar.edge.routes.l7 import parse_l7


@dataclass(frozen=True)
class BridgeRoute(Route):
    mode: ClassVar[Mode] = Mode.BRIDGE


parse_bridge = parse_l7
