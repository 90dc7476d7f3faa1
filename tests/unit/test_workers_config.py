"""`workers` in the sidecar and edge configs: a count from 1 to 64 or `auto`; anything else
is a configuration error naming the file and the key (meshcar/common/config.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshcar.edge.config import load_edge_config
from meshcar.errors import ConfigError
from meshcar.sidecar.config import load_config
from tests.unit.test_sidecar_config import GOOD

EDGE = """
listen: {https: '127.0.0.1:8443'}
admin: {listen: '127.0.0.1:7200'}
routes: [{host: a.test, mode: passthrough, backend: {endpoints: ['127.0.0.1:9000']}}]
"""


def _load(kind: str, tmp_path: Path, extra: str):  # noqa: ANN202
    f = tmp_path / f"{kind}.yaml"
    f.write_text((GOOD if kind == "sidecar" else EDGE) + extra)
    return f, (load_config if kind == "sidecar" else load_edge_config)(f)


@pytest.mark.parametrize("kind", ["sidecar", "edge"])
def test_default_is_one_worker(kind: str, tmp_path: Path) -> None:
    assert _load(kind, tmp_path, "")[1].workers == 1


@pytest.mark.parametrize("kind", ["sidecar", "edge"])
def test_count_and_auto(kind: str, tmp_path: Path) -> None:
    assert _load(kind, tmp_path, "workers: 2\n")[1].workers == 2
    assert _load(kind, tmp_path, "workers: 64\n")[1].workers == 64
    cpus = len(os.sched_getaffinity(0))
    assert _load(kind, tmp_path, "workers: auto\n")[1].workers == min(cpus, 64)


@pytest.mark.parametrize("kind", ["sidecar", "edge"])
@pytest.mark.parametrize("value", ["0", "-1", "x", "'2'", "true", "65", "1.5", "null", "[2]"])
def test_bad_values_name_file_and_key(kind: str, value: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _load(kind, tmp_path, f"workers: {value}\n")
    assert f"{tmp_path / kind}.yaml: workers: must be a whole number from 1 to 64, or auto" in str(
        err.value
    )


def test_meshcar_run_refuses_more_than_one_worker(tmp_path: Path) -> None:
    from meshcar.supervise import main

    f = tmp_path / "s.yaml"
    f.write_text(GOOD + "workers: 2\n")
    assert main(["--config", str(f), "--", "true"]) == 2
