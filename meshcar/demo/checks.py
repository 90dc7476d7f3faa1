"""`meshcar demo --check`: the SCENARIO.md expectations as a list of named check functions.

A check is a function of the running demo (`DemoEnv`) that returns a short detail on success
and raises `CheckFailed` (or anything else) on failure.  A check without a function is shown
as SKIP "not implemented" -- never as passing.  The edge (issue 3) fills in the edge rows by
giving them a function; `exit_code` is non-zero on any FAIL.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import httpx

from meshcar.demo import grpcwire, ledgerdb
from meshcar.demo import scenario as sc
from meshcar.demo.plan import LOOPBACK, DemoPaths, PublicCerts

NOT_IMPLEMENTED = "not implemented yet (edge, issue 3)"
HTTP_TIMEOUT_SECONDS = 10.0
OPENSSL_TIMEOUT_SECONDS = 15.0


class CheckFailed(Exception):
    """An expectation did not hold; the message says what was seen instead."""


class Status(Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class DemoEnv:
    scenario: sc.Scenario
    paths: DemoPaths
    certs: PublicCerts


@dataclass(frozen=True)
class Check:
    ref: str  # the SCENARIO.md item it verifies ("4", "4 mesh", "-")
    title: str
    fn: Callable[[DemoEnv], str] | None = None


@dataclass(frozen=True)
class CheckResult:
    ref: str
    title: str
    status: Status
    detail: str


def run_checks(checks: list[Check], env: DemoEnv) -> list[CheckResult]:
    results = []
    for check in checks:
        if check.fn is None:
            results.append(CheckResult(check.ref, check.title, Status.SKIP, NOT_IMPLEMENTED))
            continue
        try:
            detail = check.fn(env)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a FAIL row
            msg = str(exc) if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: {exc}"
            results.append(CheckResult(check.ref, check.title, Status.FAIL, msg))
        else:
            results.append(CheckResult(check.ref, check.title, Status.PASS, detail))
    return results


def render_table(results: list[CheckResult]) -> str:
    label = {Status.PASS: "PASS", Status.FAIL: "FAIL", Status.SKIP: "SKIP (not implemented)"}
    rows = [("RESULT", "#", "EXPECTATION", "DETAIL")]
    rows += [(label[r.status], r.ref, r.title, r.detail.replace("\n", " ")) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(row[j].ljust(widths[j]) for j in range(3)) + "  " + row[3])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    counts = {s: sum(1 for r in results if r.status is s) for s in Status}
    lines.append("")
    lines.append(
        f"{counts[Status.PASS]} passed, {counts[Status.FAIL]} failed, "
        f"{counts[Status.SKIP]} not implemented (skipped, not passed)"
    )
    return "\n".join(lines)


def exit_code(results: list[CheckResult]) -> int:
    return 1 if any(r.status is Status.FAIL for r in results) else 0


# --------------------------------------------------------------------------- helpers


def get_json(
    url: str, *, proxy: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    with httpx.Client(proxy=proxy, trust_env=False, timeout=HTTP_TIMEOUT_SECONDS) as client:
        r = client.get(url, headers=headers or {})
    try:
        doc = r.json()
    except ValueError as exc:
        raise CheckFailed(f"GET {url}: {r.status_code}, not JSON: {r.text[:200]!r}") from exc
    if not isinstance(doc, dict):
        raise CheckFailed(f"GET {url}: {r.status_code}, JSON is not an object")
    return r.status_code, doc


def header_values(doc: dict[str, Any], name: str) -> list[str]:
    """Values of header `name` in a demo app answer (`"Name: value"` lines)."""
    out = []
    for line in doc.get("headers", []):
        k, _, v = str(line).partition(":")
        if k.strip().lower() == name.lower():
            out.append(v.strip())
    return out


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def app_url(env: DemoEnv, service: str, path: str) -> str:
    return f"http://{LOOPBACK}:{env.scenario.service(service).app_port}{path}"


def openssl_request(
    port: int,
    cafile: str,
    *,
    servername: str | None = None,
    verify_hostname: bool = True,
    cert: str | None = None,
    key: str | None = None,
    request: bytes = b"",
    quiet: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`openssl s_client` to 127.0.0.1:port sending `request`, until the server closes.

    `-verify_return_error`: an unverifiable server certificate fails the handshake.  `quiet`
    leaves only the server's bytes on stdout (no session dumps interleaved)."""
    argv = [
        "openssl",
        "s_client",
        "-connect",
        f"{LOOPBACK}:{port}",
        "-CAfile",
        cafile,
        "-verify_return_error",
        "-ign_eof",
    ]
    if servername:
        argv += ["-servername", servername]
        if verify_hostname:
            argv += ["-verify_hostname", servername]
    if cert and key:
        argv += ["-cert", cert, "-key", key]
    if quiet:
        argv.append("-quiet")
    return subprocess.run(
        argv,
        input=request.decode(),
        capture_output=True,
        text=True,
        timeout=OPENSSL_TIMEOUT_SECONDS,
        check=False,
    )


