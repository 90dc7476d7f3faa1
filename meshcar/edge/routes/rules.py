"""The config of a route's targets: `backend` or a weighted `backends` split, and `rules`
(routes/match.py says how they are applied). Every problem reported at once."""

from __future__ import annotations

from typing import Any

from meshcar.common.config import Checker
from meshcar.edge.routes.base import (
    BACKEND,
    HEADER_MATCH,
    MATCH,
    RULE,
    SPLIT_BACKEND,
    Backend,
    Mode,
    parse_backend,
)
from meshcar.edge.routes.l7 import regex
from meshcar.edge.routes.match import HeaderMatch, Match, RouteRule, Split
from meshcar.proto.path import PathError, normalise_path


def _split(
    c: Checker, raw: dict, p: str, mode: Mode, key: str
) -> tuple[Backend | None, Split | None]:
    """`backend` (-> (it, None)) or `backends` (-> (the first, the split)) of `raw` at `p`."""
    one, many = raw.get("backend"), raw.get("backends")
    if (one is None) == (many is None):
        c.bad(p + ".backend", "give exactly one of backend or backends (a weighted split)")
        return None, None
    if one is not None:
        return parse_backend(c, one, p + ".backend", mode), None
    if not isinstance(many, list) or not many:
        c.bad(p + ".backends", "must be a non-empty list of {weight, endpoints, ...}")
        return None, None
    keys, backends, weights = [], [], []
    for j, item in enumerate(many):
        b, w = _split_item(c, item, f"{p}.backends[{j}]", mode)
        if b is not None:
            keys.append(f"{key}[{j}]")
            backends.append(b)
            weights.append(w)
    if len(backends) != len(many):
        return None, None
    if sum(weights) == 0:
        c.bad(p + ".backends", "the weights sum to 0: no backend would take traffic")
        return None, None
    return backends[0], Split(tuple(keys), tuple(backends), tuple(weights))


def _split_item(c: Checker, item: Any, where: str, mode: Mode) -> tuple[Backend | None, int]:
    """One backend of a split and its weight."""
    if not isinstance(item, dict):
        c.bad(where, "must be a mapping with weight and endpoints")
        return None, 0
    w = item.get("weight", 1)
    if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 1_000_000:
        c.bad(where + ".weight", "must be an integer 0-1000000")
        w = 0
    c.unknown(item, where + ".", SPLIT_BACKEND)
    known = {k: v for k, v in item.items() if k in BACKEND.keys}  # reported once, above
    return parse_backend(c, known, where, mode), w


def _path(c: Checker, val: Any, p: str) -> str | None:
    if not isinstance(val, str) or not val.startswith("/"):
        c.bad(p, "must start with /")
        return None
    try:
        norm = normalise_path(val)
    except PathError as exc:
        c.bad(p, str(exc))
        return None
    if norm != val and not (val.endswith("/") and norm == val):
        c.bad(p, f"is not a normalised path (requests are matched as {norm!r})")
        return None
    return val


def _headers(c: Checker, raw: Any, p: str) -> tuple[HeaderMatch, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        c.bad(p, "must be a list of {name, value or pattern}")
        return ()
    out = []
    for i, h in enumerate(raw):
        where = f"{p}[{i}]"
        if not isinstance(h, dict) or not isinstance(h.get("name"), str) or not h["name"]:
            c.bad(where, "must be a mapping with a name (and value or pattern)")
            continue
        c.unknown(h, where + ".", HEADER_MATCH)
        value = h.get("value")
        if value is not None and not isinstance(value, str):
            c.bad(where + ".value", "must be a string")
            value = None
        pat = regex(c, h["pattern"], where + ".pattern") if "pattern" in h else None
        out.append(HeaderMatch(h["name"].lower(), value, pat))
    return tuple(out)


def _match(c: Checker, raw: Any, p: str) -> Match | None:
    if not isinstance(raw, dict):
        c.bad(p, "must be a mapping (path_prefix, path_exact, path_regex, methods, headers)")
        return None
    c.unknown(raw, p + ".", MATCH)
    prefix = _path(c, raw["path_prefix"], p + ".path_prefix") if "path_prefix" in raw else None
    exact = _path(c, raw["path_exact"], p + ".path_exact") if "path_exact" in raw else None
    rx = regex(c, raw["path_regex"], p + ".path_regex") if "path_regex" in raw else None
    methods = raw.get("methods", [])
    if not isinstance(methods, list) or not all(isinstance(m, str) and m for m in methods):
        c.bad(p + ".methods", "must be a list of method names")
        methods = []
    headers = _headers(c, raw.get("headers"), p + ".headers")
    return Match(prefix, exact, rx, tuple(m.upper() for m in methods), headers)


def parse_targets(
    c: Checker, raw: dict, p: str, host: str, mode: Mode
) -> tuple[Backend | None, Split | None, tuple[RouteRule, ...]]:
    """A route's backend (the first of a split), its split (None: one backend) and rules."""
    backend, split = _split(c, raw, p, mode, f"{host}/backends")
    rules_raw = raw.get("rules", [])
    if not isinstance(rules_raw, list):
        c.bad(p + ".rules", "must be a list of {match, backend or backends}")
        return backend, split, ()
    rules = []
    for k, r in enumerate(rules_raw):
        where = f"{p}.rules[{k}]"
        if not isinstance(r, dict):
            c.bad(where, "must be a mapping with match and backend or backends")
            continue
        c.unknown(r, where + ".", RULE)
        m = _match(c, r.get("match"), where + ".match")
        b, s = _split(c, r, where, mode, f"{host}/rules[{k}]")
        if m is not None and b is not None:
            rules.append(RouteRule(m, s or Split((f"{host}/rules[{k}]",), (b,), (1,))))
    return backend, split, tuple(rules)
