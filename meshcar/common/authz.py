"""L7 authorization: rules of caller identity x host x method x normalised path.

Theory of operation
-------------------
A rule (`inbound.policies[i]`) names who may call what: `from` (SPIFFE IDs, `spiffe://td/a/*`
for every ID under a path, or `*` for any mesh identity), `hosts` (exact, or `*.example.com`
for any name below it; the Host header's name, port dropped), `methods`, `paths` (exact, or
a prefix written with a trailing `*`; matched on the request's *normalised* path, the one
`proto/path.py` made and the app receives, so `/a/../admin` and `/%2e%2e/admin` are
`/admin` here too) and a `mode`. An empty or absent dimension matches everything. The old
`inbound.allow` list is one more rule, identity only, named `inbound.allow`.

The decision: the first `enforce` rule that matches allows the request. Otherwise it is
denied (default deny: as soon as any rule or allow list exists, what no rule allows is
refused) -- unless an `audit` rule names the caller in its `from`: then the request is
allowed and counted and logged as `would_deny` by that rule (the dry run of a rule you are
about to enforce: its callers keep working while you read what it would refuse). A request
an audit rule fully matches is allowed and attributed to it.

Unauthenticated callers (`inbound.permissive`: plaintext HTTP on the mesh port, no
certificate) are the caller `unauthenticated`. Only a rule whose `from` names the literal
`unauthenticated` can admit them: `*`, a SPIFFE ID and a `spiffe://td/x/*` pattern are
identity rules and never match them (Istio's PERMISSIVE: both are accepted, then every
principal-based rule requires mTLS), and neither does the allow list.

The deny reason is a fixed word, so the metric's labels stay bounded: `no_identity` (the
caller's certificate was refused), `unauthenticated` (a plaintext caller and no rule names
`unauthenticated`), `caller` (no rule names the caller), else the first
dimension that did not match in the rule that named the caller and matched furthest:
`host`, `method` or `path`.

Speed: rules are compiled when the config is loaded; a request costs one dict lookup by
caller ID (its candidate rules, in config order, cached per caller) and a walk of that
short list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from meshcar.common.config import Checker
from meshcar.common.schema import STRING, ListOf, Section, key, one_of
from meshcar.errors import IdentityError
from meshcar.identity.spiffe import SpiffeId
from meshcar.proto.path import PathError, normalise_path

__all__ = [
    "ALLOW_RULE",
    "AUTHZ_RULE",
    "REASONS",
    "UNAUTHENTICATED",
    "Authorizer",
    "Rule",
    "Verdict",
    "parse_policies",
]

AUTHZ_RULE = Section(
    "An authorization rule: who (from) may call which hosts, methods and paths",
    {
        "name": key(
            STRING, "the rule's name: in the deny reason, the metric and explain", required=True
        ),
        "from": key(
            ListOf(STRING),
            "caller SPIFFE IDs: exact, spiffe://td/path/* (every ID under it), * (any mesh "
            "identity) or unauthenticated (plaintext callers, inbound.permissive)",
            ["*"],
        ),
        "hosts": key(ListOf(STRING), "Host names (port dropped): exact or *.domain; [] any", []),
        "methods": key(ListOf(STRING), "HTTP methods (GET, POST, ...); [] any", []),
        "paths": key(
            ListOf(STRING),
            "normalised paths: exact (/healthz) or prefix with a trailing * (/api/*); [] any",
            [],
        ),
        "mode": key(
            one_of("enforce", "audit"),
            "enforce, or audit: what it would deny is allowed, logged and counted as would_deny",
            "enforce",
        ),
    },
)
ALLOW_RULE = "inbound.allow"  # the name of the rule the allow list becomes
UNAUTHENTICATED = "unauthenticated"  # the caller name of a plaintext caller (inbound.permissive)
# every deny reason there is
REASONS = ("no_identity", "unauthenticated", "caller", "host", "method", "path")
_DIMENSIONS = ("host", "method", "path")
_MAX_CACHED_CALLERS = 4096
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # RFC 9110 token: a method name


@dataclass(frozen=True)
class Rule:
    name: str
    callers: tuple[str, ...] = ("*",)  # exact IDs, "spiffe://td/x/*" prefixes, or "*"
    hosts: tuple[str, ...] = ()  # exact names or "*.domain"
    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()  # exact paths or prefixes ending in "*"
    mode: str = "enforce"

    def names_caller(self, caller: str) -> bool:
        return any(_caller_matches(p, caller) for p in self.callers)

    def first_miss(self, host: str, method: str, path: str) -> str | None:
        """The first dimension this request does not match (None: it matches)."""
        if self.hosts and not any(_host_matches(h, host) for h in self.hosts):
            return "host"
        if self.methods and method not in self.methods:
            return "method"
        if self.paths and not any(_path_matches(p, path) for p in self.paths):
            return "path"
        return None

    def table(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "from": list(self.callers),
            "hosts": list(self.hosts) or ["*"],
            "methods": list(self.methods) or ["*"],
            "paths": list(self.paths) or ["*"],
            "mode": self.mode,
        }


def _caller_matches(pattern: str, caller: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("/*"):
        return caller.startswith(pattern[:-1])
    return caller == pattern


def _host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def _path_matches(pattern: str, path: str) -> bool:
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    return path == pattern


@dataclass(frozen=True)
class Verdict:
    """What the authorizer decided: allow, deny or would_deny (allowed by an audit rule's dry
    run); the rule that decided ("default" when none did) and, unless allowed, why."""

    decision: str
    policy: str
    reason: str = ""  # one of REASONS, "" when allowed
    detail: str = ""  # a sentence for the 403 body and explain

    @property
    def allowed(self) -> bool:
        return self.decision != "deny"


class Authorizer:
    """The compiled rules of one listener (see the module docstring)."""

    def __init__(self, allow: tuple[str, ...] | list[str], rules: tuple[Rule, ...] = ()) -> None:
        self.rules: tuple[Rule, ...] = ((Rule(ALLOW_RULE, tuple(allow)),) if allow else ()) + tuple(
            rules
        )
        self._exact: dict[str, list[Rule]] = {}
        self._patterned: list[Rule] = []
        for r in self.rules:
            for p in r.callers:
                if p == "*" or p.endswith("/*"):
                    if r not in self._patterned:
                        self._patterned.append(r)
                else:
                    self._exact.setdefault(p, []).append(r)
        self._cache: dict[str, tuple[Rule, ...]] = {}
        self._allowed = {r.name: Verdict("allow", r.name) for r in self.rules}  # made once

    def candidates(self, caller: str) -> tuple[Rule, ...]:
        """The rules that name `caller`, in config order (one dict lookup once cached)."""
        found = self._cache.get(caller)
        if found is None and caller == UNAUTHENTICATED:  # only a rule naming it, no pattern
            found = self._cache[caller] = tuple(self._exact.get(caller, ()))
        if found is None:
            mine = set(map(id, self._exact.get(caller, ())))
            mine |= {id(r) for r in self._patterned if r.names_caller(caller)}
            found = tuple(r for r in self.rules if id(r) in mine)
            if len(self._cache) >= _MAX_CACHED_CALLERS:
                self._cache.clear()
            self._cache[caller] = found
        return found

    def decide(self, caller: str | None, host: str, method: str, path: str) -> Verdict:
        if caller is None:
            return Verdict("deny", "default", "no_identity", "the caller has no valid identity")
        host = _host_name(host)
        best: tuple[int, Rule, str] | None = None
        audit_named: Rule | None = None  # the first audit rule naming the caller
        for r in self.candidates(caller):
            miss = r.first_miss(host, method, path)
            if miss is None:
                return self._allowed[r.name]  # enforce, or an audit rule that would allow
            if r.mode == "audit" and audit_named is None:
                audit_named = r
            depth = _DIMENSIONS.index(miss)
            if best is None or depth > best[0]:
                best = (depth, r, miss)
        if best is None and caller == UNAUTHENTICATED:
            reason, policy = UNAUTHENTICATED, "default"
            detail = "no rule admits unauthenticated (plaintext) callers"
        elif best is None:
            reason, policy = "caller", "default"
            detail = f"no rule allows {caller}"
        else:
            _, rule, reason = best
            policy = rule.name
            what = {"host": host, "method": method, "path": path}[reason]
            detail = f"{reason} {what!r} is not allowed to {caller} (closest rule: {rule.name})"
        if audit_named is not None:
            return Verdict("would_deny", audit_named.name, reason, detail)
        return Verdict("deny", policy, reason, detail)

    def table(self) -> list[dict[str, Any]]:
        return [r.table() for r in self.rules]


def _host_name(host: str) -> str:
    """The Host header's name, lowercased, without its port ([v6]:port too)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _callers(c: Checker, raw: Any, p: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        c.bad(p, "must be a non-empty list of SPIFFE IDs, spiffe://td/path/*, * or unauthenticated")
        return ()
    out = []
    for i, v in enumerate(raw):
        where = f"{p}[{i}]"
        if v in ("*", UNAUTHENTICATED):
            out.append(v)
            continue
        if not isinstance(v, str):
            c.bad(where, "must be a SPIFFE ID, spiffe://td/path/*, * or unauthenticated")
            continue
        base = v[:-2] if v.endswith("/*") else v
        try:
            norm = str(SpiffeId.parse(base))
        except IdentityError as exc:
            c.bad(where, str(exc))
            continue
        if "*" in base:
            c.bad(where, "* only as the whole value or a last path segment (spiffe://td/ns/*)")
            continue
        out.append(norm + "/*" if v.endswith("/*") else norm)
    return tuple(out)


