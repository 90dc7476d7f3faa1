"""The one place an error or a refusal becomes the response written downstream.

Every error of the request path carries its status hint, a short reason and whether an
answer is still possible (`meshcar.errors`). `refusal_for` maps any of them to a `Refuse`
(or to None: the client is gone or the response already began, so only closing is left);
`answer` writes a `Refuse` as a JSON error (`{"error": status, "message": ...}`) and says
whether the connection may carry another request. The roles' own refusals (403, 404, 429,
...) are `Refuse` decisions written by the same function.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from meshcar.errors import MeshcarError, UpstreamError
from meshcar.net.errors import CONNECTION_ERRORS
from meshcar.net.httpconn import HttpConn
from meshcar.proto.headers import simple_response
from meshcar.proto.http1 import RequestHead

JSON = b"application/json"


@dataclass(frozen=True, slots=True)
class Refuse:
    """A decision: answer the request with `status` and `message` instead of forwarding it.
    `headers` are added (Retry-After, ...); `close` ends the connection after the answer
    (it also ends when the request has a body nobody read)."""

    status: int
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()
    close: bool = False
    reason: str = field(default="", compare=False)  # the access log's; "": REASONS[status]


# The access log's `reason` of a refusal that names none, by status.
REASONS = {
    400: "bad_request",
    403: "denied",
    404: "no_route",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "body_too_large",
    421: "misdirected",
    429: "rate_limited",
    431: "headers_too_large",
    502: "no_upstream",
    503: "unavailable",
    504: "upstream_timeout",
}


def reason_of(status: int, decision: object, error: MeshcarError | None) -> str | None:
    """The access log's `reason` of a request that ended with `status`: the error's (every
    MeshcarError has one), the refusal's, or `upstream_status` when the upstream itself
    answered it; None for 1xx and 2xx."""
    if status < 300 and error is None:
        return None
    if error is not None:
        return error.reason
    if isinstance(decision, Refuse):
        return decision.reason or REASONS.get(status, "refused")
    return "upstream_status"


# gRPC's status code for a refusal or error answered with this HTTP status (gRPC over
# HTTP/2: a gRPC error is a Trailers-Only response, HTTP 200 with grpc-status).
GRPC_STATUS = {
    400: 13,  # INTERNAL (a malformed request)
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED: allow list, authz, WAF, client certificate
    404: 12,  # UNIMPLEMENTED
    408: 4,  # DEADLINE_EXCEEDED
    413: 8,  # RESOURCE_EXHAUSTED
    421: 14,  # UNAVAILABLE (misdirected: another connection may take it)
    429: 8,  # RESOURCE_EXHAUSTED: rate limit
    431: 8,
    502: 14,  # UNAVAILABLE: upstream unreachable, refused, failed
    503: 14,
    504: 4,  # DEADLINE_EXCEEDED
}


def grpc_message(message: str) -> bytes:
    """grpc-message's value: UTF-8, percent-encoded outside printable ASCII and for '%'."""
    out = bytearray()
    for byte in message.encode()[:500]:
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def grpc_refusal(status: int, message: str) -> list[tuple[bytes, bytes]]:
    """The headers of a Trailers-Only gRPC answer to a refusal or error that has HTTP status
    `status`: 200, application/grpc, grpc-status (UNKNOWN for an unmapped status) and
    grpc-message (the refusal's text, as the JSON error body carries it)."""
    code = GRPC_STATUS.get(status, 2)
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", str(code).encode()),
        (b"grpc-message", grpc_message(message)),
    ]


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": status, "message": message}).encode() + b"\n"


def refusal_for(exc: MeshcarError, upstream: str = "") -> Refuse | None:
    """The answer an error hints, or None when no answer can be written any more.
    `upstream` names the upstream in an UpstreamError's message ("app at 127.0.0.1:8080")."""
    if not exc.answer:
        return None
    message = f"{upstream}: {exc}" if upstream and isinstance(exc, UpstreamError) else str(exc)
    return Refuse(exc.status, message, close=exc.close, reason=exc.reason)


async def answer(down: HttpConn, refuse: Refuse, req: RequestHead | None = None) -> bool:
    """Write `refuse` downstream; True if the connection may carry another request (not
    closed by the refusal, and the request, if given, had no body left unread). A client
    that went away while we answered is not an error here: the connection closes."""
    close = refuse.close or (req is not None and (req.chunked or bool(req.content_length)))
    data = simple_response(
        refuse.status,
        error_body(refuse.status, refuse.message),
        content_type=JSON,
        extra=list(refuse.headers) if refuse.headers else None,
        close=close,
    )
    try:
        await down.send(data)
    except CONNECTION_ERRORS:
        return False
    return not close
