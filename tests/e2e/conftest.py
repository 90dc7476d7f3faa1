"""Everything under tests/e2e is marked `e2e` (real meshcar processes), so
`pytest -m "not e2e"` is the fast subset: unit and in-process integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.procs import Procs

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """The test's meshcar processes (logs in tmp_path), all stopped at teardown."""
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()
