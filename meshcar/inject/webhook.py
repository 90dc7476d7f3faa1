"""`meshcar webhook`: a mutating admission webhook (AdmissionReview v1) for sidecar injection.

Theory of operation: the API server POSTs an AdmissionReview to `/inject` over HTTPS. The
pure part, `review_response(body, options)`, runs the same `inject_object` as `meshcar
inject` on `request.object` and answers with the JSONPatch (RFC 6902, base64) from the
object before to the object after. The I/O part is trio + h11: `serve_webhook` binds with
`nursery.start`, every connection runs in its own task under `fail_after` timeouts, and any
error in one connection is logged and ends only that connection.

What the API server gets:
- a well-formed review: HTTP 200 with an AdmissionReview response, `allowed: true`, and
  either the patch, or no patch (other kinds, opted out, already injected), or -- when the
  pod cannot be injected (hostNetwork, no app port, a bad annotation) -- no patch and a
  `warnings` entry saying why: an injector must not block workloads, and kubectl shows the
  warning to the user;
- a pod with wrong-typed fields (`ShapeError`, e.g. `env` as a mapping): `allowed: false`
  with a 400 status naming the field (admitting it would create a pod without a sidecar);
- a malformed review (not JSON, not an AdmissionReview v1, no `request.uid`, nesting over
  MAX_JSON_DEPTH or more than MAX_JSON_VALUES values, checked before parsing): HTTP 400 with
  `{"error": "bad_review", "message": ...}`. Without a uid there is no valid AdmissionReview
  answer; the API server treats a non-200 as a failed call and applies `failurePolicy`.
`GET /healthz` answers 200 for the Deployment's probes.

The process runs under the process shell (net/shell.py): on SIGTERM the listener closes,
requests in flight are answered (up to `--drain-seconds`), keep-alive connections close after
their current request, and the process exits 0; 1 on a fatal error, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import re
import ssl
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

import h11
import jsonpatch
import trio

from meshcar.inject.cli import add_option_arguments, options_from_args
from meshcar.inject.patch import InjectError, InjectOptions, ShapeError, inject_object, object_name
from meshcar.net.drain import Drain
from meshcar.net.shell import Shell, run_process
from meshcar_tlsprofile import apply_profile

log = logging.getLogger("meshcar.webhook")

# Bounded memory for any body. A Pod CREATE review carries one object, and etcd's default
# request limit makes objects at most 1.5 MiB, so 2 MiB refuses no real review (413 at once
# when Content-Length says more; a chunked body is counted as it arrives). Parsed JSON costs
# 20-70 times its text in Python objects when it is made of many small values (`[{},{},...]`),
# and injection copies it, so before parsing the body's values and nesting are counted
# (one regex pass, strings skipped): a pod has a few thousand values and a depth near 12.
MAX_BODY = 2 * 1024 * 1024
MAX_JSON_VALUES = 50_000
MAX_JSON_DEPTH = 64
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{\]},]')
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
IDLE_TIMEOUT = 60.0
LINGER_SECONDS = 2.0  # after refusing a body, read and drop what is in flight (no RST)
LINGER_BYTES = 16 * 1024 * 1024
HANDSHAKE_TIMEOUT = 10.0
INJECT_PATH = "/inject"
# Memory is bounded per request above; these bound it per process. Over MAX_CONNECTIONS a
# connection is closed before its TLS handshake (counted, logged); at most
# REVIEWS_IN_FLIGHT bodies are read and parsed at once (the others wait, their bytes in the
# kernel's buffers): with 2 MiB bodies that is ~8 MiB of text plus its parse, well inside
# the manifest's 128 Mi.
MAX_CONNECTIONS = 512
REVIEWS_IN_FLIGHT = 4


class BadReview(Exception):
    """The request body is not a usable AdmissionReview v1."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


def _bad(message: str) -> Answer:
    return Answer(400, {"error": "bad_review", "message": message})


