"""TLS session cache for dialers, keyed by the SSLContext that made each session.

A session can only be resumed with the context that created it: OpenSSL (and Python's
`ssl` module, which raises `ValueError: Session refers to a different SSLContext`) refuse
anything else. Every credential renewal and every trust-bundle change builds a new client
context, so a cached session must never outlive its context. `get(key, ctx)` returns a
session only when it was made by `ctx` (identity, not equality); otherwise the stale entry
is dropped and the dial does a full handshake.
"""

from __future__ import annotations

import ssl
from collections.abc import Hashable


class SessionCache:
    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[ssl.SSLContext, ssl.SSLSession]] = {}

    def get(self, key: Hashable, ctx: ssl.SSLContext) -> ssl.SSLSession | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] is not ctx:
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: Hashable, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> None:
        if session is not None:
            self._entries[key] = (ctx, session)

    def __len__(self) -> int:
        return len(self._entries)
