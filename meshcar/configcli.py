"""`meshcar config schema sidecar|edge` and `meshcar config validate FILE` (alias `check`).

The schema is rendered from the declarative key description the checkers use
(meshcar/common/schema.py), so editors and `validate` accept the same keys. It checks the
config only; `meshcar check FILE` (checkcli.py) also checks the files, CA, ports and peers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from meshcar.common.config import load_yaml
from meshcar.common.schema import Section, document
from meshcar.edge.config import EDGE, parse_edge_config
from meshcar.errors import ConfigError
from meshcar.sidecar.config import SIDECAR, parse_config

KINDS: dict[str, Section] = {"sidecar": SIDECAR, "edge": EDGE}


def schema(kind: str) -> dict:
    """The JSON Schema (draft 2020-12) of the `kind` config."""
    return document(KINDS[kind], f"meshcar {kind} configuration", f"urn:meshcar:config:{kind}")


def guess_kind(data: object) -> str:
    """An edge config has `routes` or `listen`; anything else is checked as a sidecar config."""
    return (
        "edge" if isinstance(data, dict) and ("routes" in data or "listen" in data) else "sidecar"
    )


def check(path: Path, kind: str | None = None) -> tuple[str, list[str]]:
    """(the kind checked, every problem of the file at `path`, each naming the file and key)."""
    try:
        data = load_yaml(path)
    except ConfigError as exc:
        return kind or "sidecar", exc.problems
    kind = kind or guess_kind(data)
    parse = parse_edge_config if kind == "edge" else parse_config
    try:
        parse(data, str(path), path.parent)
    except ConfigError as exc:
        return kind, exc.problems
    return kind, []


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meshcar config", description="Config schema and checks.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("schema", help="print the JSON Schema (draft 2020-12) of a config")
    sp.add_argument("kind", choices=sorted(KINDS))
    cp = sub.add_parser(
        "validate",
        aliases=["check"],  # `check`: the name before issue 15
        help="validate config files for CI; print every problem (exit 2 if any)",
    )
    cp.add_argument("files", type=Path, nargs="+", metavar="FILE")
    cp.add_argument(
        "--kind",
        choices=sorted(KINDS),
        help="sidecar or edge (default: edge if the file has routes or listen)",
    )
    args = parser.parse_args(argv)
    if args.cmd == "schema":
        print(json.dumps(schema(args.kind), indent=2))
        return 0
    failed = False
    for path in args.files:
        kind, problems = check(path, args.kind)
        if problems:
            failed = True
            for p in problems:
                print(p, file=sys.stderr)
        else:
            print(f"{path}: ok ({kind} config)")
    return 2 if failed else 0
