"""The L7 settings of terminate and bridge routes (the edge decrypts, so it can route on the
path, add HSTS, rate-limit, cap bodies, ask for client certificates, rewrite headers and
apply WAF rules). Each key has its own small check; all problems are reported at once."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from meshcar.common.config import Checker
from meshcar.common.schema import Section
from meshcar.common.traffic import parse_traffic
from meshcar.edge.routes.base import (
    CLIENT_AUTH,
    DENY,
    DENY_HEADER,
    RATE_LIMIT,
    ROUTE_HEADERS,
    TLS,
    ClientAuth,
    DenyRule,
    RateLimit,
    check_number,
)

Kw = dict[str, Any]
TRAFFIC_SECTIONS = ("timeouts", "retries", "outlier", "circuit")


def regex(c: Checker, val: Any, path: str) -> re.Pattern[str] | None:
    if not isinstance(val, str):
        c.bad(path, "must be a regular expression string")
        return None
    try:
        return re.compile(val)
    except re.error as exc:
        c.bad(path, f"invalid regular expression: {exc}")
        return None


def _tls(c: Checker, raw: dict, p: str, kw: Kw) -> None:
    tls = raw.get("tls")
    if not isinstance(tls, dict):
        c.bad(p + ".tls", "terminate and bridge routes need tls: {cert, key}")
        return
    c.unknown(tls, p + ".tls.", TLS)
    kw["cert_file"] = c.path(tls, "cert", p + ".tls.cert")
    kw["key_file"] = c.path(tls, "key", p + ".tls.key")


def _paths(c: Checker, raw: dict, p: str, kw: Kw) -> None:
    for name in ("path_prefix", "path_exact"):
        if name not in raw:
            continue
        if not isinstance(raw[name], str) or not raw[name].startswith("/"):
            c.bad(f"{p}.{name}", "must start with /")
        else:
            kw[name] = raw[name]


def _hsts(c: Checker, raw: dict, p: str, kw: Kw) -> None:
    hsts = raw.get("hsts")
    if hsts is True:
        kw["hsts"] = "max-age=31536000; includeSubDomains"
    elif isinstance(hsts, str) and hsts.startswith("max-age="):
        kw["hsts"] = hsts
    elif hsts not in (None, False):
        c.bad(p + ".hsts", "must be true or a Strict-Transport-Security value (max-age=...)")


def _subsection(c: Checker, raw: dict, p: str, name: str, shape: str, keys: Section) -> dict | None:
    """raw[name], an optional mapping of `keys` (others reported); None when absent or not
    a mapping (then reported as not `shape`)."""
    sub = raw.get(name)
    if sub is None:
        return None
    if not isinstance(sub, dict):
        c.bad(f"{p}.{name}", f"must be {shape}")
        return None
    c.unknown(sub, f"{p}.{name}.", keys)
    return sub


def _rate_limit(c: Checker, raw: dict, p: str, kw: Kw) -> None:
    rl = _subsection(c, raw, p, "rate_limit", "{per_second, burst}", RATE_LIMIT)
    if rl is None:
        return
    ps = check_number(c, rl.get("per_second"), p + ".rate_limit.per_second", minimum=0.001)
    burst = check_number(c, rl.get("burst", 1), p + ".rate_limit.burst", minimum=1, integer=True)
    if ps and burst:
        kw["rate_limit"] = RateLimit(float(ps), int(burst))


def _max_body(c: Checker, raw: dict, p: str, kw: Kw) -> None:
    if "max_body_bytes" in raw:
        kw["max_body_bytes"] = check_number(
            c, raw["max_body_bytes"], p + ".max_body_bytes", minimum=0, integer=True
        )


def _traffic(c: Checker, raw: dict, p: str, kw: Kw) -> None:
    """timeouts, retries, outlier, circuit: the keys and checker of an upstream's (sidecar)."""
    given = {k: raw[k] for k in TRAFFIC_SECTIONS if k in raw}
    if not given:
        return
    t = parse_traffic(c, given, p)
    kw["per_try_timeout"], kw["request_timeout"] = t.timeouts.per_try, t.timeouts.request
    sub = given.get("timeouts")
    more = isinstance(sub, dict) and ("connect_seconds" in sub or "idle_seconds" in sub)
    if more or len(given) > ("timeouts" in given):  # more than per-try/request timeouts
        kw["traffic"] = t


