"""Which admin paths may be served to peers off loopback (the `admin.public_paths` policy).

Pure data and one parser, shared by the sidecar's and the edge's config and the admin server.
"""

from __future__ import annotations

PUBLIC_PATHS = frozenset({b"/live", b"/ready", b"/metrics"})  # default `admin.public_paths`
# What `admin.public_paths` may name: the read-only views. Mutating endpoints (/renew,
# /shutdown) and anything unknown can never be served off loopback.
MAY_BE_PUBLIC = frozenset({b"/live", b"/ready", b"/metrics", b"/certs"})


def parse_public_paths(val: object) -> tuple[frozenset[bytes] | None, list[str]]:
    """`admin.public_paths` from config: (the set, []) or (None, every problem found)."""
    if not isinstance(val, list) or not all(isinstance(p, str) for p in val):
        return None, ["must be a list of paths, e.g. [/live, /ready, /metrics]"]
    problems = []
    for p in val:
        if p.encode("latin-1", "replace") not in MAY_BE_PUBLIC:
            problems.append(
                f"{p!r} cannot be served off loopback (only the read-only "
                f"{', '.join(sorted(x.decode() for x in MAY_BE_PUBLIC))} may be; "
                "/renew and /shutdown are loopback only, always)"
            )
    if problems:
        return None, problems
    return frozenset(p.encode() for p in val), []
