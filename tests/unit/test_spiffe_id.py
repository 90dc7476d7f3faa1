"""The one SPIFFE ID parser (meshcar_spiffe), as the sidecar/edge and the CA both apply it.

A vector table (each row checked through meshcar's SpiffeId, the X509-SVID check's parser and
the CA's check_spiffe_id, which must all agree) and hypothesis properties: generated valid IDs
parse and round-trip; a forbidden character spliced in anywhere is refused.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from meshcar_ca.errors import InvalidSpiffeId
from meshcar_ca.spiffe import check_spiffe_id, check_trust_domain

import meshcar_spiffe
from meshcar.errors import IdentityError
from meshcar.identity.spiffe import SpiffeId

VALID = [
    "spiffe://meshcar.demo/svc/api",
    "spiffe://td/a",
    "spiffe://a-b.c_d/x/y.z/w-1",
    "spiffe://-td/x",  # the spec allows '-' anywhere in a trust domain (both sides accept it)
    "spiffe://.td/x",
    "spiffe://a..b/x",
    "spiffe://td/...",  # '...' is not a dot segment
    "spiffe://td/.x/x./_/-",
    "spiffe://" + "a" * 255 + "/x",
    "spiffe://td/" + "a" * (2048 - len("spiffe://td/")),  # exactly 2048
]

INVALID = [
    "",
    "http://td/x",
    "SPIFFE://td/x",
    "spiffe:/td/x",
    "spiffe://",
    "spiffe:///x",
    "spiffe://td",
    "spiffe://td/",
    "spiffe://td/x/",
    "spiffe://TD/x",
    "spiffe://tD/x",
    "spiffe://td//x",
    "spiffe://td/./x",
    "spiffe://td/../x",
    "spiffe://td/x/..",
    "spiffe://td/x/.",
    "spiffe://td/x?y",
    "spiffe://td/x#y",
    "spiffe://td?/x",
    "spiffe://us%65r@td/x",
    "spiffe://user@td/x",
    "spiffe://td:443/x",
    "spiffe://td/%41",
    "spiffe://td/a b",
    "spiffe://td/é",
    "spiffe://tdé/x",
    "spiffe://td/x\n",
    "spiffe://td\n/x",
    "spiffe://td/x\x00",
    " spiffe://td/x",
    "spiffe://td/x ",
    "spiffe://" + "a" * 256 + "/x",
    "spiffe://td/" + "a" * (2049 - len("spiffe://td/")),  # 2049
]


def _meshcar_accepts(text: str) -> bool:
    try:
        SpiffeId.parse(text)
    except IdentityError:
        return False
    return True


def _ca_accepts(text: str) -> bool:
    td = text[len("spiffe://") :].partition("/")[0] if text.startswith("spiffe://") else "td"
    try:
        check_spiffe_id(text, td)
    except InvalidSpiffeId:
        return False
    return True


@pytest.mark.parametrize("text", VALID)
def test_valid_vectors_parse_on_both_sides(text: str) -> None:
    sid = SpiffeId.parse(text)
    assert str(sid) == text
    assert isinstance(sid, meshcar_spiffe.SpiffeId)
    assert _ca_accepts(text)
    assert check_trust_domain(sid.trust_domain) == sid.trust_domain


@pytest.mark.parametrize("text", INVALID)
def test_invalid_vectors_are_refused_on_both_sides(text: str) -> None:
    assert not _meshcar_accepts(text)
    assert not _ca_accepts(text)
    with pytest.raises(meshcar_spiffe.InvalidSpiffeId):
        meshcar_spiffe.parse(text)


def test_ca_still_checks_its_own_trust_domain() -> None:
    with pytest.raises(InvalidSpiffeId, match="outside the trust domain"):
        check_spiffe_id("spiffe://other/x", "td")


def test_errors_are_one_line_and_bounded() -> None:
    with pytest.raises(meshcar_spiffe.InvalidSpiffeId) as e:
        meshcar_spiffe.parse("spiffe://td/" + "a" * 100_000)
    assert len(str(e.value)) < 200
    with pytest.raises(meshcar_spiffe.InvalidSpiffeId):
        meshcar_spiffe.parse(None)  # type: ignore[arg-type]


TD_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
SEG_CHARS = TD_CHARS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
trust_domains = st.text(TD_CHARS, min_size=1, max_size=40)
segments = st.text(SEG_CHARS, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))
valid_ids = st.builds(
    lambda td, segs: f"spiffe://{td}/" + "/".join(segs),
    trust_domains,
    st.lists(segments, min_size=1, max_size=8),
)


@given(valid_ids)
def test_generated_valid_ids_parse_and_round_trip(text: str) -> None:
    sid = meshcar_spiffe.parse(text)
    assert str(sid) == text
    assert meshcar_spiffe.parse(str(sid)) == sid
    assert SpiffeId.parse(text) == sid
    assert _ca_accepts(text)


@given(
    st.builds(
        meshcar_spiffe.SpiffeId,
        trust_domains,
        st.lists(segments, min_size=1, max_size=8).map(lambda s: "/" + "/".join(s)),
    )
)
def test_str_of_an_id_parses_back_to_it(sid: meshcar_spiffe.SpiffeId) -> None:
    assert meshcar_spiffe.parse(str(sid)) == sid


# Characters that may appear nowhere in a SPIFFE ID (':' '/' are structural, tested above).
FORBIDDEN = st.one_of(
    st.sampled_from(list("?#@%[] \t\r\n\x00\\!$&'()*+,;=~\"<>^`{|}")),
    st.characters(min_codepoint=0x80, max_codepoint=0x10FFFF, exclude_categories=("Cs",)),
)


@given(valid_ids, FORBIDDEN, st.integers(min_value=len("spiffe://"), max_value=10_000))
def test_a_forbidden_character_anywhere_is_refused(text: str, bad: str, at: int) -> None:
    at = min(at, len(text))
    mutated = text[:at] + bad + text[at:]
    assert not _meshcar_accepts(mutated)
    assert not _ca_accepts(mutated)


@given(valid_ids, st.sampled_from(["/", "/.", "/..", "//x", "/x/"]))
def test_bad_path_shapes_appended_are_refused(text: str, tail: str) -> None:
    assert not _meshcar_accepts(text + tail)
    assert not _ca_accepts(text + tail)


@given(valid_ids, st.sampled_from(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")))
def test_an_uppercase_trust_domain_is_refused(text: str, upper: str) -> None:
    mutated = "spiffe://" + upper + text[len("spiffe://") :]
    assert not _meshcar_accepts(mutated)
    assert not _ca_accepts(mutated)
