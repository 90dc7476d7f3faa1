"""Terminate routes: TLS ends at the edge, the backend gets plain HTTP; the L7 features
(routes/l7.py) apply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from meshcar.edge.routes.base import Mode, Route
from meshcar.edge.routes.l7 import parse_l7


@dataclass(frozen=True)
class TerminateRoute(Route):
    mode: ClassVar[Mode] = Mode.TERMINATE


parse_terminate = parse_l7
