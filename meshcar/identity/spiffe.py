"""SPIFFE IDs: parse and validate `spiffe://trust-domain/path` (SPIFFE ID spec, section 2)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshcar.errors import IdentityError

_TD_RE = re.compile(r"^[a-z0-9._-]+$")
_SEG_RE = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_LEN = 2048


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str  # begins with "/", never ends with "/"

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if not isinstance(text, str) or not text:
            raise IdentityError("SPIFFE ID is empty")
        if len(text) > MAX_LEN:
            raise IdentityError("SPIFFE ID is too long")
        if not text.startswith("spiffe://"):
            raise IdentityError(f"SPIFFE ID {text!r} must start with spiffe://")
        rest = text[len("spiffe://"):]
        td, sep, path = rest.partition("/")
        if not td or not _TD_RE.match(td):
            raise IdentityError(f"SPIFFE ID {text!r} has an invalid trust domain")
        if not sep or not path:
            raise IdentityError(f"SPIFFE ID {text!r} has no path")
        for seg in path.split("/"):
            if not seg or seg in (".", "..") or not _SEG_RE.match(seg):
                raise IdentityError(f"SPIFFE ID {text!r} has an invalid path segment {seg!r}")
        return cls(td, "/" + path)

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def parse_spiffe_id(text: str) -> SpiffeId:
    return SpiffeId.parse(text)
