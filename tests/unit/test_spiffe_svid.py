"""SPIFFE ID parsing and X509-SVID validation (pure)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshcar.errors import IdentityError
from meshcar.identity.spiffe import SpiffeId
from meshcar.tls.svid import svid_from_der
from tests.support.pki import ThrowawayCA


@pytest.mark.parametrize(
    "text",
    [
        "spiffe://meshcar.demo/svc/api",
        "spiffe://td/a",
        "spiffe://a-b.c_d/x/y.z/w-1",
    ],
)
def test_valid_ids_round_trip(text: str) -> None:
    assert str(SpiffeId.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "http://td/x",
        "spiffe://",
        "spiffe://td",
        "spiffe://td/",
        "spiffe://TD/x",
        "spiffe://td/x/",
        "spiffe://td//x",
        "spiffe://td/./x",
        "spiffe://td/../x",
        "spiffe://td/x?y",
        "spiffe://td/x#y",
        "spiffe://us%65r@td/x",
        "spiffe://td:443/x",
        "spiffe://td/" + "a" * 3000,
    ],
)
def test_invalid_ids_are_refused(text: str) -> None:
    with pytest.raises(IdentityError):
        SpiffeId.parse(text)


def _der(chain_pem: str) -> bytes:
    cert = x509.load_pem_x509_certificate(chain_pem.encode())
    return cert.public_bytes(serialization.Encoding.DER)


CA = ThrowawayCA.create()


def test_svid_with_one_uri_is_accepted() -> None:
    chain, _ = CA.leaf(["spiffe://meshcar.demo/svc/api"])
    peer = svid_from_der(_der(chain), trust_domain="meshcar.demo")
    assert peer.spiffe_id == "spiffe://meshcar.demo/svc/api"
    assert len(peer.cert_sha256) == 64


@pytest.mark.parametrize(
    "uris,kw,msg",
    [
        ([], {}, "no SAN"),
        (["spiffe://meshcar.demo/a", "spiffe://meshcar.demo/b"], {}, "exactly one URI SAN"),
        (["spiffe://meshcar.demo/a"], {"ca": True}, "CA certificate"),
        (["spiffe://other.td/a"], {}, "not in trust domain"),
        (["https://meshcar.demo/a"], {}, "must start with spiffe://"),
        (
            ["spiffe://meshcar.demo/a"],
            {"not_before": dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)},
            "not valid now",
        ),
    ],
)
def test_bad_svids_are_refused(uris, kw, msg) -> None:
    chain, _ = CA.leaf(uris, **kw)
    with pytest.raises(IdentityError, match=msg):
        svid_from_der(_der(chain), trust_domain="meshcar.demo")


def test_no_certificate_and_garbage() -> None:
    with pytest.raises(IdentityError, match="no certificate"):
        svid_from_der(None)
    with pytest.raises(IdentityError, match="not valid DER"):
        svid_from_der(b"\x30\x03garbage")


def test_dns_only_certificate_has_no_spiffe_id() -> None:
    chain, _ = CA.leaf([], dns=["api.demo.test"])
    with pytest.raises(IdentityError, match="exactly one URI SAN; this one has 0"):
        svid_from_der(_der(chain))


def _ku(**on: bool) -> x509.KeyUsage:
    flags = dict(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    flags.update(on)
    return x509.KeyUsage(**flags)


@pytest.mark.parametrize(
    "usage",
    [
        dict(key_cert_sign=True),
        dict(crl_sign=True),
        dict(digital_signature=True, key_cert_sign=True),
        dict(digital_signature=True, crl_sign=True),
    ],
)
def test_leaf_with_ca_key_usage_is_refused(usage: dict[str, bool]) -> None:
    """X509-SVID 4.3: a leaf must not set keyCertSign or cRLSign (CA:false is not enough)."""
    chain, _ = CA.leaf(["spiffe://meshcar.demo/svc/api"], key_usage=_ku(**usage))
    with pytest.raises(IdentityError, match="keyCertSign or cRLSign"):
        svid_from_der(_der(chain), trust_domain="meshcar.demo")


def test_leaf_with_signature_key_usage_is_accepted() -> None:
    chain, _ = CA.leaf(["spiffe://meshcar.demo/svc/api"], key_usage=_ku(digital_signature=True))
    assert svid_from_der(_der(chain)).spiffe_id == "spiffe://meshcar.demo/svc/api"
