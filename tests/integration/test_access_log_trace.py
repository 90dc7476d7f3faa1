"""Access-log lines and trace context through a real sidecar pair (mTLS on loopback): the
request id propagated from the app or generated, passed to the peer and to its app;
`traceparent` with a new span per hop (trace id kept); an RFC 3339 timestamp on every line;
a reason on every non-2xx line; `access_log.fields` (issue 15)."""

from __future__ import annotations

import datetime as dt
import json
import re

import httpx
import pytest

from meshcar.common import accesslog
from meshcar.proto.trace import parse_traceparent, stamp
from tests.integration.conftest import Mesh

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def _lines(capsys) -> list[dict]:
    accesslog.flush()
    return [
        json.loads(x)
        for x in capsys.readouterr().out.splitlines()
        if x.startswith("{") and '"type":"request"' in x
    ]


def _app_headers(resp: httpx.Response) -> dict[str, str]:
    return {k.lower(): v for k, v in resp.json()["headers"]}


async def _get(mesh: Mesh, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    proxy = f"http://127.0.0.1:{mesh.client.outbound_port}"
    async with httpx.AsyncClient(proxy=proxy, timeout=10) as c:
        return await c.get(f"http://api{path}", headers=headers)


async def test_request_id_and_traceparent_across_two_hops(mesh: Mesh, capsys) -> None:
    capsys.readouterr()
    r = await _get(
        mesh, "/x", {"x-request-id": "app-req-1", "traceparent": f"00-{TRACE}-{CALLER_SPAN}-01"}
    )
    assert r.status_code == 200
    seen = _app_headers(r)
    assert seen["x-request-id"] == "app-req-1"  # the app's id, all the way to the peer's app
    tid, parent, flags = parse_traceparent(seen["traceparent"].encode())  # type: ignore[misc]
    assert (tid.decode(), flags) == (TRACE, b"01")
    logs = {x["direction"]: x for x in _lines(capsys)}
    out, inb = logs["outbound"], logs["inbound"]
    assert out["request_id"] == inb["request_id"] == "app-req-1"
    assert out["trace_id"] == inb["trace_id"] == TRACE
    assert out["parent_span_id"] == CALLER_SPAN  # the app's span
    assert inb["parent_span_id"] == out["span_id"]  # the outbound's span, one hop on
    assert parent.decode() == inb["span_id"] != out["span_id"]  # the app sees the inbound's
    assert re.fullmatch(r"[0-9a-f]{16}", out["span_id"])


async def test_request_id_and_trace_generated_when_absent(mesh: Mesh, capsys) -> None:
    capsys.readouterr()
    r = await _get(mesh, "/y")
    seen = _app_headers(r)
    assert re.fullmatch(r"[0-9a-f]{32}", seen["x-request-id"])
    logs = {x["direction"]: x for x in _lines(capsys)}
    assert logs["outbound"]["request_id"] == logs["inbound"]["request_id"] == seen["x-request-id"]
    assert logs["outbound"]["parent_span_id"] is None  # this hop began the trace
    assert logs["inbound"]["trace_id"] == logs["outbound"]["trace_id"]
    assert seen["traceparent"].split("-")[1] == logs["outbound"]["trace_id"]


async def test_timestamp_is_rfc3339_utc(mesh: Mesh, capsys) -> None:
    capsys.readouterr()
    before = dt.datetime.now(dt.UTC)
    await _get(mesh, "/z")
    after = dt.datetime.now(dt.UTC)
    for line in _lines(capsys):
        ts = line["ts"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts), ts
        when = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
        assert before - dt.timedelta(seconds=1) <= when <= after + dt.timedelta(seconds=1)


async def test_reason_on_every_non_2xx_line(mesh: Mesh, capsys) -> None:
    capsys.readouterr()
    proxy = f"http://127.0.0.1:{mesh.client.outbound_port}"
    async with httpx.AsyncClient(proxy=proxy, timeout=10) as c:
        assert (await c.get("http://nosuch/x")).status_code == 502  # no such upstream
        assert (await c.get("http://api/status/404")).status_code == 404  # the app's answer
        assert (await c.get("http://api/ok")).status_code == 200
    lines = _lines(capsys)
    by = {(x["direction"], x["status"]): x for x in lines}
    assert by[("outbound", 502)]["reason"] == "no_upstream"
    assert by[("outbound", 404)]["reason"] == "upstream_status"
    assert by[("inbound", 404)]["reason"] == "upstream_status"
    assert by[("outbound", 200)]["reason"] is None
    assert all(x["reason"] for x in lines if not 200 <= x["status"] < 300)


def test_configured_fields_only(capsys) -> None:
    accesslog.flush()
    capsys.readouterr()
    accesslog.configure(("status", "request_id"))
    try:
        accesslog.log_request(direction="inbound", status=200, request_id="r", path="/p")
    finally:
        accesslog.configure(None)
    (line,) = _lines(capsys)
    assert set(line) == {"ts", "type", "status", "request_id"}


@pytest.mark.parametrize(
    "value",
    [
        "",
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # all-zero trace id
        f"00-{TRACE}-" + "0" * 16 + "-01",  # all-zero parent
        f"ff-{TRACE}-{CALLER_SPAN}-01",  # version ff is invalid
        f"00-{TRACE.upper()}x-{CALLER_SPAN}-01",
        f"00-{TRACE}-{CALLER_SPAN}-01-extra",  # version 00 has exactly four parts
    ],
)
def test_malformed_traceparent_starts_a_new_trace(value: str) -> None:
    headers = [(b"traceparent", value.encode()), (b"Traceparent", b"dup")]
    hop = stamp(headers)
    assert hop.parent_span_id is None and hop.trace_id != TRACE
    assert [k for k, _ in headers].count(b"traceparent") == 1


def test_stamp_keeps_trace_and_flags_replaces_parent() -> None:
    headers = [(b"X-Request-Id", b"abc"), (b"traceparent", f"00-{TRACE}-{CALLER_SPAN}-00".encode())]
    hop = stamp(headers)
    assert (hop.request_id, hop.trace_id, hop.parent_span_id) == ("abc", TRACE, CALLER_SPAN)
    assert dict(headers)[b"traceparent"] == f"00-{TRACE}-{hop.span_id}-00".encode()
    too_long = [(b"x-request-id", b"a" * 129)]
    assert stamp(too_long).request_id != "a" * 129


def test_access_log_fields_from_the_config(tmp_path, capsys) -> None:
    from meshcar.errors import ConfigError
    from tests.integration.conftest import make_cfg

    cfg = make_cfg(tmp_path, "web", 1, [], {}, access_log={"fields": ["status", "reason"]})
    assert cfg.access_log_fields == ("status", "reason")
    assert make_cfg(tmp_path, "web", 1, [], {}).access_log_fields is None  # default: all
    accesslog.flush()
    capsys.readouterr()
    accesslog.configure(cfg.access_log_fields)
    try:
        accesslog.log_request(direction="outbound", status=502, reason="no_upstream", path="/")
    finally:
        accesslog.configure(None)
    (line,) = _lines(capsys)
    assert line == {"ts": line["ts"], "type": "request", "status": 502, "reason": "no_upstream"}
    with pytest.raises(ConfigError) as err:
        make_cfg(tmp_path, "web", 1, [], {}, access_log={"fields": ["status", "colour"]})
    assert "access_log.fields: unknown ['colour']" in str(err.value)


async def test_h2c_streams_carry_the_request_id_and_a_span_per_hop(mesh: Mesh, capsys) -> None:
    """HTTP/2 from the app (h2c, prior knowledge) through the pair to the HTTP/1.1 app."""
    capsys.readouterr()
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{mesh.client.outbound_port}",
        http1=False,
        http2=True,
        headers={"Host": "api"},
        timeout=20,
        trust_env=False,
    ) as c:
        r = await c.get(
            "/h2", headers={"x-request-id": "h2-req", "traceparent": f"00-{TRACE}-{CALLER_SPAN}-01"}
        )
        assert r.http_version == "HTTP/2" and r.status_code == 200
        seen = _app_headers(r)
        assert (await c.get("/status/503")).status_code == 503
    assert seen["x-request-id"] == "h2-req"
    lines = _lines(capsys)
    out = next(x for x in lines if x["direction"] == "outbound" and x["path"] == "/h2")
    inb = next(x for x in lines if x["direction"] == "inbound" and x["path"] == "/h2")
    assert out["protocol"] == "h2" and out["request_id"] == inb["request_id"] == "h2-req"
    assert (out["trace_id"], out["parent_span_id"]) == (TRACE, CALLER_SPAN)
    assert inb["parent_span_id"] == out["span_id"] and out["reason"] is None
    assert seen["traceparent"] == f"00-{TRACE}-{inb['span_id']}-01"
    failed = next(x for x in lines if x["direction"] == "outbound" and x["status"] == 503)
    assert failed["reason"] == "upstream"
