"""SPIFFE IDs for meshcar: `meshcar_spiffe`'s parser (the one the CA uses too), raising
meshcar's IdentityError. The rules and their sources are in meshcar_spiffe/__init__.py."""

from __future__ import annotations

import meshcar_spiffe
from meshcar.errors import IdentityError

MAX_LEN = meshcar_spiffe.MAX_ID_LENGTH


class SpiffeId(meshcar_spiffe.SpiffeId):
    """`SpiffeId.parse` raising IdentityError; the IDs it returns are meshcar_spiffe.SpiffeId."""

    __slots__ = ()

    @classmethod
    def parse(cls, text: str) -> meshcar_spiffe.SpiffeId:
        try:
            return meshcar_spiffe.parse(text)
        except meshcar_spiffe.InvalidSpiffeId as exc:
            raise IdentityError(str(exc)) from None
