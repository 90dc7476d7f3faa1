"""Request ids and W3C trace context, one hop at a time (sans-IO).

Every HTTP/1.1 request a sidecar forwards carries `x-request-id` and `traceparent`
(https://www.w3.org/TR/trace-context/):

- `x-request-id`: kept when the request brings one (the app's, or the calling sidecar's),
  generated otherwise (32 hex digits); at most 128 visible ASCII characters, else replaced.
- `traceparent` `00-TRACEID-PARENTID-FLAGS`: the trace id and flags are kept, the parent id is
  replaced by a new span id, this hop's; the span the request came from is the log line's
  `parent_span_id`. Absent or malformed: a new trace (random trace id, flags 01). `tracestate`
  is passed on untouched.

`stamp(headers)` rewrites the list in place (the role's header copy forwards them) and returns
what the access log needs. The cost is two `os.urandom` calls and a scan of the headers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

Headers = list[tuple[bytes, bytes]]  # as meshcar.proto.http1.Headers

REQUEST_ID = b"x-request-id"
TRACEPARENT = b"traceparent"
_HEX = frozenset(b"0123456789abcdef")
_MAX_ID = 128


@dataclass(frozen=True, slots=True)
class Hop:
    request_id: str
    trace_id: str
    span_id: str  # this hop's, sent onward as the traceparent's parent id
    parent_span_id: str | None  # the caller's span (None: this hop began the trace)

    def fields(self) -> dict[str, str | None]:
        return {
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
        }


def _is_hex(b: bytes, n: int) -> bool:
    return len(b) == n and all(c in _HEX for c in b) and b.count(b"0") != n


def parse_traceparent(value: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(trace id, parent id, flags) of a valid version-00 (or later) traceparent."""
    parts = value.strip().lower().split(b"-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == b"ff":
        return None
    version, trace_id, parent, flags = parts[0], parts[1], parts[2], parts[3]
    if version == b"00" and len(parts) != 4:
        return None
    if not all(c in _HEX for c in version) or not _is_hex(trace_id, 32):
        return None
    if not _is_hex(parent, 16) or len(flags) != 2 or not all(c in _HEX for c in flags):
        return None
    return trace_id, parent, flags


def _good_id(value: bytes) -> bool:
    return 0 < len(value) <= _MAX_ID and all(0x21 <= c <= 0x7E for c in value)


def stamp(headers: Headers) -> Hop:
    """Set this hop's `x-request-id` and `traceparent` in `headers` (in place)."""
    rid = tp = None
    ri = ti = -1
    for i, (k, v) in enumerate(headers):
        if len(k) == 12 and k.lower() == REQUEST_ID:
            rid, ri = v, i
        elif len(k) == 11 and k.lower() == TRACEPARENT:
            tp, ti = v, i
    if rid is None or not _good_id(rid):
        rid = os.urandom(16).hex().encode()
    parsed = parse_traceparent(tp) if tp is not None else None
    span = os.urandom(8).hex().encode()
    if parsed is None:
        trace_id, parent, flags = os.urandom(16).hex().encode(), None, b"01"
    else:
        trace_id, parent, flags = parsed[0], parsed[1], parsed[2]
    value = b"00-" + trace_id + b"-" + span + b"-" + flags
    if ri >= 0 or ti >= 0:  # one id and one trace context per request: duplicates dropped
        headers[:] = [h for h in headers if h[0].lower() not in (REQUEST_ID, TRACEPARENT)]
    headers.append((b"x-request-id", rid))
    headers.append((b"traceparent", value))
    return Hop(
        rid.decode("ascii"),
        trace_id.decode(),
        span.decode(),
        parent.decode() if parent is not None else None,
    )
