"""Trust-root rotation of the built-in CA: a staged procedure with a visible state.

Theory of operation (docs/ROTATION.md). Each `meshcar ca rotate-root` advances one stage,
after checking that it is safe to:

- idle -> 1 "new-root-trusted": a new root and intermediate are created (`next-*` files);
  the new root joins bundle.pem and the bundle version goes up by one. The old
  intermediate keeps issuing, so no certificate chains to the new root yet; workloads learn
  the new bundle from their periodic refresh and from every renewal answer.
- 1 -> 2 "issuing-from-new-root": the new intermediate starts issuing. Allowed only once
  every active certificate (unexpired, and not replaced by a renewal that presented it) was
  issued to a workload that *reported* holding the new bundle version in its request, so
  every peer trusts the new root before the first certificate chained to it exists. An
  operator may `--force` it (those who have not reported may then reject new certificates
  until they refresh their bundle).
- 2 -> idle "retire": the old root leaves the bundle (version + 1) and the new root and
  intermediate take the `root.*` / `intermediate.*` names. Allowed only once the last
  certificate signed by the old intermediate has expired (no force: that would break
  traffic). The CA API's own certificate, issued by `intermediate.pem`, follows then.

Every state change writes the key and certificate files first and config.json last (the
commit point), each atomically; a running `ca serve` notices the new config.json on its
next request (`issuer.LiveIssuer`).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from . import files, pki
from .errors import ConfigError
from .issuer import key_id
from .sign import rfc3339
from .store import CertificateRecord, Store

STAGE_NAMES = {0: "idle", 1: "new-root-trusted", 2: "issuing-from-new-root"}


def _cert_info(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "key_id": key_id(cert),
        "not_after": rfc3339(cert.not_valid_after_utc),
    }


def _record_info(rec: CertificateRecord) -> dict[str, Any]:
    return {
        "spiffe_id": rec.spiffe_id,
        "serial": rec.serial,
        "not_after": rec.not_after,
        "reported_bundle_version": rec.client_bundle_version,
    }


def _not_reported(store: Store, target: int, now: datetime) -> list[CertificateRecord]:
    return [
        r
        for r in store.active(rfc3339(now))
        if r.client_bundle_version is None or r.client_bundle_version < target
    ]


def _old_certificates(store: Store, new_issuer_id: str, now: datetime) -> list[CertificateRecord]:
    """Unexpired certificates not signed by the new intermediate (unknown issuer counts as old)."""
    return [r for r in store.unexpired(rfc3339(now)) if r.issuer != new_issuer_id]


INTERMEDIATE_WARN_FRACTION = 0.25  # warn once less than this share of its lifetime is left
INTERMEDIATE_WARN_MIN = timedelta(days=30)


def expiry_warnings(
    cert: x509.Certificate,
    now: datetime,
    what: str,
    action: str = "rotate with `meshcar ca rotate-root`",
) -> list[str]:
    """Warnings for a CA certificate nearing its end (leaves get clamped to it, then fail)."""
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    left = cert.not_valid_after_utc - now
    if left <= timedelta(0):
        return [
            f"{what} expired at {rfc3339(cert.not_valid_after_utc)}: no certificate can be issued"
        ]
    if left < max(life * INTERMEDIATE_WARN_FRACTION, min(INTERMEDIATE_WARN_MIN, life / 2)):
        return [
            f"{what} expires at {rfc3339(cert.not_valid_after_utc)} (in {left.days} d "
            f"{left.seconds // 3600} h); leaves are clamped to it: {action} before then"
        ]
    return []


def status(directory: Path, now: datetime) -> dict[str, Any]:
    """The rotation state of the CA in `directory`, as `meshcar ca status` prints it."""
    paths, config = files.open_ca(directory)
    store = Store(paths.db)
    roots = files.load_certs(paths.bundle_pem)
    rot = config.rotation
    stage = 0 if rot is None else rot.stage
    current = files.load_cert(paths.intermediate_pem)
    out: dict[str, Any] = {
        "stage": stage,
        "state": STAGE_NAMES[stage],
        "bundle_version": config.bundle_version,
        "roots": [_cert_info(c) for c in roots],
        "warnings": expiry_warnings(
            current,
            now,
            "the issuing intermediate",
            "renew it with `meshcar ca renew-intermediate` (same root, same bundle)"
            if rot is None
            else "finish the root rotation",
        )
        + [
            w
            for c in roots
            for w in expiry_warnings(c, now, f"root {format(c.serial_number, 'x')}")
        ],
    }
    if paths.previous_intermediate_pem.exists():
        out["previous_intermediate"] = _cert_info(files.load_cert(paths.previous_intermediate_pem))
    if rot is None:
        out["issuing_intermediate"] = _cert_info(current)
        out["next"] = {
            "action": "rotate-root: create a new root and add it to the bundle (stage 1)",
            "ready": True,
            "blocking": [],
        }
        return out
    following = files.load_cert(paths.next_intermediate_pem)
    out["rotation"] = rot.to_dict()
    out["new_root"] = _cert_info(files.load_cert(paths.next_root_pem))
    if rot.stage == 1:
        out["issuing_intermediate"] = _cert_info(current)
        waiting = _not_reported(store, rot.target_bundle_version, now)
        out["next"] = {
            "action": "rotate-root: issue from the new intermediate (stage 2)",
            "ready": not waiting,
            "blocking": [_record_info(r) for r in waiting],
            "reason": (
                f"{len(waiting)} active certificate(s) issued to workloads that have not reported"
                f" bundle version {rot.target_bundle_version}"
                if waiting
                else "every active workload holds the new root"
            ),
        }
    else:
        out["issuing_intermediate"] = _cert_info(following)
        old = _old_certificates(store, key_id(following), now)
        last = max((r.not_after for r in old), default=None)
        out["next"] = {
            "action": "rotate-root: retire the old root from the bundle (stage 3, completes the rotation)",
            "ready": not old,
            "blocking": [_record_info(r) for r in old],
            "old_root_certificates_valid_until": last,
            "reason": (
                f"{len(old)} certificate(s) chained to the old root still valid until {last}"
                if old
                else "every certificate chained to the old root has expired"
            ),
        }
    return out


def advance(directory: Path, now: datetime, force: bool = False) -> dict[str, Any]:
    """Advance the rotation by one stage (see the module docstring); return what was done.

    Raises ConfigError, naming what blocks, if the next stage is not safe yet."""
    paths, config = files.open_ca(directory)
    rot = config.rotation
    if rot is None:
        return _start(paths, config, now)
    store = Store(paths.db)
    if rot.stage == 1:
        waiting = _not_reported(store, rot.target_bundle_version, now)
        if waiting and not force:
            ids = ", ".join(sorted({r.spiffe_id for r in waiting}))
            raise ConfigError(
                f"not switching issuing yet: {len(waiting)} active certificate(s) belong to workloads that"
                f" have not reported bundle version {rot.target_bundle_version} ({ids}); wait for their"
                " renewals, or use --force"
            )
        new = replace(rot, stage=2, switched_at=int(now.timestamp()), forced=bool(waiting))
        files.write_file(paths.config, replace(config, rotation=new).to_json(), 0o644)
        return {
            "event": "ca.rotate_root",
            "stage": 2,
            "state": STAGE_NAMES[2],
            "forced": bool(waiting),
            "not_reported": len(waiting),
        }
    following = files.load_cert(paths.next_intermediate_pem)
    old = _old_certificates(store, key_id(following), now)
    if old:
        last = max(r.not_after for r in old)
        raise ConfigError(
            f"not retiring the old root yet: {len(old)} certificate(s) chained to it are valid until"
            f" {last}; run rotate-root again after that"
        )
    return _finish(paths, config, now)


def _start(paths: files.CAPaths, config: files.CAConfig, now: datetime) -> dict[str, Any]:
    version = config.bundle_version + 1
    label = f" v{version}"  # distinct names: peers hold both roots at once
    root_key = pki.new_key()
    root = pki.build_root(root_key, config.trust_domain, now, label=label)
    inter_key = pki.new_key()
    inter = pki.build_intermediate(
        inter_key.public_key(), config.trust_domain, root, root_key, now, label=label
    )
    old_roots = files.load_certs(paths.bundle_pem)
    files.write_file(paths.next_root_key, pki.key_pem(root_key), 0o600)
    files.write_file(paths.next_root_pem, pki.cert_pem(root), 0o644)
    files.write_file(paths.next_intermediate_key, pki.key_pem(inter_key), 0o600)
    files.write_file(paths.next_intermediate_pem, pki.cert_pem(inter), 0o644)
    files.write_file(paths.bundle_pem, pki.cert_pem(*old_roots, root), 0o644)
    rot = files.Rotation(stage=1, started_at=int(now.timestamp()), target_bundle_version=version)
    files.write_file(
        paths.config, replace(config, bundle_version=version, rotation=rot).to_json(), 0o644
    )
    return {
        "event": "ca.rotate_root",
        "stage": 1,
        "state": STAGE_NAMES[1],
        "bundle_version": version,
        "new_root": _cert_info(root),
    }


def _finish(paths: files.CAPaths, config: files.CAConfig, now: datetime) -> dict[str, Any]:
    root_pem = paths.next_root_pem.read_bytes()
    root = x509.load_pem_x509_certificate(root_pem)
    files.write_file(paths.root_key, paths.next_root_key.read_bytes(), 0o600)
    files.write_file(paths.root_pem, root_pem, 0o644)
    files.write_file(paths.intermediate_key, paths.next_intermediate_key.read_bytes(), 0o600)
    files.write_file(paths.intermediate_pem, paths.next_intermediate_pem.read_bytes(), 0o644)
    files.write_file(paths.bundle_pem, pki.cert_pem(root), 0o644)
    version = config.bundle_version + 1
    files.write_file(
        paths.config, replace(config, bundle_version=version, rotation=None).to_json(), 0o644
    )
    for name in (
        *files.NEXT_FILES,
        paths.previous_intermediate_pem.name,
    ):  # chained to the old root
        (paths.dir / name).unlink(missing_ok=True)
    return {
        "event": "ca.rotate_root",
        "stage": 3,
        "state": STAGE_NAMES[0],
        "bundle_version": version,
        "root": _cert_info(root),
    }
