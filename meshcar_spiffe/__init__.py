"""meshcar_spiffe: the one SPIFFE ID parser, shared by meshcar (sidecar, edge, SVID checks) and
meshcar_ca. It imports neither: both import it, so they can never disagree on what an ID is.

The rules are the SPIFFE ID spec's (standards/SPIFFE-ID.md, sections 2.1-2.3), for workload
IDs (`spiffe://TRUST-DOMAIN/PATH`, a path is required):

* the scheme is exactly `spiffe://`; nothing may follow the trust domain but the path (so no
  userinfo `@`, no port `:`, no query `?` or fragment `#`: none of those characters is allowed);
* trust domain: 1-255 characters, each a lowercase letter, digit, `.`, `-` or `_`. The spec
  allows these characters in any position, so `spiffe://-td/x` and `spiffe://a..b/x` are
  valid IDs (go-spiffe and SPIRE accept them too). A trust domain is not a DNS name; we follow
  the spec rather than refuse IDs a conforming issuer may put in an SVID;
* path: one or more `/SEGMENT`, each segment one or more of `[A-Za-z0-9._-]` and neither
  `.` nor `..`; so no empty segment, no `//`, no trailing `/`, no percent-encoding;
* at most 2048 characters in all (ASCII only, so bytes and characters agree).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "spiffe://"
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")

__all__ = ["MAX_ID_LENGTH", "InvalidSpiffeId", "SpiffeId", "parse", "parse_trust_domain"]


class InvalidSpiffeId(ValueError):
    """The text is not a valid SPIFFE workload ID (or trust domain); the message says why."""


def parse_trust_domain(td: str) -> str:
    """Return `td` if it is a valid trust domain name, else raise InvalidSpiffeId."""
    if not isinstance(td, str) or not td:
        raise InvalidSpiffeId("the trust domain is empty")
    if len(td) > MAX_TRUST_DOMAIN_LENGTH or not _TRUST_DOMAIN.fullmatch(td):
        raise InvalidSpiffeId(
            f"invalid trust domain {td[:300]!r}: use 1-255 lowercase letters, digits, '.', '-', '_'"
        )
    return td


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str  # begins with "/", never ends with "/"

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        td, path = _split(text)
        return cls(td, path)

    def __str__(self) -> str:
        return f"{PREFIX}{self.trust_domain}{self.path}"


def parse(text: str) -> SpiffeId:
    """Parse a SPIFFE workload ID; raise InvalidSpiffeId saying what is wrong."""
    return SpiffeId.parse(text)


def _split(text: str) -> tuple[str, str]:
    if not isinstance(text, str) or not text:
        raise InvalidSpiffeId("SPIFFE ID is empty")
    if len(text) > MAX_ID_LENGTH:
        raise InvalidSpiffeId(f"SPIFFE ID is too long ({len(text)} > {MAX_ID_LENGTH} characters)")
    if not text.startswith(PREFIX):
        raise InvalidSpiffeId(f"SPIFFE ID {text!r} must start with spiffe://")
    td, slash, path = text[len(PREFIX) :].partition("/")
    try:
        parse_trust_domain(td)
    except InvalidSpiffeId:
        raise InvalidSpiffeId(
            f"SPIFFE ID {text!r} has an invalid trust domain (lowercase "
            "letters, digits, '.', '-', '_'; no port, user info, query or "
            "fragment)"
        ) from None
    if not slash or not path:
        raise InvalidSpiffeId(f"SPIFFE ID {text!r} needs a path (spiffe://{td}/svc/NAME)")
    for segment in path.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise InvalidSpiffeId(f"SPIFFE ID {text!r} has an invalid path segment {segment!r}")
    return td, "/" + path