def _review(response: dict[str, Any]) -> Answer:
    return Answer(
        200, {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
    )


def _deny(response: dict[str, Any], message: str) -> Answer:
    """A review that parsed but whose object is malformed: denied, with the reason."""
    log.warning("denied: %s", message)
    return _review(
        dict(
            response,
            allowed=False,
            status={"code": 400, "reason": "BadRequest", "message": f"meshcar: {message}"},
        )
    )


def check_json_bounds(body: bytes) -> None:
    """BadReview when the JSON text has more than MAX_JSON_VALUES values or nests deeper
    than MAX_JSON_DEPTH (a conservative count on the text; `json.loads` still validates)."""
    depth = values = 0
    for match in _JSON_TOKEN.finditer(body):
        c = match.group()[0]
        if c == 0x22:  # a string: skipped whole
            continue
        if c in b"[{":
            depth += 1
            values += 1
            if depth > MAX_JSON_DEPTH:
                raise BadReview(f"body nests deeper than {MAX_JSON_DEPTH} levels")
        elif c in b"]}":
            depth -= 1
        else:
            values += 1
        if values > MAX_JSON_VALUES:
            raise BadReview(f"body has more than {MAX_JSON_VALUES} JSON values")


def parse_review(body: bytes) -> dict[str, Any]:
    check_json_bounds(body)
    try:
        review = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadReview(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise BadReview("body nests too deeply") from None
    if not isinstance(review, dict):
        raise BadReview("body is not a JSON object")
    if review.get("apiVersion") != "admission.k8s.io/v1" or review.get("kind") != "AdmissionReview":
        raise BadReview("expected apiVersion admission.k8s.io/v1, kind AdmissionReview")
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("missing request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("missing request.uid")
    obj = request.get("object")
    if obj is not None and not isinstance(obj, dict):
        raise BadReview("request.object is not an object")
    return review


def review_response(body: bytes, options: InjectOptions) -> Answer:
    """Pure: an AdmissionReview request body -> the HTTP answer."""
    try:
        review = parse_review(body)
    except BadReview as exc:
        return _bad(str(exc))
    request = review["request"]
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    obj = request.get("object")
    if request.get("operation", "CREATE") in ("CREATE", "UPDATE") and isinstance(obj, dict):
        before = obj
        if "kind" not in before and isinstance(request.get("kind"), dict):
            # the API server always sets kind on the object; be lenient with hand-made reviews
            before = dict(obj, kind=request["kind"].get("kind"))
        try:
            after = inject_object(before, options)
        except ShapeError as exc:
            return _deny(response, str(exc))
        except RecursionError:
            return _deny(response, f"{object_name(before)}: nests too deeply")
        except InjectError as exc:
            response["warnings"] = [f"meshcar: not injected: {exc}"]
            log.warning("not injected: %s", exc)
        else:
            if after is not before:
                patch = jsonpatch.make_patch(before, after).patch
                response["patchType"] = "JSONPatch"
                response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode("ascii")
                ns = request.get("namespace")
                log.info("injected %s%s", object_name(after), f" in {ns}" if ns else "")
    return _review(response)


async def _send(stream: trio.abc.Stream, conn: h11.Connection, event: Any) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def _answer(stream: trio.abc.Stream, conn: h11.Connection, answer: Answer) -> None:
    payload = json.dumps(answer.body).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(payload)))]
    if conn.our_state is h11.SEND_RESPONSE and answer.status >= 400:
        headers.append(("connection", "close"))
    await _send(stream, conn, h11.Response(status_code=answer.status, headers=headers))
    await _send(stream, conn, h11.Data(data=payload))
    await _send(stream, conn, h11.EndOfMessage())


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(65536)
        conn.receive_data(bytes(data))  # b"" means EOF


async def _refuse_body(stream: trio.abc.Stream, conn: h11.Connection) -> None:
    """413, then a lingering close: drain what the client is still sending for a moment, so
    that closing does not reset the connection before the client has read the answer."""
    await _answer(
        stream, conn, Answer(413, {"error": "too_large", "message": f"body over {MAX_BODY} bytes"})
    )
    drained = 0
    with trio.move_on_after(LINGER_SECONDS):
        while drained < LINGER_BYTES:
            data = await stream.receive_some(65536)
            if not data:
                break
            drained += len(data)


async def _handle_request(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    request: h11.Request,
    options: InjectOptions,
    reviews: trio.CapacityLimiter | None = None,
) -> bool:
    """Serve one request; returns False when the connection must close."""
    declared = dict(request.headers).get(b"content-length", b"0")
    if (
        declared.isdigit() and int(declared) > MAX_BODY
    ):  # answer before reading a body we will not accept
        await _refuse_body(stream, conn)
        return False
    if reviews is None:
        return await _read_and_answer(stream, conn, request, options)
    async with reviews:
        return await _read_and_answer(stream, conn, request, options)