def _http_request(host: str, path: str = "/healthz") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


# --------------------------------------------------------------------------- mesh checks


def check_sidecars_ready(env: DemoEnv) -> str:
    seen = []
    for s in env.scenario.services:
        url = f"http://{LOOPBACK}:{s.admin_port}/ready"
        with httpx.Client(trust_env=False, timeout=HTTP_TIMEOUT_SECONDS) as client:
            status = client.get(url).status_code
        expect(status == 200, f"{s.name} sidecar {url} answered {status}")
        seen.append(s.name)
    return "200 from " + ", ".join(seen)


def check_web_api_payments(env: DemoEnv) -> str:
    status, doc = get_json(app_url(env, "web", "/pay"))
    api = doc.get("api", {})
    expect(
        status == 200 and api.get("status") == 200,
        f"web /pay: {status}, api answered {api.get('status')} {api.get('error', '')}",
    )
    api_doc = api.get("body", {})
    expect(api_doc.get("peer") == sc.spiffe_id("web"), f"api saw caller {api_doc.get('peer')!r}")
    pay = api_doc.get("payments", {})
    expect(pay.get("status") == 200, f"payments answered api with {pay.get('status')}")
    pay_peer = pay.get("body", {}).get("peer")
    expect(pay_peer == sc.spiffe_id("api"), f"payments saw caller {pay_peer!r}")
    return f"api saw {api_doc['peer']}, payments saw {pay_peer}"


def check_api_pay(env: DemoEnv) -> str:
    status, doc = get_json(app_url(env, "api", "/v1/pay"))
    pay = doc.get("payments", {})
    expect(
        status == 200 and pay.get("status") == 200,
        f"api /v1/pay: {status}, payments answered {pay.get('status')} {pay.get('error', '')}",
    )
    peer = pay.get("body", {}).get("peer")
    expect(peer == sc.spiffe_id("api"), f"payments saw caller {peer!r}")
    return f"payments saw {peer}"


def check_web_payments_refused(env: DemoEnv) -> str:
    status, doc = get_json(app_url(env, "web", "/try-payments"))
    got = doc.get("payments", {}).get("status")
    expect(got == 403, f"web -> payments got {got!r} ({doc.get('payments')}), expected 403")
    return "web -> payments: 403"


def check_xfcc_replaced(env: DemoEnv) -> str:
    web = env.scenario.service("web")
    forged = f"By={sc.spiffe_id('api')};Hash=forged-by-check;URI={sc.spiffe_id('edge')}"
    status, doc = get_json(
        "http://api/v1/xfcc-probe",
        proxy=f"http://{LOOPBACK}:{web.outbound_port}",
        headers={"X-Forwarded-Client-Cert": forged},
    )
    expect(status == 200, f"web sidecar -> api answered {status}")
    values = header_values(doc, "X-Forwarded-Client-Cert")
    expect(
        all("forged-by-check" not in v for v in values),
        f"the client-sent XFCC reached api: {values}",
    )
    expect(len(values) == 1, f"api received {len(values)} XFCC headers: {values}")
    expect(doc.get("peer") == sc.spiffe_id("web"), f"api saw caller {doc.get('peer')!r}")
    return f"api got one XFCC, URI={doc['peer']}"


