"""meshcar/proto/ is sans-IO: no module there may import I/O libraries or upper layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROTO = Path(__file__).resolve().parents[2] / "meshcar" / "proto"

# Top-level modules that do I/O, and meshcar layers that sit above proto.
FORBIDDEN = {
    "trio", "anyio", "asyncio", "socket", "ssl", "selectors", "select", "socketserver",
    "subprocess", "threading", "http.client", "http.server", "urllib.request", "httpx",
    "requests", "meshcar.net", "meshcar.tls", "meshcar.identity", "meshcar.sidecar",
    "meshcar.edge", "meshcar.admin", "meshcar.demo", "meshcar.inject", "meshcar.cli",
    "meshcar.app", "meshcar_ca",
}  # fmt: skip


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def _imports(tree: ast.AST, module: str) -> list[str]:
    """Every absolute module name imported anywhere in the tree (incl. inside functions)."""
    package = module.rsplit(".", 1)[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.append(prefix)
            names.extend(f"{prefix}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and getattr(node.func, "id", getattr(node.func, "attr", ""))
            in ("__import__", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.append(node.args[0].value)
    return names


def _proto_modules() -> list[Path]:
    return sorted(PROTO.glob("*.py"))


def test_proto_package_has_modules() -> None:
    assert _proto_modules(), f"no modules found under {PROTO}"


@pytest.mark.parametrize("path", _proto_modules(), ids=lambda p: p.name)
def test_proto_module_is_sans_io(path: Path) -> None:
    module = "meshcar.proto." + path.stem
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = sorted({name for name in _imports(tree, module) if _forbidden(name)})
    assert not bad, f"{path.name} imports {bad}: meshcar/proto/ must stay sans-IO"


def test_checker_catches_forbidden_imports() -> None:
    src = (
        "import trio\nfrom socket import socket\nimport ssl as s\n"
        "from ..net import relay\nimport importlib\nimportlib.import_module('asyncio')\n"
        "def f():\n    import meshcar.tls.context\n"
    )
    found = {n for n in _imports(ast.parse(src), "meshcar.proto.x") if _forbidden(n)}
    assert {"trio", "socket", "ssl", "meshcar.net", "asyncio", "meshcar.tls.context"} <= found
