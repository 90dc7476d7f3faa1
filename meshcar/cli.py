"""Command line entry point: parse arguments and hand over to the module that owns the command."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("meshcar: not yet", file=sys.stderr)
    return 2
