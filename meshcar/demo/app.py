"""The small JSON demo app of the scenario (`meshcar demo-app`).

It is the "application" behind each sidecar, not part of meshcar's data path, so it is a
plain threaded stdlib `http.server` (HTTP/1.1, keep-alive, HEAD).  It is honest: every
answer reports exactly what it received -- service name, method, path, every request header
(as an ordered list of `Name: value` lines, so duplicates stay visible), the body size, the peer identity
taken from `X-Forwarded-Client-Cert` when present, and in TLS mode the client certificate.

Special routes (each calls a peer only through the app's own sidecar, `HTTP_PROXY`):

- api `/v1/pay`: calls payments `/v1/charge` and includes payments' answer;
- web `/try-payments`: calls payments and reports the status it got (403 expected);
- web `/pay`: calls api `/v1/pay` (the full web -> api -> payments chain);
- api `/v1/quote`: calls payments' gRPC method `/meshcar.demo.Payments/Quote` with h2c
  (prior knowledge) through its sidecar (grpcwire.py), and reports status and trailers;
- web `/try-quote`: the same from web (payments' sidecar answers PERMISSION_DENIED, 7);
- api `/v1/ledger`: a round trip with payments' ledger database (ledgerdb.py, a
  server-speaks-first stand-in) over its sidecar's opaque TCP tunnel (`--db`);
- web `/try-ledger`: the same from web (payments' sidecar closes the tunnel: not allowed).

`--h2c` (payments) also serves gRPC over prior-knowledge h2c on the app port: a connection
whose first bytes are the HTTP/2 preface is served by grpcwire.serve_h2c, others as HTTP/1.1.
`--ledger-port` starts the ledger database on that port.

`--tls-cert/--tls-key/--tls-client-ca` turn it into payments' public partner endpoint:
TLS with a required client certificate (end-to-end mTLS).  With `--proxy-protocol` a PROXY
v1/v2 header (from the edge in passthrough mode) precedes the TLS handshake; the address it
carries is reported, not trusted for anything.  Who may send one is a
`meshcar.proto.proxy_protocol.ProxyPolicy`: only peers in `--proxy-trusted` (loopback by
default), which must send one unless `--proxy-optional`; a header from anyone else, a
missing one, or a broken one closes the connection (logged, counted).  The header is
peeked, however it is segmented, and only its own bytes are consumed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from meshcar.demo import grpcwire, ledgerdb
from meshcar.proto import proxy_protocol as pp

IDLE_TIMEOUT_SECONDS = 30.0
TLS_HANDSHAKE_TIMEOUT_SECONDS = 10.0
PEER_CALL_TIMEOUT_SECONDS = 10.0
MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class PeerCall:
    """A route that calls another service through the sidecar."""

    service: str
    path: str
    key: str  # where the peer's answer goes in our JSON


# (service, path) -> call.  Everything else is a plain echo.
PEER_ROUTES: dict[tuple[str, str], PeerCall] = {
    ("api", "/v1/pay"): PeerCall("payments", "/v1/charge", "payments"),
    ("web", "/try-payments"): PeerCall("payments", "/v1/charge", "payments"),
    ("web", "/pay"): PeerCall("api", "/v1/pay", "api"),
}


# (service, path) -> (key in our JSON, "grpc" | "ledger", peer)
SPECIAL_ROUTES: dict[tuple[str, str], tuple[str, str, str]] = {
    ("api", "/v1/quote"): ("quote", "grpc", "payments"),
    ("web", "/try-quote"): ("quote", "grpc", "payments"),
    ("api", "/v1/ledger"): ("ledger", "ledger", "payments"),
    ("web", "/try-ledger"): ("ledger", "ledger", "payments"),
}


@dataclass(frozen=True)
class AppConfig:
    name: str
    host: str
    port: int
    proxy: str | None
    tls: ssl.SSLContext | None
    proxy_protocol: pp.ProxyPolicy | None = None  # None: no PROXY header expected
    h2c: bool = False  # also serve gRPC over prior-knowledge h2c (grpcwire.py)
    dbs: tuple[tuple[str, str, int], ...] = ()  # (peer, host, port) of ledger tunnels


def parse_xfcc(value: str) -> list[dict[str, str]]:
    """Parse an Envoy-format `X-Forwarded-Client-Cert` value into its elements.

    Elements are separated by `,`, key=value pairs by `;`; values may be double-quoted
    (and then may contain `,` `;` `=` and `\\"`).  Keys are returned as written.
    """
    elements: list[dict[str, str]] = []
    current: dict[str, str] = {}
    buf: list[str] = []
    key, in_value, quoted, escaped = "", False, False, False

    def end_pair() -> None:
        nonlocal key, buf, in_value
        if in_value:
            current[key.strip()] = "".join(buf)
        elif "".join(buf).strip():
            current["".join(buf).strip()] = ""
        key, buf, in_value = "", [], False

    for ch in value:
        if quoted:
            if escaped:
                buf.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            else:
                buf.append(ch)
        elif ch == '"' and in_value:
            quoted = True
        elif ch == "=" and not in_value:
            key, buf, in_value = "".join(buf), [], True
        elif ch == ";":
            end_pair()
        elif ch == ",":
            end_pair()
            if current:
                elements.append(current)
            current = {}
        else:
            buf.append(ch)
    end_pair()
    if current:
        elements.append(current)
    return elements


def peer_from_xfcc(values: list[str]) -> str | None:
    """The calling identity: the `URI` of the last XFCC element (the nearest hop)."""
    elements = [e for v in values for e in parse_xfcc(v)]
    for element in reversed(elements):
        for k, v in element.items():
            if k.lower() == "uri" and v:
                return v
    return None


_clients: dict[str, httpx.Client] = {}
_clients_lock = threading.Lock()


def _client(proxy: str) -> httpx.Client:
    """One keep-alive client per sidecar proxy, shared by the server's threads (httpx's
    Client is thread-safe). Making one per call cost ~50-250 ms: it builds an SSL context
    and loads a CA bundle, even for plain HTTP to the sidecar."""
    with _clients_lock:
        c = _clients.get(proxy)
        if c is None:
            c = _clients[proxy] = httpx.Client(
                proxy=proxy, trust_env=False, timeout=PEER_CALL_TIMEOUT_SECONDS
            )
        return c


def _proxy_hostport(proxy: str) -> tuple[str, int]:
    hostport = proxy.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    return host, int(port)


def call_quote(proxy: str | None, peer: str) -> dict[str, Any]:
    """payments' gRPC Quote through the sidecar's outbound (h2c, :authority = the peer)."""
    if not proxy:
        return {"error": "HTTP_PROXY is not set: this app reaches peers only through its sidecar"}
    host, port = _proxy_hostport(proxy)
    started = time.perf_counter()
    result = grpcwire.call_unary(
        host,
        port,
        peer,
        grpcwire.QUOTE_METHOD,
        {"amount_cents": 2500, "currency": "EUR"},
        timeout=PEER_CALL_TIMEOUT_SECONDS,
    )
    answer: dict[str, Any] = {"method": grpcwire.QUOTE_METHOD, "authority": peer, "via": proxy}
    answer.update(result.summary())
    answer["duration_ms"] = round((time.perf_counter() - started) * 1000, 2)
    return answer


def call_ledger(dbs: tuple[tuple[str, str, int], ...], peer: str) -> dict[str, Any]:
    """A ledger round trip through the sidecar's opaque TCP tunnel to `peer`."""
    found = [(h, p) for name, h, p in dbs if name == peer]
    if not found:
        return {"error": f"no --db tunnel to {peer}'s ledger"}
    host, port = found[0]
    answer: dict[str, Any] = {"via": f"{host}:{port}", "database": f"{peer} ledger (stand-in)"}
    try:
        ex = ledgerdb.query(host, port, timeout=PEER_CALL_TIMEOUT_SECONDS)
    except (OSError, ledgerdb.ProtocolError) as exc:
        answer["refused"] = True
        answer["error"] = f"{type(exc).__name__}: {exc}"
        return answer
    answer.update(refused=False, greeting=ex.greeting, replies=list(ex.replies))
    return answer


