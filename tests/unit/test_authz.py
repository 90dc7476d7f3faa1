"""L7 authorization rules (common/authz.py): each dimension, default deny, audit mode, the
config checker (every problem at once, with file and key)."""

from __future__ import annotations

import pytest

from meshcar.common.authz import REASONS, UNAUTHENTICATED, Authorizer, Rule
from meshcar.errors import ConfigError
from meshcar.sidecar.config import load_config_text
from tests.unit.test_sidecar_config import GOOD

TD = "spiffe://meshcar.demo"
WEB, JOB, ADMIN = f"{TD}/svc/web", f"{TD}/ns/batch/sa/job", f"{TD}/svc/admin"

RULES = (
    Rule("web-read", (WEB,), ("api", "*.api.test"), ("GET", "HEAD"), ("/v1/*", "/healthz")),
    Rule("batch", (f"{TD}/ns/batch/*",), (), ("POST",), ("/jobs",)),
    Rule("admin-all", (ADMIN,)),
)


def az(*extra: Rule, allow: tuple[str, ...] = ()) -> Authorizer:
    return Authorizer(allow, RULES + extra)


@pytest.mark.parametrize(
    ("caller", "host", "method", "path", "decision", "policy", "reason"),
    [
        (WEB, "api", "GET", "/v1/items", "allow", "web-read", ""),
        (WEB, "API:8080", "GET", "/v1/items", "allow", "web-read", ""),  # port dropped, case
        (WEB, "x.api.test", "HEAD", "/healthz", "allow", "web-read", ""),  # wildcard host
        (WEB, "api.test", "GET", "/healthz", "deny", "web-read", "host"),  # *.x is not x
        (WEB, "evil.test", "GET", "/v1/items", "deny", "web-read", "host"),
        (WEB, "api", "DELETE", "/v1/items", "deny", "web-read", "method"),
        (WEB, "api", "GET", "/admin", "deny", "web-read", "path"),
        (WEB, "api", "GET", "/v1", "deny", "web-read", "path"),  # prefix /v1/ only
        (WEB, "api", "GET", "/healthz/x", "deny", "web-read", "path"),  # exact
        (JOB, "any", "POST", "/jobs", "allow", "batch", ""),  # pattern caller
        (f"{TD}/ns/batchx/sa/j", "any", "POST", "/jobs", "deny", "default", "caller"),
        (JOB, "any", "GET", "/jobs", "deny", "batch", "method"),
        (ADMIN, "h", "PATCH", "/anything", "allow", "admin-all", ""),
        (f"{TD}/svc/nobody", "api", "GET", "/v1/x", "deny", "default", "caller"),
        (None, "api", "GET", "/v1/x", "deny", "default", "no_identity"),
    ],
)
def test_each_dimension(caller, host, method, path, decision, policy, reason) -> None:
    v = az().decide(caller, host, method, path)
    assert (v.decision, v.policy, v.reason) == (decision, policy, reason), v
    assert v.reason in REASONS + ("",)


def test_allow_list_is_the_identity_only_rule_and_first_match_decides() -> None:
    a = az(allow=(WEB,))
    v = a.decide(WEB, "api", "DELETE", "/admin")
    assert (v.decision, v.policy) == ("allow", "inbound.allow")
    assert a.table()[0] == {
        "name": "inbound.allow",
        "from": [WEB],
        "hosts": ["*"],
        "methods": ["*"],
        "paths": ["*"],
        "mode": "enforce",
    }
    assert Authorizer((), ()).decide(WEB, "a", "GET", "/").decision == "deny"  # nothing: deny


def test_closest_rule_names_the_reason() -> None:
    """Two rules name the caller: the reason comes from the one that matched furthest."""
    a = Authorizer((), (Rule("h", (WEB,), ("other",)), Rule("m", (WEB,), (), ("GET",), ("/a",))))
    v = a.decide(WEB, "api", "GET", "/b")
    assert (v.decision, v.policy, v.reason) == ("deny", "m", "path")
    assert "'/b'" in v.detail and WEB in v.detail


def test_audit_rule_allows_what_it_would_deny_and_says_so() -> None:
    trial = Rule("web-trial", (WEB,), (), ("GET",), ("/v2/*",), "audit")
    a = Authorizer((), (trial, Rule("job", (JOB,))))
    v = a.decide(WEB, "api", "POST", "/v2/x")
    assert (v.decision, v.policy, v.reason, v.allowed) == (
        "would_deny",
        "web-trial",
        "method",
        True,
    )
    v = a.decide(WEB, "api", "GET", "/v2/x")
    assert (v.decision, v.policy, v.allowed) == ("allow", "web-trial", True)
    # an audit rule does not open the door to callers it does not name
    v = a.decide(ADMIN, "api", "GET", "/v2/x")
    assert (v.decision, v.reason, v.allowed) == ("deny", "caller", False)


