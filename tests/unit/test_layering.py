"""The import contracts, checked on every pytest run (so CI enforces them).

1. meshcar/proto/ is sans-IO: no module there may import I/O libraries or upper layers.
2. Layers: every module of meshcar, meshcar_ca, meshcar_spiffe, meshcar_tlsprofile and
   meshcar_x509 belongs to one layer of LAYERS and imports only from its own layer or lower
   ones; the roles (sidecar, edge, inject) share a layer but never import each other; the
   sidecar's inbound and outbound never import each other; meshcar_ca never imports meshcar;
   meshcar_spiffe, meshcar_tlsprofile and meshcar_x509 (the bottom layer, shared by both)
   import neither.
   ALLOWED lists the known exceptions, each with its reason; an exception no longer needed
   fails too, so the list only shrinks. docs/ARCHITECTURE.md explains the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "meshcar" / "proto"

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


# --- layers -----------------------------------------------------------------------------------

PACKAGES = ("meshcar", "meshcar_ca", "meshcar_spiffe", "meshcar_tlsprofile", "meshcar_x509")

# Lowest first. A module may import its own layer and the layers below it.
LAYERS: list[tuple[str, ...]] = [
    # shared by meshcar and meshcar_ca: the one SPIFFE ID parser, the one TLS profile, the
    # certificate builders
    ("meshcar_spiffe", "meshcar_tlsprofile", "meshcar_x509"),
    ("meshcar.errors",),
    ("meshcar.proto",),
    ("meshcar.net",),
    ("meshcar.tls",),
    ("meshcar.identity",),
    ("meshcar.admin",),
    ("meshcar.common",),  # what the roles share
    ("meshcar.sidecar", "meshcar.edge", "meshcar.inject"),  # the roles
    # commands; the CA; the demo (its scenario data and the edge config built from it)
    (
        "meshcar.demo",
        "meshcar.supervise",
        "meshcar.cli",
        "meshcar.configcli",
        "meshcar.checkcli",
        "meshcar.dashboard",
        "meshcar_ca",
    ),
]

# Pairs that must not import each other, in either direction (prefixes).
INDEPENDENT: list[tuple[str, str]] = [
    ("meshcar.sidecar", "meshcar.edge"),
    ("meshcar.sidecar", "meshcar.inject"),
    ("meshcar.edge", "meshcar.inject"),
    ("meshcar.sidecar.inbound", "meshcar.sidecar.outbound"),
    ("meshcar_ca", "meshcar"),  # the CA is reached only over its API
]

# (importing module, imported name prefix): why it is allowed for now.
ALLOWED: dict[tuple[str, str], str] = {
    # none today; add ("importing.module", "imported.prefix"): "why, and when it goes" here
}


def _package_modules() -> dict[str, Path]:
    """Every module of the five packages, by import name (ca/ is installed as meshcar_ca)."""
    found: dict[str, Path] = {}
    for folder, name in (
        (ROOT / "meshcar", "meshcar"),
        (ROOT / "ca", "meshcar_ca"),
        (ROOT / "meshcar_spiffe", "meshcar_spiffe"),
        (ROOT / "meshcar_tlsprofile", "meshcar_tlsprofile"),
        (ROOT / "meshcar_x509", "meshcar_x509"),
    ):
        for path in sorted(folder.rglob("*.py")):
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _layer_of(name: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if _matches(name, prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def _ours(name: str) -> bool:
    return any(_matches(name, p) for p in PACKAGES)


def layering_violations(imports: dict[str, list[str]]) -> set[tuple[str, str]]:
    """(module, imported name) pairs that break a contract; `imports` maps module -> names."""
    bad: set[tuple[str, str]] = set()
    for module, names in imports.items():
        own = _layer_of(module)
        for name in names:
            if not _ours(name) or name == "meshcar" or _matches(module, "meshcar.cli"):
                continue  # `from meshcar import x` is checked as meshcar.x; cli is the top
            if any(
                (_matches(module, a) and _matches(name, b))
                or (_matches(module, b) and _matches(name, a))
                for a, b in INDEPENDENT
            ):
                bad.add((module, name))
                continue
            theirs = _layer_of(name)
            if own is None or theirs is None or theirs > own:
                bad.add((module, name))
    return bad


def _all_imports() -> dict[str, list[str]]:
    out = {}
    for module, path in _package_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        out[module] = _imports(tree, package + "._")  # _imports takes the module's own name
    return out


def _grouped(pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Collapse `from a.b import c` (names a.b and a.b.c) onto the ALLOWED key that covers it
    (the package `a.b` itself is reported by its own name when no key covers it)."""
    out = set()
    for module, name in pairs:
        key = next(
            (
                (m, n)
                for m, n in ALLOWED
                if m == module and (_matches(name, n) or _matches(n, name))
            ),
            (module, name),
        )
        out.add(key)
    return out


