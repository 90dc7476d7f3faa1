"""Renewing the intermediate from the same root (`ca renew-intermediate`): leaves from before
and after verify against the unchanged bundle; renewals from old leaves are still accepted;
the running issuer follows; metrics and status warn ahead of expiry."""

from __future__ import annotations

import re
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from meshcar_ca import files, intermediate, metrics, pki, rotation
from meshcar_ca.errors import ConfigError
from meshcar_ca.issuer import key_id
from meshcar_ca.tls import ServerTLS

from tests.unit.test_ca_rotation import World


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "ca")


def _verify(
    tmp: Path, bundle: Path, leaf: x509.Certificate, inter: x509.Certificate, at: datetime
) -> None:
    (tmp / "leaf.pem").write_text(pki.cert_pem(leaf))
    (tmp / "inter.pem").write_text(pki.cert_pem(inter))
    r = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(bundle),
            "-untrusted",
            str(tmp / "inter.pem"),
            "-purpose",
            "any",
            "-attime",
            str(int(at.timestamp())),
            str(tmp / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_leaves_before_and_after_verify_against_the_same_bundle(
    world: World, tmp_path: Path
) -> None:
    bundle_before = (world.dir / "bundle.pem").read_bytes()
    old_inter = world.live.current().intermediate
    web, _ = world.bootstrap("web")
    out = intermediate.renew_intermediate(world.dir, world.now)
    assert out["previous"]["serial"] == format(old_inter.serial_number, "x")
    new_inter = (
        world.live.current().intermediate
    )  # the running issuer follows (config.json replaced)
    assert key_id(new_inter) != key_id(old_inter) and out["intermediate"]["key_id"] == key_id(
        new_inter
    )
    assert (world.dir / "bundle.pem").read_bytes() == bundle_before
    assert world.live.bundle().version == 1  # no bundle change
    api, _ = world.bootstrap("api")
    assert api.issuer == new_inter.subject
    _verify(tmp_path, world.dir / "bundle.pem", web, old_inter, world.now)
    _verify(tmp_path, world.dir / "bundle.pem", api, new_inter, world.now)
    # a leaf of the old intermediate still renews over mTLS, and gets one from the new one
    renewed, _ = world.renew(web, bundle_version=1)
    _verify(tmp_path, world.dir / "bundle.pem", renewed, new_inter, world.now)
    st = rotation.status(world.dir, world.now)
    assert st["issuing_intermediate"]["key_id"] == key_id(new_inter)
    assert st["previous_intermediate"]["key_id"] == key_id(old_inter)


def test_renewal_refused_during_a_root_rotation_and_while_old_leaves_live(world: World) -> None:
    world.bootstrap("web")
    intermediate.renew_intermediate(world.dir, world.now)
    world.bootstrap("api")  # from the new intermediate
    with pytest.raises(ConfigError, match="valid until"):  # web's leaf is from the previous one
        intermediate.renew_intermediate(world.dir, world.now)
    world.now += timedelta(seconds=601)  # web's leaf (and api's) expired
    intermediate.renew_intermediate(world.dir, world.now)
    rotation.advance(world.dir, world.now)
    with pytest.raises(ConfigError, match="root rotation is under way"):
        intermediate.renew_intermediate(world.dir, world.now)


def test_previous_intermediate_is_no_longer_accepted_after_it_expires(world: World) -> None:
    web, _ = world.bootstrap("web")
    intermediate.renew_intermediate(world.dir, world.now)
    assert len(world.live.current().issuing_certificates()) == 2
    prev = files.load_cert(world.dir / "previous-intermediate.pem")
    later = prev.not_valid_after_utc + timedelta(seconds=1)
    from meshcar_ca.issuer import BuiltinIssuer

    assert len(BuiltinIssuer.load(world.dir, clock=lambda: later).issuing_certificates()) == 1


def test_a_mismatched_key_and_certificate_keep_the_old_issuer(world: World) -> None:
    before = world.live.current()
    files.write_file(
        world.dir / "intermediate.key", pki.key_pem(pki.new_key()), 0o600
    )  # as if mid-write
    files.write_file(world.dir / "config.json", (world.dir / "config.json").read_text(), 0o644)
    assert world.live.current() is before


def test_api_certificate_follows_the_new_intermediate(world: World) -> None:
    paths, _ = files.open_ca(world.dir)
    tls = ServerTLS(paths, [], clock=lambda: world.now)
    tls.context()
    intermediate.renew_intermediate(world.dir, world.now)
    tls.context()
    leaf, inter = x509.load_pem_x509_certificates(paths.server_pem.read_bytes())
    assert key_id(inter) == key_id(files.load_cert(paths.intermediate_pem))
    assert leaf.issuer == inter.subject


def test_a_worker_loads_the_api_certificate_the_parent_reissues(world: World) -> None:
    """`ca serve --workers N`: only one process re-issues server.pem; the others load it when
    it changes, even if they saw config.json change before it was rewritten."""
    paths, _ = files.open_ca(world.dir)
    parent = ServerTLS(paths, [], clock=lambda: world.now)
    worker = ServerTLS(paths, [], clock=lambda: world.now)
    worker.reissue = False
    parent.context()
    before = worker.context()
    served = paths.server_pem.read_bytes()
    intermediate.renew_intermediate(world.dir, world.now)
    stale = worker.context()  # config.json changed, server.pem not yet: no re-issue here
    assert paths.server_pem.read_bytes() == served
    assert stale is not before
    parent.context()  # the parent re-issues from the new intermediate
    assert paths.server_pem.read_bytes() != served
    fresh = worker.context()
    assert fresh is not stale
    assert worker.context() is fresh  # nothing changed since: the same context
    inter = x509.load_pem_x509_certificates(paths.server_pem.read_bytes())[1]
    assert key_id(inter) == key_id(files.load_cert(paths.intermediate_pem))


def _gauge(text: str, name: str, cert: str) -> float:
    m = re.search(rf'^{name}{{cert="{cert}",serial="[0-9a-f]+"}} (\S+)$', text, re.M)
    assert m, text
    return float(m.group(1))


def test_metrics_warn_ahead_of_intermediate_expiry(world: World) -> None:
    inter = world.live.current().intermediate
    text = metrics.render(world.live, world.now, 0).decode()
    left = (inter.not_valid_after_utc - world.now).total_seconds()
    assert _gauge(text, "meshcar_ca_cert_expiry_seconds", "intermediate") == round(left)
    assert _gauge(text, "meshcar_ca_cert_expiring", "intermediate") == 0
    assert _gauge(text, "meshcar_ca_cert_expiring", "root") == 0
    assert "meshcar_ca_bundle_version 1" in text
    soon = inter.not_valid_after_utc - timedelta(days=10)
    text = metrics.render(world.live, soon, 0).decode()
    assert _gauge(text, "meshcar_ca_cert_expiring", "intermediate") == 1
    assert _gauge(text, "meshcar_ca_cert_expiry_seconds", "intermediate") == 10 * 86400
    # after a renewal the issuing one is fresh again; the old one is listed as accepted
    intermediate.renew_intermediate(world.dir, soon)
    text = metrics.render(world.live, soon, 0).decode()
    assert _gauge(text, "meshcar_ca_cert_expiring", "intermediate") == 0
    assert _gauge(text, "meshcar_ca_cert_expiring", "accepted_intermediate") == 1
