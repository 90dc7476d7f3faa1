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
import re
from dataclasses import dataclass

Headers = list[tuple[bytes, bytes]]  # as meshcar.proto.http1.Headers

REQUEST_ID = b"x-request-id"
TRACEPARENT = b"traceparent"
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


_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ID = re.compile(rb"[\x21-\x7e]{1,%d}" % _MAX_ID)
_ZERO_TRACE, _ZERO_SPAN = b"0" * 32, b"0" * 16


def parse_traceparent(value: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(trace id, parent id, flags) of a valid traceparent: version 00 exactly as the spec
    writes it, a later version (not ff) with possibly more fields after the flags."""
    m = _TRACEPARENT.fullmatch(value.strip().lower())
    if m is None:
        return None
    version, trace_id, parent, flags, rest = m.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or parent == _ZERO_SPAN:
        return None
    return trace_id, parent, flags


def _good_id(value: bytes) -> bool:
    return _ID.fullmatch(value) is not None


def _find(headers: Headers) -> tuple[bytes | None, bytes | None, bool]:
    """(the request id, the traceparent, whether either header is there)."""
    rid = tp = None
    found = False
    for k, v in headers:
        if len(k) == 12 and k.lower() == REQUEST_ID:
            rid, found = v, True
        elif len(k) == 11 and k.lower() == TRACEPARENT:
            tp, found = v, True
    return rid, tp, found


def stamp(headers: Headers) -> Hop:
    """Set this hop's `x-request-id` and `traceparent` in `headers` (in place)."""
    rid, tp, found = _find(headers)
    if rid is None or not _good_id(rid):
        rid = os.urandom(16).hex().encode()
    parsed = parse_traceparent(tp) if tp is not None else None
    rand = os.urandom(24).hex().encode()  # one call: the span id, and a trace id if needed
    span = rand[:16]
    if parsed is None:
        trace_id, parent, flags = rand[16:], None, b"01"
    else:
        trace_id, parent, flags = parsed[0], parsed[1], parsed[2]
    value = b"00-" + trace_id + b"-" + span + b"-" + flags
    if found:  # one id and one trace context per request: duplicates dropped
        headers[:] = [h for h in headers if h[0].lower() not in (REQUEST_ID, TRACEPARENT)]
    headers.append((b"x-request-id", rid))
    headers.append((b"traceparent", value))
    return Hop(
        rid.decode("ascii"),
        trace_id.decode(),
        span.decode(),
        parent.decode() if parent is not None else None,
    )