def test_every_module_is_in_a_layer() -> None:
    unplaced = sorted(m for m in _package_modules() if _layer_of(m) is None and m != "meshcar")
    assert not unplaced, f"modules in no layer of LAYERS (add their package): {unplaced}"


def test_layers_and_independence_hold() -> None:
    found = _grouped(layering_violations(_all_imports()))
    new = sorted(found - set(ALLOWED))
    assert not new, (
        f"imports that break a layer contract (move the code down, or invert the dependency): {new}"
    )


def test_allowed_exceptions_are_still_needed() -> None:
    found = _grouped(layering_violations(_all_imports()))
    stale = sorted(set(ALLOWED) - found)
    assert not stale, f"ALLOWED lists exceptions that no longer occur; delete them: {stale}"


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("meshcar.tls.svid", "meshcar.identity.spiffe"),  # upward
        ("meshcar.identity.rotate", "meshcar.admin.metrics"),  # upward
        ("meshcar.edge.policy", "meshcar.sidecar.config"),  # role to role
        ("meshcar.sidecar.dialers", "meshcar.edge.http"),  # role to role
        ("meshcar.inject.cli", "meshcar.sidecar.config"),  # role to role
        ("meshcar.sidecar.inbound", "meshcar.sidecar.outbound"),  # independent halves
        ("meshcar.sidecar.outbound", "meshcar.sidecar.inbound"),
        ("meshcar_ca.auth", "meshcar.errors"),  # the CA never imports meshcar
        ("meshcar_spiffe", "meshcar_ca.errors"),
        ("meshcar_spiffe", "meshcar.errors"),
        ("meshcar_tlsprofile", "meshcar.tls.contexts"),
        ("meshcar_tlsprofile", "meshcar_ca.tls"),
        ("meshcar_x509", "meshcar_ca.pki"),
        ("meshcar_x509", "meshcar.demo.pki"),
        ("meshcar.proto.http1", "meshcar.common.config"),
        ("meshcar.newpkg.x", "meshcar.errors"),  # a module in no layer
        ("meshcar.edge.main", "meshcar.demo.scenario"),  # a role depending on demo data
        ("meshcar.common.config", "meshcar.demo.edge_config"),
    ],
)
def test_checker_catches_layer_violations(module: str, name: str) -> None:
    assert (module, name) in layering_violations({module: [name]})


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("meshcar.edge.config", "meshcar.common.config"),
        ("meshcar.sidecar.transparent", "meshcar.sidecar.outbound"),
        ("meshcar.sidecar.main", "meshcar.sidecar.inbound"),
        ("meshcar.tls.svid", "meshcar_spiffe"),
        ("meshcar_ca.spiffe", "meshcar_spiffe"),
        ("meshcar_ca.tls", "meshcar_tlsprofile"),
        ("meshcar.tls.contexts", "meshcar_tlsprofile"),
        ("meshcar_ca.pki", "meshcar_x509"),
        ("meshcar.inject.install", "meshcar_x509"),
        ("meshcar.cli", "meshcar_ca.cli"),
        ("meshcar.demo.plan", "meshcar.demo.edge_config"),
        ("meshcar.demo.edge_config", "meshcar.edge.config"),
        ("meshcar.net.forward", "meshcar.proto.http1"),
    ],
)
def test_checker_allows_downward_imports(module: str, name: str) -> None:
    assert not layering_violations({module: [name]})
