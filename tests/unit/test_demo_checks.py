"""The `meshcar demo --check` table: PASS/FAIL/SKIP logic, rendering, exit code."""

from __future__ import annotations

from pathlib import Path

from meshcar.demo import scenario as sc
from meshcar.demo.app import parse_xfcc, peer_from_xfcc
from meshcar.demo.checks import (
    NOT_IMPLEMENTED,
    Check,
    CheckFailed,
    DemoEnv,
    Status,
    all_checks,
    edge_checks,
    exit_code,
    header_values,
    render_table,
    run_checks,
)
from meshcar.demo.plan import DemoPaths, PublicCerts

ENV = DemoEnv(sc.SCENARIO, DemoPaths(Path("/d")), PublicCerts(*(Path("/x"),) * 6))


def _ok(env: DemoEnv) -> str:
    return "fine"


def _fails(env: DemoEnv) -> str:
    raise CheckFailed("payments saw caller None")


def _crashes(env: DemoEnv) -> str:
    raise ConnectionRefusedError("connection refused")


def test_statuses_and_details() -> None:
    results = run_checks(
        [
            Check("1", "ok", _ok),
            Check("2", "bad", _fails),
            Check("3", "boom", _crashes),
            Check("4", "later"),
        ],
        ENV,
    )
    assert [r.status for r in results] == [Status.PASS, Status.FAIL, Status.FAIL, Status.SKIP]
    assert results[1].detail == "payments saw caller None"
    assert results[2].detail == "ConnectionRefusedError: connection refused"
    assert results[3].detail == NOT_IMPLEMENTED


def test_exit_code_is_nonzero_on_any_failure_only() -> None:
    assert exit_code(run_checks([Check("1", "ok", _ok), Check("2", "later")], ENV)) == 0
    assert exit_code(run_checks([Check("1", "ok", _ok), Check("2", "bad", _fails)], ENV)) == 1
    assert exit_code(run_checks([Check("3", "boom", _crashes)], ENV)) == 1


def test_table_shows_skips_as_not_implemented_never_as_passing() -> None:
    table = render_table(
        run_checks([Check("1", "ok", _ok), Check("2", "later"), Check("3", "bad", _fails)], ENV)
    )
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["RESULT", "#", "EXPECTATION"]
    row = {line.split("  ")[0].strip(): line for line in lines[2:5]}
    assert "later" in row["SKIP (not implemented)"]
    assert "ok" in row["PASS"] and "bad" in row["FAIL"]
    assert lines[-1] == "1 passed, 1 failed, 1 not implemented (skipped, not passed)"


def test_all_ten_scenario_items_have_an_edge_row() -> None:
    refs = [c.ref for c in edge_checks()]
    assert refs == [str(i) for i in range(1, 11)]
    # Every SCENARIO.md item now has a check function (none is shown as a skip any more).
    assert all(c.fn is not None for c in edge_checks())
    mesh = [c for c in all_checks() if c.fn is not None]
    assert {c.ref for c in mesh} >= {"4 mesh", "5 mesh", "8 mesh", "9 mesh"}


def test_header_values_reads_every_duplicate() -> None:
    doc = {"headers": ["Host: api", "X-Forwarded-Client-Cert: a", "x-forwarded-client-cert: b"]}
    assert header_values(doc, "X-Forwarded-Client-Cert") == ["a", "b"]
    assert header_values(doc, "missing") == []


def test_xfcc_parsing_envoy_format() -> None:
    value = "By=spiffe://meshcar.demo/svc/api;Hash=abc;URI=spiffe://meshcar.demo/svc/web"
    assert parse_xfcc(value) == [
        {
            "By": "spiffe://meshcar.demo/svc/api",
            "Hash": "abc",
            "URI": "spiffe://meshcar.demo/svc/web",
        }
    ]
    two = 'By=a;URI=spiffe://td/one,Subject="CN=x, O=y;z";URI=spiffe://td/two'
    assert parse_xfcc(two) == [
        {"By": "a", "URI": "spiffe://td/one"},
        {"Subject": "CN=x, O=y;z", "URI": "spiffe://td/two"},
    ]
    assert peer_from_xfcc([two]) == "spiffe://td/two"
    assert peer_from_xfcc(["By=a;Hash=b"]) is None
    assert peer_from_xfcc([]) is None