def _strings(c: Checker, raw: Any, p: str) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(v, str) and v for v in raw):
        c.bad(p, "must be a list of non-empty strings")
        return []
    return raw


def _hosts(c: Checker, raw: Any, p: str) -> tuple[str, ...]:
    out = []
    for i, h in enumerate(_strings(c, raw, p)):
        name = h.lower()
        bare = name[2:] if name.startswith("*.") else name
        if not bare or "*" in bare or ":" in bare or "/" in bare:
            c.bad(f"{p}[{i}]", "must be a host name (no port) or *.domain")
            continue
        out.append(name)
    return tuple(out)


def _methods(c: Checker, raw: Any, p: str) -> tuple[str, ...]:
    out = []
    for i, m in enumerate(_strings(c, raw, p)):
        if not _TOKEN.fullmatch(m):
            c.bad(f"{p}[{i}]", "must be an HTTP method name such as GET")
            continue
        out.append(m.upper())
    return tuple(out)


def _paths(c: Checker, raw: Any, p: str) -> tuple[str, ...]:
    out = []
    for i, v in enumerate(_strings(c, raw, p)):
        where = f"{p}[{i}]"
        body = v[:-1] if v.endswith("*") else v
        if not body.startswith("/") or "*" in body or "?" in body:
            c.bad(where, "must be a path (/x) or a prefix ending in * (/api/*), no query")
            continue
        try:
            norm = normalise_path(body)
        except PathError as exc:
            c.bad(where, str(exc))
            continue
        if norm != body:
            c.bad(where, f"is not a normalised path (requests are matched as {norm!r})")
            continue
        out.append(v)
    return tuple(out)


