"""The sidecar and edge config loaders share their preamble (meshcar/common/config.py:
`load_yaml`, `parse_yaml`, `top_level`, `parse_admin`), so a file that cannot be read, is not
YAML, is not a mapping or has a bad `admin:` section is reported the same way by both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshcar.edge.config import load_edge_config, parse_edge_config
from meshcar.errors import ConfigError
from meshcar.sidecar.config import load_config, load_config_text, parse_config

LOADERS = {"sidecar": load_config, "edge": load_edge_config}
PARSERS = {"sidecar": parse_config, "edge": parse_edge_config}


def _problems(call: Any, *args: Any) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        call(*args)
    return exc.value.problems


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_file_problems_are_reported_alike(kind: str, tmp_path: Path) -> None:
    load = LOADERS[kind]
    missing = tmp_path / "missing.yaml"
    assert _problems(load, missing) == [f"{missing}: cannot read: No such file or directory"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [\n")
    (problem,) = _problems(load, bad)
    assert problem.startswith(f"{bad}: not valid YAML: ")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    assert _problems(load, listed) == [f"{listed}: the top level must be a mapping"]


@pytest.mark.parametrize("kind", sorted(PARSERS))
def test_admin_section_problems_are_reported_alike(kind: str) -> None:
    data = {"admin": {"listen": "nowhere", "bogus": 1, "public_paths": ["/metrics", "/renew"]}}
    admin = [p for p in _problems(PARSERS[kind], data, "c.yaml") if p.startswith("c.yaml: admin")]
    assert [p.split(":")[1].strip() for p in admin] == [
        "admin.bogus",
        "admin.listen",
        "admin.public_paths",
    ], admin


def test_config_text_goes_through_the_same_yaml_step() -> None:
    assert _problems(load_config_text, "a: [\n", "$MESHCAR_CONFIG")[0].startswith(
        "$MESHCAR_CONFIG: not valid YAML: "
    )
