"""SPIFFE IDs and trust domains as the CA accepts them (a pure module).

The CA only ever issues `spiffe://TD/path` with TD its own trust domain. The rules are
`meshcar_spiffe`'s, the one parser the sidecar and the edge use too (SPIFFE ID spec: see
meshcar_spiffe/__init__.py); this module adds the trust-domain match and the CA's error type.
"""

from __future__ import annotations

import meshcar_spiffe

from .errors import InvalidSpiffeId

MAX_ID_LENGTH = meshcar_spiffe.MAX_ID_LENGTH


def check_trust_domain(td: str) -> str:
    """Return `td` if it is a valid trust domain name, else raise InvalidSpiffeId."""
    try:
        return meshcar_spiffe.parse_trust_domain(td)
    except meshcar_spiffe.InvalidSpiffeId as exc:
        raise InvalidSpiffeId(str(exc)) from None


def check_spiffe_id(spiffe_id: str, trust_domain: str) -> str:
    """Return `spiffe_id` if it is a valid workload ID in `trust_domain`, else raise."""
    try:
        sid = meshcar_spiffe.parse(spiffe_id)
    except meshcar_spiffe.InvalidSpiffeId as exc:
        raise InvalidSpiffeId(str(exc)) from None
    if sid.trust_domain != trust_domain:
        raise InvalidSpiffeId(
            f"SPIFFE ID {spiffe_id!r} is outside the trust domain {trust_domain!r}"
        )
    return spiffe_id
