"""Trust-root rotation of the built-in CA: the stage machine, its checks, live reloading."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from meshcar_ca import files, pki, rotation
from meshcar_ca.auth import Authenticator
from meshcar_ca.errors import ConfigError
from meshcar_ca.issuer import BuiltinIssuer, LiveIssuer, key_id
from meshcar_ca.sign import SignRequest, SignService
from meshcar_ca.store import Store

TD = "rot.test"
T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


class World:
    """A CA directory and a sign service whose clock the test moves."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.now = T0
        files.create_ca(d, TD, 3600, T0)
        self.live = LiveIssuer(
            lambda: BuiltinIssuer.load(d, clock=lambda: self.now), d / "config.json"
        )
        self.store = Store(d / "ca.db")
        self.service = SignService(
            self.live, Authenticator(self.store, self.live), self.store, clock=lambda: self.now
        )

    def bootstrap(self, name: str, bundle_version: int = 0) -> tuple[x509.Certificate, bytes]:
        from meshcar_ca.auth import mint_token

        token = mint_token(
            self.store, TD, f"spiffe://{TD}/svc/{name}", 3600, 1, int(self.now.timestamp())
        )
        return self._sign(
            SignRequest(self._csr(), token=token, ttl_seconds=600, bundle_version=bundle_version),
            None,
        )

    def renew(self, cert: x509.Certificate, bundle_version: int) -> tuple[x509.Certificate, bytes]:
        from cryptography.hazmat.primitives import serialization

        der = cert.public_bytes(serialization.Encoding.DER)
        return self._sign(
            SignRequest(self._csr(), ttl_seconds=600, bundle_version=bundle_version), der
        )

    def _csr(self) -> x509.CertificateSigningRequest:
        from cryptography.hazmat.primitives import hashes

        return (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .sign(pki.new_key(), hashes.SHA256())
        )

    def _sign(self, req: SignRequest, der: bytes | None) -> tuple[x509.Certificate, bytes]:
        res = self.service.sign(req, der)
        chain = x509.load_pem_x509_certificates(res.response["chain"].encode())
        return chain[0], res.response["bundle"].encode()

    def status(self) -> dict:
        return rotation.status(self.dir, self.now)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "ca")


def test_idle_status(world: World) -> None:
    st = world.status()
    assert st["stage"] == 0 and st["state"] == "idle" and st["bundle_version"] == 1
    assert len(st["roots"]) == 1 and st["next"]["ready"]


def test_full_rotation_in_order(world: World) -> None:
    web, _ = world.bootstrap("web")
    api, _ = world.bootstrap("api")
    old_inter = world.live.current().intermediate

    # stage 1: the bundle gets the new root, issuing stays on the old intermediate
    out = rotation.advance(world.dir, world.now)
    assert out["stage"] == 1 and out["bundle_version"] == 2
    assert world.live.bundle().version == 2 and world.live.bundle().pem.count("BEGIN") == 2
    web, bundle = world.renew(web, bundle_version=1)  # reports the old version, learns the new one
    assert bundle.count(b"BEGIN") == 2
    assert web.issuer == old_inter.subject and key_id(world.live.current().intermediate) == key_id(
        old_inter
    )
    st = world.status()
    blocking = {b["spiffe_id"] for b in st["next"]["blocking"]}
    assert not st["next"]["ready"] and blocking == {
        f"spiffe://{TD}/svc/web",
        f"spiffe://{TD}/svc/api",
    }
    with pytest.raises(ConfigError, match="have not reported bundle version 2"):
        rotation.advance(world.dir, world.now)
    # the next renewals report version 2; the certificates they replace no longer count
    world.now += timedelta(seconds=60)
    web, _ = world.renew(web, bundle_version=2)
    api, _ = world.renew(api, bundle_version=2)
    st = world.status()
    assert st["next"]["ready"], st

    # stage 2: the new intermediate issues; renewals from both intermediates are accepted
    out = rotation.advance(world.dir, world.now)
    assert out == {
        "event": "ca.rotate_root",
        "stage": 2,
        "state": "issuing-from-new-root",
        "forced": False,
        "not_reported": 0,
    }
    new_inter = world.live.current().intermediate
    assert key_id(new_inter) != key_id(old_inter)
    assert new_inter.subject != old_inter.subject  # distinct names: peers hold both roots at once
    web, _ = world.renew(web, bundle_version=2)  # presented an old-root certificate
    assert web.issuer == new_inter.subject
    web.verify_directly_issued_by(new_inter)
    st = world.status()
    assert not st["next"][
        "ready"
    ]  # api (and the replaced web certificates) still chain to the old root
    with pytest.raises(ConfigError, match="still valid|valid until"):
        rotation.advance(world.dir, world.now)
    api, _ = world.renew(api, bundle_version=2)
    world.now += timedelta(seconds=550)
    web, _ = world.renew(web, bundle_version=2)
    api, _ = world.renew(api, bundle_version=2)
    assert not world.status()["next"]["ready"]  # replaced, but still valid: peers may see them
    world.now += timedelta(seconds=60)  # every old-intermediate certificate has expired
    assert world.status()["next"]["ready"]

    # stage 3: the old root leaves the bundle; the new pair takes the standard names
    out = rotation.advance(world.dir, world.now)
    assert out["stage"] == 3 and out["state"] == "idle" and out["bundle_version"] == 3
    b = world.live.bundle()
    roots = x509.load_pem_x509_certificates(b.pem.encode())
    assert b.version == 3 and len(roots) == 1 and roots[0].subject == new_inter.issuer
    assert not any((world.dir / n).exists() for n in files.NEXT_FILES)
    assert key_id(files.load_cert(world.dir / "intermediate.pem")) == key_id(new_inter)
    assert json.loads((world.dir / "config.json").read_text()).get("rotation") is None
    web, _ = world.renew(web, bundle_version=3)
    assert web.issuer == new_inter.subject
    assert world.status()["stage"] == 0


