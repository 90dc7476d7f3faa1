"""Everything under tests/e2e is marked `e2e` (real meshcar processes), so
`pytest -m "not e2e"` is the fast subset: unit and in-process integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)
