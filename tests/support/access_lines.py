"""The JSON access-log lines a test wrote (meshcar/common/accesslog.py writes them to stdout)."""

from __future__ import annotations

import json

import pytest

from meshcar.common import accesslog


def access_lines(capsys: pytest.CaptureFixture[str], *needles: str) -> list[dict]:
    """The access-log lines written since capsys was last read (flushed first), parsed, that
    contain every one of `needles` as text."""
    accesslog.flush()
    out = capsys.readouterr().out
    return [json.loads(x) for x in out.splitlines() if all(n in x for n in needles)]