def check_mesh_requires_client_cert(env: DemoEnv) -> str:
    payments = env.scenario.service("payments")
    r = openssl_request(
        payments.inbound_port, str(env.paths.mesh_bundle), request=_http_request("payments")
    )
    expect(
        "Verify return code: 0 (ok)" in r.stdout,
        f"the mesh listener's certificate does not chain to mesh-bundle.pem "
        f"(openssl exit {r.returncode}: {r.stderr.strip()[-200:]!r})",
    )
    expect(
        "HTTP/1." not in r.stdout,
        f"mesh listener answered HTTP without a client certificate: {r.stdout[-200:]!r}",
    )
    expect(r.returncode != 0, "openssl reported success without a client certificate")
    return "mesh certificate verified; no client certificate: connection refused"


def check_payments_public(env: DemoEnv) -> str:
    port = env.scenario.service("payments").public_tls_port
    expect(port is not None, "the scenario gives payments no public endpoint")
    assert port is not None
    host = sc.PAYMENTS_PUBLIC_HOST
    c = env.certs
    with_cert = openssl_request(
        port,
        str(c.edge_ca),
        servername=host,
        cert=str(c.partner_cert),
        key=str(c.partner_key),
        request=_http_request(host),
        quiet=True,
    )
    expect(
        with_cert.stdout.startswith("HTTP/1.1 200"),
        f"with the partner certificate, verifying {host} against edge-ca.pem: no 200 "
        f"(openssl exit {with_cert.returncode}: {with_cert.stderr.strip()[-300:]!r})",
    )
    try:
        doc = json.loads(with_cert.stdout.split("\n\n", 1)[1])  # text mode: CRLF -> LF
        subject = doc["tls"]["client_cert_subject"]
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        raise CheckFailed(
            f"payments' answer is not the demo JSON: {with_cert.stdout[:200]!r}"
        ) from exc
    without = openssl_request(
        port, str(c.edge_ca), servername=host, request=_http_request(host), quiet=True
    )
    expect("HTTP/1." not in without.stdout, "answered HTTP without a client certificate")
    expect(
        "certificate required" in without.stderr,
        f"no 'certificate required' alert without a client certificate: "
        f"{without.stderr.strip()[-300:]!r}",
    )
    return (
        f"{host} verified against edge-ca.pem; partner cert: 200 (payments saw {subject}); "
        "no client cert: alert certificate required"
    )


def _grpc_quote_via(env: DemoEnv, caller: str) -> grpcwire.GrpcResult:
    """Be `caller`'s app: payments' Quote with h2c through `caller`'s sidecar outbound."""
    return grpcwire.call_unary(
        LOOPBACK,
        env.scenario.service(caller).outbound_port,
        "payments",
        sc.GRPC_QUOTE_METHOD,
        {"amount_cents": 1000, "currency": "EUR"},
        timeout=HTTP_TIMEOUT_SECONDS,
    )


def check_grpc(env: DemoEnv) -> str:
    ok = _grpc_quote_via(env, "api")
    expect(ok.error is None, f"api -> payments gRPC: {ok.error}")
    expect(
        ok.http_status == 200 and not ok.trailers_only and ok.trailers.get("grpc-status") == "0",
        f"api -> payments gRPC: HTTP {ok.http_status}, trailers {ok.trailers}, head {ok.headers}",
    )
    resp = ok.response() or {}
    expect(resp.get("peer") == sc.spiffe_id("api"), f"payments' Quote saw caller {resp!r}")
    status, doc = get_json(app_url(env, "api", "/v1/quote"))
    q = doc.get("quote", {})
    expect(
        status == 200 and q.get("grpc_status") == 0,
        f"api /v1/quote (api's app calling gRPC): {status} {str(q)[:300]}",
    )
    refused = _grpc_quote_via(env, "web")
    expect(
        refused.grpc_status == grpcwire.PERMISSION_DENIED,
        f"web -> payments gRPC: grpc-status {refused.grpc_status} ({refused.grpc_message!r}, "
        f"{refused.error}), expected 7 PERMISSION_DENIED",
    )
    return (
        f"api: grpc-status 0 in trailers, payments saw {resp['peer']}; "
        f"web: grpc-status 7 {refused.grpc_message!r}"
    )