def quote(path: str, headers: dict[str, str], message: bytes) -> tuple[int, str, Any]:
    """payments' gRPC method: a fee quote for an amount, naming the caller it saw."""
    if path != grpcwire.QUOTE_METHOD:
        return grpcwire.UNIMPLEMENTED, f"unknown method {path}", None
    try:
        req = json.loads(message)
        amount = int(req["amount_cents"])
    except (ValueError, KeyError, TypeError) as exc:
        return grpcwire.INVALID_ARGUMENT, f"bad QuoteRequest: {exc}", None
    xfcc = [v for k, v in headers.items() if k.lower() == "x-forwarded-client-cert"]
    return (
        grpcwire.OK,
        "",
        {
            "service": "payments",
            "amount_cents": amount,
            "currency": str(req.get("currency", "EUR")),
            "fee_cents": max(30, amount * 29 // 1000),
            "peer": peer_from_xfcc(xfcc),
        },
    )


def call_peer(proxy: str | None, call: PeerCall, request_id: str | None) -> dict[str, Any]:
    """Call a peer through the sidecar's HTTP proxy and report what came back."""
    if not proxy:
        return {"error": "HTTP_PROXY is not set: this app reaches peers only through its sidecar"}
    url = f"http://{call.service}{call.path}"
    headers = {"X-Request-Id": request_id} if request_id else {}
    started = time.perf_counter()
    try:
        r = _client(proxy).get(url, headers=headers)
    except httpx.HTTPError as exc:
        return {"url": url, "via": proxy, "error": f"{type(exc).__name__}: {exc}"}
    answer: dict[str, Any] = {
        "url": url,
        "via": proxy,
        "status": r.status_code,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    try:
        answer["body"] = r.json()
    except ValueError:
        answer["body"] = r.text[:2000]
    return answer


class DemoServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.proxy_refusals: dict[str, int] = {}  # reason -> connections closed for it
        self._count_lock = threading.Lock()
        super().__init__((config.host, config.port), DemoHandler)

    def refuse_proxy(self, client: str, reason: str, error: str = "") -> None:
        with self._count_lock:
            count = self.proxy_refusals[reason] = self.proxy_refusals.get(reason, 0) + 1
        log(
            {
                "event": "proxy_protocol.rejected",
                "client": client,
                "reason": reason,
                "error": error or None,
                "count": count,
            }
        )

    def accept_proxy(
        self, request: socket.socket, client: str
    ) -> tuple[bool, pp.ProxyHeader | None]:
        """(serve?, the header): the policy's verdict on the connection's first bytes."""
        policy = self.config.proxy_protocol
        assert policy is not None
        try:
            result = read_proxy_header(request)
            verdict, reason = policy.verdict(client, result)
            if verdict is pp.Verdict.ACCEPT:
                assert isinstance(result, pp.ProxyHeader)
                consume(request, result.consumed)
                return True, result
        except (ValueError, OSError) as exc:
            self.refuse_proxy(client, "incomplete_header", f"{type(exc).__name__}: {exc}")
            return False, None
        if verdict is pp.Verdict.REFUSE:
            detail = result.reason if isinstance(result, pp.Rejected) else ""
            self.refuse_proxy(client, reason, detail)
            return False, None
        return True, None

    def finish_request(self, request: Any, client_address: Any) -> None:  # per-connection thread
        request.settimeout(IDLE_TIMEOUT_SECONDS)
        header = None
        if self.config.proxy_protocol is not None:
            serve, header = self.accept_proxy(request, client_address[0])
            if not serve:
                return
        if self.config.h2c and self.config.tls is None and _is_h2_preface(request):
            log({"event": "h2c.connection", "client": client_address[0]})
            grpcwire.serve_h2c(request, quote)
            return
        if self.config.tls is not None:
            request.settimeout(TLS_HANDSHAKE_TIMEOUT_SECONDS)
            try:
                request = self.config.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log(
                    {
                        "event": "tls.handshake_failed",
                        "client": client_address[0],
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                )
                return
            request.settimeout(IDLE_TIMEOUT_SECONDS)
            try:
                DemoHandler(request, client_address, self, proxy_header=header)
            finally:
                request.close()  # the TLS socket owns the descriptor now
            return
        DemoHandler(request, client_address, self, proxy_header=header)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        log(
            {
                "event": "connection.error",
                "client": client_address[0],
                "error": f"{type(exc).__name__}: {exc}",
            }
        )


def _is_h2_preface(sock: socket.socket) -> bool:
    """Whether the connection starts with the HTTP/2 preface (peeked: nothing consumed)."""
    n = len(grpcwire.PREFACE_START)
    try:
        data = sock.recv(n, socket.MSG_PEEK | socket.MSG_WAITALL)
    except OSError:
        return False
    return data == grpcwire.PREFACE_START


def read_proxy_header(
    sock: socket.socket, timeout: float = TLS_HANDSHAKE_TIMEOUT_SECONDS
) -> pp.ProxyHeader | pp.Rejected:
    """Peek at the connection's first bytes until they are a whole PROXY header or a
    rejection (NOT_PROXY: no header), consuming nothing.

    A header may arrive in any number of TCP segments: while it is incomplete,
    `SO_RCVLOWAT` makes the socket readable only once the bytes the parser still needs are
    in (no busy loop over a peek that returns the same bytes). The whole read is bounded by
    `timeout`; a close inside a header is a ValueError, a timeout an OSError.
    """
    deadline = time.monotonic() + timeout
    buf = b""
    result = pp.parse_proxy_header(buf)
    try:
        while isinstance(result, pp.Incomplete):
            want = len(buf) + result.at_least
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete PROXY header within {timeout:g} s")
            sock.settimeout(remaining)
            data = sock.recv(pp.MAX_V2_SIZE, socket.MSG_PEEK)
            if len(data) <= len(buf):
                raise ValueError("connection closed inside a PROXY header")
            buf = data
            result = pp.parse_proxy_header(buf)
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
    return result


def consume(sock: socket.socket, n: int) -> None:
    """Read exactly the `n` bytes already peeked (the header), leaving what follows."""
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ValueError("connection closed inside a PROXY header")
        n -= len(chunk)


class LengthRequired(ValueError):
    """A chunked request body: answered 411."""


def _proxy_doc(h: Any) -> dict[str, Any]:
    """The PROXY protocol header the app was given, as the JSON answer shows it."""
    return {
        "version": h.version,
        "command": str(h.command),
        "source": f"{h.src_addr}:{h.src_port}" if h.src_addr else None,
        "destination": f"{h.dst_addr}:{h.dst_port}" if h.dst_addr else None,
    }


def _special_route(cfg: Any, route_path: str, doc: dict[str, Any]) -> int:
    """Run a gRPC or ledger route into `doc`; the status the answer gets (200 or 502)."""
    special = SPECIAL_ROUTES.get((cfg.name, route_path))
    if special is None:
        return 200
    key, kind, peer = special
    if kind == "grpc":
        answer = call_quote(cfg.proxy, peer)
        failed = answer.get("grpc_status") != grpcwire.OK
    else:
        answer = call_ledger(cfg.dbs, peer)
        failed = bool(answer.get("refused", True))
    doc[key] = answer
    # api's routes must succeed (502 otherwise); web's "try" routes report the refusal
    return 502 if failed and not route_path.startswith("/try-") else 200


class DemoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "meshcar-demo-app"
    # TCP_NODELAY, and head + body leave in one send() (the handler flushes after each
    # request): with Nagle on and two writes, every response on a keep-alive connection
    # waited ~40 ms for the reader's delayed ACK of the head (docs/PERFORMANCE.md).
    disable_nagle_algorithm = True
    wbufsize = 64 * 1024
    server: DemoServer

    def __init__(self, *args: Any, proxy_header: Any = None, **kwargs: Any) -> None:
        self.proxy_header = proxy_header
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # one JSON line per request instead, from _answer

    def _read_body(self) -> int:
        # http.server does not decode chunked bodies, and meshcar never hand-parses HTTP:
        # the demo app asks for a Content-Length instead (411), as plain servers may.
        if self.headers.get("Transfer-Encoding") is not None:
            raise LengthRequired(
                "send a Content-Length; this demo app does not take chunked bodies"
            )
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > MAX_BODY_BYTES:
            raise ValueError("bad Content-Length")
        remaining = length
        while remaining:
            chunk = self.rfile.read(min(remaining, 65536))
            if not chunk:
                raise ValueError("body ended early")
            remaining -= len(chunk)
        return length

    def _handle(self) -> None:
        cfg = self.server.config
        try:
            body_bytes = self._read_body()
        except LengthRequired as exc:
            self._send(411, {"service": cfg.name, "error": str(exc)}, close=True)
            return
        except ValueError as exc:
            self._send(400, {"service": cfg.name, "error": str(exc)}, close=True)
            return
        path = self.path
        route_path = path.split("?", 1)[0]
        xfcc = self.headers.get_all("X-Forwarded-Client-Cert") or []
        doc: dict[str, Any] = {
            "service": cfg.name,
            "method": self.command,
            "path": path,
            "headers": [f"{k}: {v}" for k, v in self.headers.items()],
            "body_bytes": body_bytes,
            "client": self.client_address[0],
            "peer": peer_from_xfcc(xfcc),
        }
        if isinstance(self.connection, ssl.SSLSocket):
            doc["tls"] = _tls_info(self.connection)
        if self.proxy_header is not None:
            doc["proxy_protocol"] = _proxy_doc(self.proxy_header)
        status = _special_route(cfg, route_path, doc)
        call = PEER_ROUTES.get((cfg.name, route_path))
        if call is not None:
            answer = call_peer(cfg.proxy, call, self.headers.get("X-Request-Id"))
            doc[call.key] = answer
            if "error" in answer:
                status = 502
        self._send(status, doc)

    def _send(self, status: int, doc: dict[str, Any], *, close: bool = False) -> None:
        body = json.dumps(doc, indent=2).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        log(
            {
                "event": "request",
                "service": doc.get("service"),
                "method": self.command,
                "path": self.path,
                "status": status,
                "peer": doc.get("peer"),
                "client": self.client_address[0],
            }
        )

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _handle


def _tls_info(conn: ssl.SSLSocket) -> dict[str, Any]:
    peer = conn.getpeercert() or {}
    subject = ", ".join("=".join(x) for rdn in peer.get("subject", ()) for x in rdn)
    return {
        "version": conn.version(),
        "cipher": (conn.cipher() or ("",))[0],
        "client_cert_subject": subject or None,
    }


_log_lock = threading.Lock()


def log(record: dict[str, Any]) -> None:
    with _log_lock:
        print(json.dumps(record), file=sys.stderr, flush=True)


def build_tls(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    """Server context for payments' partner endpoint: a client certificate is REQUIRED."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(client_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    from meshcar_tlsprofile import apply_profile

    return apply_profile(ctx)  # X25519/P-256/P-384 only; the client's cipher order


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="meshcar demo-app", description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="service name (web, api, payments)")
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--tls-cert", help="server certificate (PEM, chain) for TLS mode")
    p.add_argument("--tls-key", help="server key for TLS mode")
    p.add_argument("--tls-client-ca", help="CA that client certificates must chain to")
    p.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="expect a PROXY protocol v1/v2 header before TLS from --proxy-trusted "
        "peers (the header's source address is reported under proxy_protocol)",
    )
    p.add_argument(
        "--proxy-trusted",
        action="append",
        metavar="CIDR",
        help="a network whose peers may (and must) send a PROXY header; repeatable "
        "(default: 127.0.0.1/32 and ::1/128). A header from anyone else is refused; "
        "they are served as direct clients when they send none",
    )
    p.add_argument(
        "--proxy-optional",
        action="store_true",
        help="serve a trusted peer that sends no PROXY header as a direct client "
        "(default: refuse it)",
    )
    p.add_argument(
        "--h2c",
        action="store_true",
        help="also serve gRPC (payments' Quote) over prior-knowledge h2c on --port",
    )
    p.add_argument("--ledger-port", type=int, help="serve the ledger database on this port")
    p.add_argument(
        "--db",
        action="append",
        default=[],
        metavar="PEER=HOST:PORT",
        help="the sidecar's opaque TCP tunnel to PEER's ledger database; repeatable",
    )
    args = p.parse_args(argv)
    args.dbs = []
    for item in args.db:
        peer, _, hostport = item.partition("=")
        host, _, port = hostport.rpartition(":")
        if not peer or not host or not port.isdigit():
            p.error(f"--db {item!r}: want PEER=HOST:PORT")
        args.dbs.append((peer, host, int(port)))
    tls_args = (args.tls_cert, args.tls_key, args.tls_client_ca)
    if any(tls_args) and not all(tls_args):
        p.error("--tls-cert, --tls-key and --tls-client-ca go together")
    if (args.proxy_trusted or args.proxy_optional) and not args.proxy_protocol:
        p.error("--proxy-trusted and --proxy-optional need --proxy-protocol")
    args.proxy_policy = None
    if args.proxy_protocol:
        try:
            args.proxy_policy = (
                pp.ProxyPolicy.parse(args.proxy_trusted, not args.proxy_optional)
                if args.proxy_trusted
                else pp.ProxyPolicy(required=not args.proxy_optional)
            )
        except ValueError as exc:
            p.error(f"--proxy-trusted: {exc}")
    return args


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwind serve_forever and close the listener


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    tls = build_tls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    config = AppConfig(
        args.name,
        args.host,
        args.port,
        os.environ.get("HTTP_PROXY") or None,
        tls,
        proxy_protocol=args.proxy_policy,
        h2c=args.h2c,
        dbs=tuple(args.dbs),
    )
    ledger = None
    try:
        server = DemoServer(config)
        if args.ledger_port is not None:
            ledger = ledgerdb.LedgerServer(args.host, args.ledger_port)
    except OSError as exc:
        print(f"meshcar demo-app: cannot listen on {args.host}: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _stop)
    log(
        {
            "event": "app.ready",
            "service": args.name,
            "listen": f"{args.host}:{args.port}",
            "tls": tls is not None,
        }
    )
    if ledger is not None:
        ledger.start()
        log({"event": "ledger.ready", "listen": f"{args.host}:{args.ledger_port}"})
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if ledger is not None:
            ledger.shutdown()
            ledger.server_close()
    return 0