def _client_auth(c: Checker, raw: dict, p: str, kw: Kw) -> None:
    ca = raw.get("client_auth")
    if ca is None:
        return
    if not isinstance(ca, dict) or ca.get("mode") not in ("optional", "required"):
        c.bad(p + ".client_auth", "must be {mode: optional|required, ca: FILE}")
        return
    c.unknown(ca, p + ".client_auth.", CLIENT_AUTH)
    ca_file = c.path(ca, "ca", p + ".client_auth.ca")
    if ca_file is not None:
        kw["client_auth"] = ClientAuth(ca["mode"], ca_file)


def _single_line_map(add: Any) -> bool:
    return isinstance(add, dict) and all(
        isinstance(k, str) and isinstance(v, str) and "\n" not in v and "\r" not in v
        for k, v in add.items()
    )


def _headers(c: Checker, raw: dict, p: str, kw: Kw) -> None:
    hdrs = raw.get("headers")
    if hdrs is None:
        return
    if not isinstance(hdrs, dict):
        c.bad(p + ".headers", "must be {add: {NAME: VALUE}, remove: [NAME]}")
        return
    c.unknown(hdrs, p + ".headers.", ROUTE_HEADERS)
    add = hdrs.get("add", {}) or {}
    if not _single_line_map(add):
        c.bad(p + ".headers.add", "must map header names to single-line strings")
    else:
        kw["add_headers"] = tuple(add.items())
    rem = hdrs.get("remove", []) or []
    if not isinstance(rem, list) or not all(isinstance(x, str) for x in rem):
        c.bad(p + ".headers.remove", "must be a list of header names")
    else:
        kw["remove_headers"] = tuple(x.lower() for x in rem)


def _deny_header(c: Checker, hd: Any, dp: str) -> tuple[str, re.Pattern[str]] | None:
    if not isinstance(hd, dict) or "name" not in hd or "pattern" not in hd:
        c.bad(dp, "must be {name, pattern}")
        return None
    c.unknown(hd, dp + ".", DENY_HEADER)
    pat = regex(c, hd["pattern"], dp + ".pattern")
    return None if pat is None else (str(hd["name"]).lower(), pat)


def _deny_rule(c: Checker, d: Any, dp: str, j: int) -> DenyRule | None:
    if not isinstance(d, dict) or not d:
        c.bad(dp, "must be a mapping with methods, path and/or header")
        return None
    c.unknown(d, dp + ".", DENY)
    methods = d.get("methods", [])
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        c.bad(dp + ".methods", "must be a list of methods")
        methods = []
    path_re = regex(c, d["path"], dp + ".path") if "path" in d else None
    header = _deny_header(c, d["header"], dp + ".header") if "header" in d else None
    return DenyRule(
        tuple(m.upper() for m in methods), path_re, header, str(d.get("name", f"deny[{j}]"))
    )


def _deny(c: Checker, raw: dict, p: str, kw: Kw) -> None:
    deny = raw.get("deny", []) or []
    rules: list[DenyRule] = []
    if not isinstance(deny, list):
        c.bad(p + ".deny", "must be a list of rules")
    else:
        for j, d in enumerate(deny):
            rule = _deny_rule(c, d, f"{p}.deny[{j}]", j)
            if rule is not None:
                rules.append(rule)
    kw["deny"] = tuple(rules)


def _http2(c: Checker, raw: dict, p: str, kw: Kw) -> None:
    value = raw.get("http2", False)
    if not isinstance(value, bool):
        c.bad(p + ".http2", "must be true or false")
    elif value:
        kw["http2"] = True


# One check per L7 key (or group of keys), in the order problems are reported.
L7_CHECKS: tuple[Callable[[Checker, dict, str, Kw], None], ...] = (
    _tls,
    _paths,
    _hsts,
    _http2,
    _rate_limit,
    _max_body,
    _traffic,
    _client_auth,
    _headers,
    _deny,
)


def parse_l7(c: Checker, raw: dict, p: str) -> Kw:
    """The keyword arguments of a terminate or bridge route beyond host and backend."""
    if "proxy_protocol" in raw:
        c.bad(p + ".proxy_protocol", "only passthrough routes send a PROXY header")
    if "source_address" in raw:
        c.bad(p + ".source_address", "only passthrough routes set their backend source address")
    kw: Kw = {}
    for check in L7_CHECKS:
        check(c, raw, p, kw)
    return kw
