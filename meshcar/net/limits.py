"""Connection limits and progress timeouts of the proxy's listeners, and their config sections.

`ConnectionLimit` counts one listener's open downstream connections; over its maximum a
connection is refused (how depends on the listener: an HTTP listener answers 503 with
`Connection: close`, a TLS listener closes before the handshake) and counted. The limit on
connections to one upstream lives in the pool (net/pool.py). `parse_timeouts` and
`parse_limits` read the `timeouts:` and `limits:` sections the sidecar and the edge share,
reporting every problem through `bad(key, message)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshcar.net.forward import Timeouts

TIMEOUT_KEYS = {
    "request_head_seconds": "request_head",
    "idle_seconds": "idle",
    "request_body_seconds": "request_body",
    "response_head_seconds": "response_head",
    "response_body_seconds": "response_body",
    "write_seconds": "write",
    "upgraded_idle_seconds": "upgraded_idle",
}


@dataclass(frozen=True)
class Limits:
    max_connections: int = 10000  # open downstream connections per listener
    max_upstream_connections: int = 1024  # open connections per upstream (or backend cluster)


class ConnectionLimit:
    """Open connections of one listener, up to `maximum`."""

    def __init__(
        self, name: str, maximum: int, on_refused: Callable[[str], None] | None = None
    ) -> None:
        self.name = name
        self.maximum = maximum
        self.open = 0
        self._on_refused = on_refused

    def try_enter(self) -> bool:
        """Count a new connection in, or refuse it (counted) when the listener is full."""
        if self.open >= self.maximum:
            if self._on_refused is not None:
                self._on_refused(self.name)
            return False
        self.open += 1
        return True

    def leave(self) -> None:
        self.open -= 1


Bad = Callable[[str, str], None]


def _section(raw: Any, name: str, bad: Bad, allowed: set[str]) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        bad(name, "must be a mapping")
        return {}
    for k in raw:
        if k not in allowed:
            bad(f"{name}.{k}", f"unknown key (expected one of: {', '.join(sorted(allowed))})")
    return raw


def parse_timeouts(raw: Any, bad: Bad) -> Timeouts:
    """The `timeouts:` section: every key optional, a number of seconds in [0.1, 86400]."""
    section = _section(raw, "timeouts", bad, set(TIMEOUT_KEYS))
    values: dict[str, float] = {}
    for key, field_name in TIMEOUT_KEYS.items():
        if key not in section:
            continue
        val = section[key]
        if isinstance(val, bool) or not isinstance(val, int | float) or not (0.1 <= val <= 86400):
            bad(f"timeouts.{key}", "must be a number of seconds between 0.1 and 86400")
            continue
        values[field_name] = float(val)
    return Timeouts(**values)


def parse_limits(raw: Any, bad: Bad) -> Limits:
    """The `limits:` section: `max_connections` (per listener), `max_upstream_connections`."""
    section = _section(raw, "limits", bad, {"max_connections", "max_upstream_connections"})
    values: dict[str, int] = {}
    for key in ("max_connections", "max_upstream_connections"):
        if key not in section:
            continue
        val = section[key]
        if isinstance(val, bool) or not isinstance(val, int) or not (1 <= val <= 1_000_000):
            bad(f"limits.{key}", "must be a whole number between 1 and 1000000")
            continue
        values[key] = val
    return Limits(**values)
