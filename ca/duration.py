"""Durations on the command line: `90s`, `15m`, `24h`, `7d`, `1h30m` or plain seconds."""

from __future__ import annotations

import re

from .errors import ConfigError

_PART = re.compile(r"(\d+)([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Parse a duration into whole seconds (> 0); raise ConfigError naming the bad value."""
    s = text.strip().lower()
    if s.isdigit():
        seconds = int(s)
    else:
        parts = _PART.findall(s)
        if not parts or "".join(n + u for n, u in parts) != s:
            raise ConfigError(f"invalid duration {text!r} (use e.g. 90s, 15m, 24h, 7d)")
        seconds = sum(int(n) * _UNIT[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"invalid duration {text!r}: must be positive")
    return seconds