def _tcp_denials(env: DemoEnv) -> float:
    port = env.scenario.service("payments").admin_port
    with httpx.Client(trust_env=False, timeout=HTTP_TIMEOUT_SECONDS) as client:
        text = client.get(f"http://{LOOPBACK}:{port}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("meshcar_tcp_connections_total{")
            and 'direction="inbound"' in line
            and 'result="denied"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _db_port(env: DemoEnv, caller: str) -> int:
    ports = dict(env.scenario.service(caller).db_upstreams)
    expect("payments" in ports, f"{caller} has no tunnel to payments' ledger in the scenario")
    return ports["payments"]


def check_db(env: DemoEnv) -> str:
    ex = ledgerdb.query(LOOPBACK, _db_port(env, "api"), timeout=HTTP_TIMEOUT_SECONDS)
    expect(
        ex.replies[:2] == ("PONG", f"OK acct-1 {ledgerdb.BALANCES['acct-1']}"),
        f"api's tunnel: greeting {ex.greeting!r}, replies {ex.replies}",
    )
    status, doc = get_json(app_url(env, "api", "/v1/ledger"))
    ledger = doc.get("ledger", {})
    expect(status == 200 and not ledger.get("refused"), f"api /v1/ledger: {status} {ledger}")
    before = _tcp_denials(env)
    try:
        seen = ledgerdb.query(LOOPBACK, _db_port(env, "web"), timeout=HTTP_TIMEOUT_SECONDS)
    except ledgerdb.ProtocolError as exc:
        refused = str(exc)
    except OSError as exc:
        refused = f"{type(exc).__name__}: {exc}"
    else:
        raise CheckFailed(f"web reached payments' ledger: {seen}")
    after = _tcp_denials(env)
    expect(after > before, f"payments' sidecar counted no TCP denial ({before} -> {after})")
    return (
        f"api: greeting {ex.greeting!r}, {ex.replies[1]!r}; web: {refused} "
        f"(payments' sidecar: denied)"
    )


def mesh_checks() -> list[Check]:
    return [
        Check("8 mesh", "every sidecar /ready is 200", check_sidecars_ready),
        Check(
            "-",
            "web -> api -> payments over mTLS (identities checked at each hop)",
            check_web_api_payments,
        ),
        Check(
            "4 mesh",
            "api /v1/pay: payments saw caller spiffe://meshcar.demo/svc/api",
            check_api_pay,
        ),
        Check(
            "5 mesh",
            "web -> payments over the mesh is refused with 403 (/try-payments)",
            check_web_payments_refused,
        ),
        Check(
            "9 mesh",
            "client-sent X-Forwarded-Client-Cert replaced by the sidecar",
            check_xfcc_replaced,
        ),
        Check(
            "-",
            "mesh listener refuses a client without a certificate",
            check_mesh_requires_client_cert,
        ),
        Check(
            "3 direct",
            "payments' public endpoint: own cert, demands a partner client cert",
            check_payments_public,
        ),
        Check(
            "11 mesh",
            "gRPC Quote api -> payments (h2c, h2/mTLS): grpc-status 0; web gets 7",
            check_grpc,
        ),
        Check(
            "12 mesh",
            "ledger DB over opaque TCP: api round trip; web's tunnel refused",
            check_db,
        ),
    ]


# --------------------------------------------------------------------------- edge checks


@dataclass(frozen=True)
class CurlAnswer:
    status: int
    headers: dict[str, str]  # lower-case names, last value wins
    body: str


def curl_edge(env: DemoEnv, host: str, path: str, *extra: str) -> CurlAnswer:
    """`curl --cacert edge-ca.pem --resolve HOST:8443:127.0.0.1 https://HOST:8443/PATH`."""
    port = sc.EDGE_HTTPS_PORT
    argv = [
        "curl",
        "-sS",
        "-i",
        "--max-time",
        str(int(HTTP_TIMEOUT_SECONDS)),
        "--cacert",
        str(env.certs.edge_ca),
        "--resolve",
        f"{host}:{port}:{LOOPBACK}",
        *extra,
        f"https://{host}:{port}{path}",
    ]
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=OPENSSL_TIMEOUT_SECONDS, check=False
    )
    if r.returncode != 0:
        raise CheckFailed(f"curl https://{host}:{port}{path} failed: {r.stderr.strip()[-300:]}")
    return _parse_curl(r.stdout)


def _parse_curl(out: str) -> CurlAnswer:
    out = out.replace("\r\n", "\n")  # text-mode subprocess output may or may not keep CRs
    head, _, body = out.partition("\n\n")
    lines = head.split("\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return CurlAnswer(status, headers, body)


def _doc(ans: CurlAnswer) -> dict[str, Any]:
    try:
        doc = json.loads(ans.body)
    except ValueError as exc:
        raise CheckFailed(f"{ans.status}, not JSON: {ans.body[:200]!r}") from exc
    return doc if isinstance(doc, dict) else {}


API_HOST, WWW_HOST = "api.demo.test", "www.demo.test"


def check_edge_api_hello(env: DemoEnv) -> str:
    ans = curl_edge(env, API_HOST, "/v1/hello")
    expect(ans.status == 200, f"api.demo.test/v1/hello: {ans.status}")
    doc = _doc(ans)
    expect(doc.get("service") == "api", f"answered by {doc.get('service')!r}, not api")
    xfp, xff, xfcc = (
        header_values(doc, n)
        for n in ("X-Forwarded-Proto", "X-Forwarded-For", "X-Forwarded-Client-Cert")
    )
    expect(xfp == ["https"], f"api saw X-Forwarded-Proto {xfp}")
    expect(xff == [LOOPBACK], f"api saw X-Forwarded-For {xff}")
    expect(
        len(xfcc) == 1 and xfcc[0].endswith(f"URI={sc.spiffe_id('edge')}"), f"api saw XFCC {xfcc}"
    )
    expect("strict-transport-security" in ans.headers, "no HSTS header on api.demo.test")
    return f"200 from api; XFP https, XFF {xff[0]}, XFCC URI={sc.spiffe_id('edge')}; HSTS set"


def _first_cert_sans(output: str) -> str:
    start = output.find("-----BEGIN CERTIFICATE-----")
    end = output.find("-----END CERTIFICATE-----")
    if start < 0 or end < 0:
        raise CheckFailed("openssl s_client showed no certificate")
    pem = output[start : end + len("-----END CERTIFICATE-----")]
    r = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName"],
        input=pem,
        capture_output=True,
        text=True,
        check=False,
    )
    return r.stdout.replace("\n", " ").strip()


def check_edge_certificate(env: DemoEnv) -> str:
    r = openssl_request(
        sc.EDGE_HTTPS_PORT,
        str(env.certs.edge_ca),
        servername=API_HOST,
        request=_http_request(API_HOST, "/v1/hello"),
    )
    sans = _first_cert_sans(r.stdout)
    expect("DNS:api.demo.test" in sans, f"certificate for api.demo.test has SANs {sans}")
    expect("Verify return code: 0 (ok)" in r.stdout, "the edge certificate did not verify")
    return f"edge certificate ({sans}) verified against edge-ca.pem"


def check_edge_passthrough(env: DemoEnv) -> str:
    c = env.certs
    host = sc.PAYMENTS_PUBLIC_HOST
    with_cert = openssl_request(
        sc.EDGE_HTTPS_PORT,
        str(c.edge_ca),
        servername=host,
        cert=str(c.partner_cert),
        key=str(c.partner_key),
        request=_http_request(host, "/v1/charge"),
    )
    sans = _first_cert_sans(with_cert.stdout)
    expect(
        "DNS:payments.demo.test" in sans and "api.demo.test" not in sans,
        f"the certificate behind SNI payments.demo.test has SANs {sans}, not payments' own",
    )
    expect(
        "HTTP/1.1 200" in with_cert.stdout,
        f"no 200 with the partner certificate: {with_cert.stderr[-300:]!r}",
    )
    body = with_cert.stdout.replace("\r\n", "\n")
    body = body[body.rfind("\n\n") + 2 :]
    proxied = ""
    try:
        proxied = json.loads(body[body.find("{") :]).get("proxy_protocol", {}).get("source", "")
    except ValueError:
        pass
    without = openssl_request(
        sc.EDGE_HTTPS_PORT,
        str(c.edge_ca),
        servername=host,
        request=_http_request(host, "/v1/charge"),
    )
    expect("HTTP/1.1 200" not in without.stdout, "payments answered without a client certificate")
    expect(
        "certificate required" in without.stderr,
        f"no 'certificate required': {without.stderr[-300:]!r}",
    )
    return (
        f"payments' own certificate ({sans}); partner cert: 200"
        + (f", PROXY v2 source {proxied}" if proxied else "")
        + "; without: certificate required"
    )


def check_edge_api_pay(env: DemoEnv) -> str:
    ans = curl_edge(env, API_HOST, "/v1/pay")
    expect(ans.status == 200, f"api.demo.test/v1/pay: {ans.status} {ans.body[:200]!r}")
    doc = _doc(ans)
    pay = doc.get("payments") or {}
    peer = pay.get("body", {}).get("peer") if isinstance(pay, dict) else None
    expect(peer == sc.spiffe_id("api"), f"payments saw caller {peer!r} ({str(pay)[:200]})")
    return f"edge -> api (bridge) -> payments; payments saw {peer}"


def check_edge_web_try_payments(env: DemoEnv) -> str:
    ans = curl_edge(env, WWW_HOST, "/try-payments")
    doc = _doc(ans)
    text = json.dumps(doc)
    expect("403" in text, f"/try-payments via the edge reported {text[:200]}")
    return "web reports 403 from payments' sidecar"


def check_edge_redirect(env: DemoEnv) -> str:
    r = subprocess.run(
        [
            "curl",
            "-sS",
            "-i",
            "--max-time",
            "10",
            "-H",
            f"Host: {WWW_HOST}",
            f"http://{LOOPBACK}:{sc.EDGE_HTTP_PORT}/x",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    ans = _parse_curl(r.stdout) if r.returncode == 0 else None
    expect(
        ans is not None and ans.status == 301,
        f"HTTP listener answered {r.stdout[:100]!r} {r.stderr[-200:]!r}",
    )
    assert ans is not None
    loc = ans.headers.get("location")
    expect(loc == f"https://{WWW_HOST}/x", f"Location {loc!r}")
    return f"301 Location: {loc}"


def _edge_log(env: DemoEnv) -> list[dict[str, Any]]:
    out = []
    for line in env.paths.log("edge").read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _edge_log_entries(env: DemoEnv) -> tuple[list[dict], list[dict]]:
    """The edge's access log: (HTTP request entries for www and api, entries for payments)."""
    entries = _edge_log(env)
    http = [
        e for e in entries if e.get("type") == "request" and e.get("host") in (WWW_HOST, API_HOST)
    ]
    pay = [
        e
        for e in entries
        if e.get("sni") == sc.PAYMENTS_PUBLIC_HOST or e.get("host") == sc.PAYMENTS_PUBLIC_HOST
    ]
    return http, pay


def check_edge_access_log(env: DemoEnv) -> str:
    import time

    deadline = time.monotonic() + 3  # access log lines are written in batches (<= 0.2 s)
    while True:
        http, pay = _edge_log_entries(env)
        hosts = {e["host"] for e in http}
        if hosts == {WWW_HOST, API_HOST} and pay or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    expect(hosts == {WWW_HOST, API_HOST}, f"HTTP entries for {sorted(hosts)}")
    expect(
        bool(pay) and all(e.get("type") == "connection" for e in pay),
        f"payments entries: {[e.get('type') for e in pay]}",
    )
    expect(
        all("path" not in e and "method" not in e for e in pay), "a payments entry has HTTP fields"
    )
    return f"{len(http)} HTTP entries (www, api); {len(pay)} TCP-only entries for payments"


def check_edge_health(env: DemoEnv) -> str:
    import time

    want = {(API_HOST, "http"), (WWW_HOST, "http"), (sc.PAYMENTS_PUBLIC_HOST, "tcp")}
    deadline = time.monotonic() + 6
    seen: set[tuple[str, str]] = set()
    while True:
        with httpx.Client(trust_env=False, timeout=HTTP_TIMEOUT_SECONDS) as client:
            text = client.get(f"http://{LOOPBACK}:{sc.EDGE_ADMIN_PORT}/metrics").text
        seen = set()
        for line in text.splitlines():
            if line.startswith("meshcar_edge_backend_up{") and line.rstrip().endswith(" 1.0"):
                labels = dict(
                    p.split("=", 1) for p in line[line.index("{") + 1 : line.index("}")].split(",")
                )
                seen.add((labels["route"].strip('"'), labels["check"].strip('"')))
        if want <= seen or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    expect(want <= seen, f"healthy checks seen: {sorted(seen)}")
    return "payments: TCP up; api, www: HTTP up (meshcar_edge_backend_up)"


def check_edge_xfcc_stripped(env: DemoEnv) -> str:
    forged = "By=spiffe://meshcar.demo/svc/api;URI=spiffe://meshcar.demo/svc/payments"
    ans = curl_edge(env, API_HOST, "/v1/hello", "-H", f"X-Forwarded-Client-Cert: {forged}")
    doc = _doc(ans)
    xfcc = header_values(doc, "X-Forwarded-Client-Cert")
    expect(forged not in xfcc and len(xfcc) == 1, f"api saw XFCC {xfcc}")
    return f"api saw only {xfcc[0]}"


def check_edge_rate_limit(env: DemoEnv) -> str:
    port = sc.EDGE_HTTPS_PORT
    url = f"https://{API_HOST}:{port}/v1/hello"
    argv = [
        "curl",
        "-sS",
        "--max-time",
        "30",
        "--cacert",
        str(env.certs.edge_ca),
        "--resolve",
        f"{API_HOST}:{port}:{LOOPBACK}",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
    ]
    argv = argv[:-4] + [
        "-w",
        "%{http_code} %header{retry-after}\n",
        "--parallel",
        "--parallel-max",
        "16",
    ]
    for _ in range(150):
        argv += ["-o", "/dev/null", url]  # one -o per URL
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    answers = [line.split() for line in r.stdout.splitlines() if line.strip()]
    codes = [a[0] for a in answers]
    limited = [a for a in answers if a[0] == "429"]
    expect(bool(limited), f"no 429 in a burst of {len(codes)}: {sorted(set(codes))}")
    expect(
        all(len(a) == 2 and a[1].isdigit() for a in limited),
        f"429 answers without a numeric Retry-After: {limited[:3]}",
    )
    return (
        f"burst of {len(codes)}: {codes.count('200')} x 200, {len(limited)} x 429 "
        f"with Retry-After: {limited[0][1]}"
    )


def edge_checks() -> list[Check]:
    """SCENARIO.md items 1-10 through the edge."""
    return [
        Check(
            "1",
            "api.demo.test /v1/hello via edge: XFP https, XFF, XFCC names edge",
            check_edge_api_hello,
        ),
        Check(
            "2",
            "s_client api.demo.test: the edge's certificate (SAN api.demo.test)",
            check_edge_certificate,
        ),
        Check(
            "3",
            "s_client payments.demo.test via edge: payments' own cert; partner mTLS",
            check_edge_passthrough,
        ),
        Check(
            "4", "https://api.demo.test:8443/v1/pay: payments saw caller api", check_edge_api_pay
        ),
        Check(
            "5", "https://www.demo.test:8443/try-payments reports 403", check_edge_web_try_payments
        ),
        Check(
            "6", "http://127.0.0.1:8080 with Host www.demo.test: 301 to https", check_edge_redirect
        ),
        Check(
            "7",
            "edge access log: HTTP entries for www/api, TCP-only for payments",
            check_edge_access_log,
        ),
        Check("8", "edge health-checks payments over TCP and api/web over HTTP", check_edge_health),
        Check(
            "9",
            "client-sent X-Forwarded-Client-Cert never reaches api via the edge",
            check_edge_xfcc_stripped,
        ),
        Check("10", "burst past api's rate limit: 429 with Retry-After", check_edge_rate_limit),
    ]


def all_checks() -> list[Check]:
    return mesh_checks() + edge_checks()