def _rule(c: Checker, raw: Any, p: str, seen: set[str]) -> Rule | None:
    if not isinstance(raw, dict):
        c.bad(p, "must be a mapping with a name (and from, hosts, methods, paths, mode)")
        return None
    c.unknown(raw, p + ".", AUTHZ_RULE)
    name = raw.get("name")
    if not isinstance(name, str) or not name or name in (ALLOW_RULE, "default"):
        c.bad(p + ".name", "must be a non-empty name other than inbound.allow and default")
        name = None
    elif name in seen:
        c.bad(p + ".name", f"rule name {name!r} is used twice")
    else:
        seen.add(name)
    mode = raw.get("mode", "enforce")
    if mode not in ("enforce", "audit"):
        c.bad(p + ".mode", "must be enforce or audit")
    callers = _callers(c, raw.get("from", ["*"]), p + ".from")
    hosts = _hosts(c, raw.get("hosts"), p + ".hosts")
    methods = _methods(c, raw.get("methods"), p + ".methods")
    paths = _paths(c, raw.get("paths"), p + ".paths")
    if name is None or not callers:
        return None
    return Rule(name, callers, hosts, methods, paths, str(mode))


def parse_policies(c: Checker, raw: Any, where: str) -> tuple[Rule, ...]:
    """`where` (e.g. inbound.policies): the rules, every problem reported to `c`."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        c.bad(where, "must be a list of rules {name, from, hosts, methods, paths, mode}")
        return ()
    seen: set[str] = set()
    rules = [_rule(c, r, f"{where}[{i}]", seen) for i, r in enumerate(raw)]
    return tuple(r for r in rules if r is not None)