def test_force_switches_without_reports_but_retire_is_never_forced(world: World) -> None:
    world.bootstrap("web")
    rotation.advance(world.dir, world.now)
    out = rotation.advance(world.dir, world.now, force=True)
    assert out["stage"] == 2 and out["forced"] is True and out["not_reported"] == 1
    assert world.status()["rotation"]["forced"] is True
    with pytest.raises(ConfigError, match="valid until"):
        rotation.advance(world.dir, world.now, force=True)


def test_a_bootstrap_during_stage_one_must_report_too(world: World) -> None:
    rotation.advance(world.dir, world.now)
    cert, bundle = world.bootstrap("new", bundle_version=0)  # gets both roots, reported nothing
    assert bundle.count(b"BEGIN") == 2
    assert [b["spiffe_id"] for b in world.status()["next"]["blocking"]] == [
        f"spiffe://{TD}/svc/new"
    ]
    world.renew(cert, bundle_version=2)
    assert world.status()["next"]["ready"]


def test_a_renewal_signed_by_a_retired_intermediate_is_refused(world: World) -> None:
    from meshcar_ca.errors import Unauthenticated

    web, _ = world.bootstrap("web")
    rotation.advance(world.dir, world.now)
    rotation.advance(world.dir, world.now, force=True)
    world.now += timedelta(seconds=601)
    rotation.advance(world.dir, world.now)
    world.now -= timedelta(seconds=601)  # pretend the old certificate were still valid
    with pytest.raises(Unauthenticated, match="not issued by this CA"):
        world.renew(web, bundle_version=3)


def test_live_issuer_keeps_the_old_state_when_a_change_is_half_written(world: World) -> None:
    before = world.live.current()
    rotation.advance(world.dir, world.now)
    (world.dir / "next-intermediate.pem").unlink()  # as if caught mid-write
    config = json.loads((world.dir / "config.json").read_text())
    files.write_file(world.dir / "config.json", json.dumps(config), 0o644)
    assert world.live.current() is before
    assert world.live.bundle().version == 1


def test_an_older_database_gets_the_new_columns(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE certificates (serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, not_before TEXT"
            " NOT NULL, not_after TEXT NOT NULL, issued_at INTEGER NOT NULL, auth TEXT NOT NULL,"
            " client_bundle_version INTEGER)"
        )
        conn.execute(
            "INSERT INTO certificates VALUES ('ab', 'spiffe://x/y', 'a', '2999-01-01T00:00:00Z', 1, 'token', 1)"
        )
    conn.close()
    store = Store(db)
    (rec,) = store.active("2026-01-01T00:00:00Z")
    assert rec.serial == "ab" and rec.issuer is None and rec.renewed_from is None


def test_init_force_discards_a_rotation_in_progress(world: World) -> None:
    rotation.advance(world.dir, world.now)
    files.create_ca(world.dir, TD, 3600, world.now, force=True)
    assert not any((world.dir / n).exists() for n in files.NEXT_FILES)
    assert rotation.status(world.dir, world.now)["stage"] == 0


def test_status_warns_ahead_of_intermediate_expiry(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    files.create_ca(d, TD, 3600, T0)
    inter = files.load_cert(files.open_ca(d)[0].intermediate_pem)
    end = inter.not_valid_after_utc
    assert rotation.status(d, T0)["warnings"] == []
    soon = rotation.status(d, end - timedelta(days=10))["warnings"]
    assert (
        len(soon) == 1
        and "issuing intermediate expires" in soon[0]
        and "renew-intermediate" in soon[0]
    )
    gone = rotation.status(d, end + timedelta(seconds=1))["warnings"]
    assert any("issuing intermediate expired" in w for w in gone)