def test_callers_are_looked_up_once_and_cached_bounded() -> None:
    a = az()
    assert a.candidates(WEB) is a.candidates(WEB)
    assert [r.name for r in a.candidates(JOB)] == ["batch"]
    for i in range(5000):
        a.candidates(f"{TD}/svc/n{i}")
    assert len(a._cache) <= 4096


POLICIES = """
  policies:
    - name: read
      from: [spiffe://meshcar.demo/svc/web, spiffe://meshcar.demo/ns/batch/*]
      hosts: [api, "*.api.test"]
      methods: [get, HEAD]
      paths: [/v1/*, /healthz]
    - {name: dry, from: ["*"], paths: [/x], mode: audit}
"""


def test_config_policies_load() -> None:
    text = GOOD.replace("  allow: [spiffe://meshcar.demo/svc/web]\n", POLICIES)
    cfg = load_config_text(text, "s.yaml")
    read, dry = cfg.policies
    assert read.methods == ("GET", "HEAD") and read.hosts == ("api", "*.api.test")
    assert read.callers[1] == "spiffe://meshcar.demo/ns/batch/*"
    assert (dry.mode, dry.callers, dry.paths) == ("audit", ("*",), ("/x",))


def test_bad_policies_are_all_reported_with_file_and_key() -> None:
    bad = """
  policies:
    - name: a
      from: [spiffe://other domain/x, "spiffe://td/a*b"]
      hosts: ["api:80", "*"]
      methods: ["GE T"]
      paths: [/a/../b, relative, "/a/*/b", "/q?x"]
      mode: record
      colour: red
    - {name: a, from: []}
    - nope
    - {from: ["*"]}
"""
    text = GOOD.replace("  allow: [spiffe://meshcar.demo/svc/web]\n", bad)
    with pytest.raises(ConfigError) as ei:
        load_config_text(text, "s.yaml")
    problems = ei.value.problems
    want = [
        "s.yaml: inbound.policies[0].from[0]:",
        "s.yaml: inbound.policies[0].from[1]:",
        "s.yaml: inbound.policies[0].hosts[0]:",
        "s.yaml: inbound.policies[0].hosts[1]:",
        "s.yaml: inbound.policies[0].methods[0]:",
        "s.yaml: inbound.policies[0].paths[0]: is not a normalised path (requests are matched "
        "as '/b')",
        "s.yaml: inbound.policies[0].paths[1]:",
        "s.yaml: inbound.policies[0].paths[2]:",
        "s.yaml: inbound.policies[0].paths[3]:",
        "s.yaml: inbound.policies[0].mode:",
        "s.yaml: inbound.policies[0].colour: unknown key",
        "s.yaml: inbound.policies[1].name: rule name 'a' is used twice",
        "s.yaml: inbound.policies[1].from:",
        "s.yaml: inbound.policies[2]: must be a mapping",
        "s.yaml: inbound.policies[3].name:",
    ]
    for w in want:
        assert any(p.startswith(w) for p in problems), (w, problems)
    assert len(problems) == len(want), problems


def test_unauthenticated_matches_only_a_rule_naming_it() -> None:
    """inbound.permissive's plaintext callers: `*`, patterns and the allow list are identity
    rules and never match; a rule naming `unauthenticated` does, dimensions and audit too."""
    anyone = Rule("any-mesh", ("*",))
    v = az(anyone, Rule("td", (f"{TD}/*",)), allow=(WEB,)).decide(
        UNAUTHENTICATED, "api", "GET", "/v1/items"
    )
    assert (v.decision, v.policy, v.reason) == ("deny", "default", "unauthenticated")
    legacy = Rule("legacy", (UNAUTHENTICATED,), (), ("GET",), ("/pub/*",))
    a = az(anyone, legacy)
    assert a.decide(UNAUTHENTICATED, "api", "GET", "/pub/x").policy == "legacy"
    v = a.decide(UNAUTHENTICATED, "api", "POST", "/pub/x")
    assert (v.decision, v.policy, v.reason) == ("deny", "legacy", "method")
    trial = az(Rule("trial", (UNAUTHENTICATED,), (), (), ("/pub/*",), "audit"))
    v = trial.decide(UNAUTHENTICATED, "api", "GET", "/private")
    assert (v.decision, v.policy, v.reason) == ("would_deny", "trial", "path")
    assert [r.name for r in a.candidates(UNAUTHENTICATED)] == ["legacy"]
