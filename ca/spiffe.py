"""SPIFFE IDs and trust domains as the CA accepts them (a pure module).

The CA only ever issues `spiffe://TD/path` with TD its own trust domain. The rules follow the
SPIFFE ID spec: lowercase trust domain of letters, digits, `.`, `-`, `_`; a non-empty path
of segments made of letters, digits, `.`, `-`, `_`, none of them empty, `.` or `..`; no
query, fragment, port or user info.
"""

from __future__ import annotations

import re

from .errors import InvalidSpiffeId

_TD = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
MAX_ID_LENGTH = 2048


def check_trust_domain(td: str) -> str:
    """Return `td` if it is a valid trust domain name, else raise InvalidSpiffeId."""
    if not _TD.fullmatch(td) or td.startswith((".", "-")) or ".." in td:
        raise InvalidSpiffeId(
            f"invalid trust domain {td!r}: use lowercase letters, digits, '.', '-', '_'"
        )
    return td


def check_spiffe_id(spiffe_id: str, trust_domain: str) -> str:
    """Return `spiffe_id` if it is a valid workload ID in `trust_domain`, else raise."""
    if len(spiffe_id) > MAX_ID_LENGTH:
        raise InvalidSpiffeId("SPIFFE ID is too long")
    prefix = "spiffe://"
    if not spiffe_id.startswith(prefix):
        raise InvalidSpiffeId(f"SPIFFE ID {spiffe_id!r} must start with spiffe://")
    rest = spiffe_id[len(prefix) :]
    td, slash, path = rest.partition("/")
    if td != trust_domain:
        raise InvalidSpiffeId(
            f"SPIFFE ID {spiffe_id!r} is outside the trust domain {trust_domain!r}"
        )
    if not slash or not path:
        raise InvalidSpiffeId(f"SPIFFE ID {spiffe_id!r} needs a path (spiffe://{td}/svc/NAME)")
    for segment in path.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise InvalidSpiffeId(
                f"SPIFFE ID {spiffe_id!r} has an invalid path segment {segment!r}"
            )
    return spiffe_id