async def _read_and_answer(
    stream: trio.abc.Stream, conn: h11.Connection, request: h11.Request, options: InjectOptions
) -> bool:
    target = request.target.split(b"?", 1)[0]
    body = bytearray()
    too_large = False
    with trio.fail_after(BODY_TIMEOUT):
        while True:
            event = await _next_event(stream, conn)
            if isinstance(event, h11.Data):
                if len(body) + len(event.data) > MAX_BODY:
                    too_large = True
                    break
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return False
    if too_large:
        await _refuse_body(stream, conn)
        return False
    if request.method == b"GET" and target == b"/healthz":
        answer = Answer(200, {"status": "ok"})
    elif target != INJECT_PATH.encode():
        answer = Answer(
            404, {"error": "not_found", "message": f"POST AdmissionReview to {INJECT_PATH}"}
        )
    elif request.method != b"POST":
        answer = Answer(405, {"error": "method_not_allowed", "message": "use POST"})
    else:
        answer = review_response(bytes(body), options)
    await _answer(stream, conn, answer)
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def handle_connection(
    stream: trio.SSLStream,
    options: InjectOptions,
    drain: Drain | None = None,
    reviews: trio.CapacityLimiter | None = None,
) -> None:
    """One connection: TLS handshake, then keep-alive requests until close, a timeout, or
    (with `drain`) the end of the request in flight once the process is draining."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await stream.do_handshake()
        while True:
            with trio.fail_after(IDLE_TIMEOUT if conn.their_state is h11.IDLE else HEADER_TIMEOUT):
                event = await _next_event(stream, conn)
            if not isinstance(event, h11.Request):
                break
            if drain is None:
                keep = await _handle_request(stream, conn, event, options, reviews)
            else:
                with drain:
                    keep = await _handle_request(stream, conn, event, options, reviews)
                keep = keep and not drain.draining
            if not keep:
                break
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                await _answer(
                    stream,
                    conn,
                    Answer(exc.error_status_hint, {"error": "bad_http", "message": str(exc)}),
                )
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
                pass
    except (
        trio.TooSlowError,
        trio.BrokenResourceError,
        trio.ClosedResourceError,
        ssl.SSLError,
        OSError,
    ):
        pass
    except Exception:  # one bad connection must never take the server down
        log.exception("webhook connection failed")
    finally:
        with trio.move_on_after(1) as cleanup:
            cleanup.shield = True
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
                pass


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return apply_profile(ctx)  # X25519/P-256/P-384 only; the client's cipher order


async def serve_webhook(
    options: InjectOptions,
    ssl_context: ssl.SSLContext,
    host: str,
    port: int,
    *,
    drain: Drain | None = None,
    handler_nursery: trio.Nursery | None = None,
    max_connections: int = MAX_CONNECTIONS,
    reviews_in_flight: int = REVIEWS_IN_FLIGHT,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `await nursery.start(serve_webhook, ...)` returns the bound listeners.
    Connections run in `handler_nursery` if given (they outlive a drain's closed listener)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    ssl_listeners = [trio.SSLListener(lst, ssl_context, https_compatible=True) for lst in listeners]
    reviews = trio.CapacityLimiter(reviews_in_flight)
    open_connections = 0
    refused = 0

    async def handler(stream: trio.SSLStream) -> None:
        nonlocal open_connections, refused
        if open_connections >= max_connections:
            refused += 1
            log.warning(
                json.dumps(
                    {
                        "event": "webhook.connection_refused",
                        "open": open_connections,
                        "max_connections": max_connections,
                        "refused_total": refused,
                    }
                )
            )
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await stream.transport_stream.aclose()  # before the handshake: no TLS work spent
            return
        open_connections += 1
        try:
            await handle_connection(stream, options, drain, reviews)
        finally:
            open_connections -= 1

    async with trio.open_nursery() as nursery:
        task_status.started(listeners)
        await trio.serve_listeners(
            handler, ssl_listeners, handler_nursery=handler_nursery or nursery
        )


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: level, logger, message (escaped), the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line)


def _drain_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds between 0 and 3600")
    return value


def _split_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="meshcar webhook", description="Mutating admission webhook for meshcar injection."
    )
    parser.add_argument(
        "--listen",
        type=_split_listen,
        default=("127.0.0.1", 8443),
        help="HOST:PORT (default 127.0.0.1:8443)",
    )
    parser.add_argument("--tls-cert", required=True, help="PEM certificate (chain) of the webhook")
    parser.add_argument("--tls-key", required=True, help="PEM private key of the webhook")
    parser.add_argument(
        "--drain-seconds",
        type=_drain_seconds,
        default=10.0,
        help="on SIGTERM, how long requests in flight may finish (default 10)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        help=f"open connections at most; more are closed before TLS (default {MAX_CONNECTIONS})",
    )
    add_option_arguments(parser)
    args = parser.parse_args(argv)
    if args.max_connections < 1:
        parser.error("--max-connections must be at least 1")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        options = options_from_args(args)
    except (InjectError, OSError) as exc:
        print(f"meshcar webhook: {exc}", file=sys.stderr)
        return 2
    try:
        ctx = server_ssl_context(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(
            f"meshcar webhook: cannot load --tls-cert {args.tls_cert} / --tls-key {args.tls_key}: {reason}",
            file=sys.stderr,
        )
        return 2
    host, port = args.listen
    shell = Shell("webhook", args.drain_seconds)

    async def listen(ln: trio.Nursery) -> None:
        listeners = await ln.start(
            partial(
                serve_webhook,
                options,
                ctx,
                host,
                port,
                drain=shell.drain,
                handler_nursery=shell.conns,
                max_connections=args.max_connections,
            )
        )
        bound = listeners[0].socket.getsockname()
        log.info("webhook listening on %s:%d", bound[0], bound[1])

    async def start(shell: Shell) -> None:
        await shell.serve_traffic(listen)

    return run_process("webhook", partial(shell.run, start))
