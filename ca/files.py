"""The CA directory D: its file names and modes, config.json, and creating a new CA in it.

Layout (see docs/CA.md): root.pem/root.key, intermediate.pem/intermediate.key, bundle.pem,
server.pem (API leaf + intermediate)/server.key, ca.db, config.json. D is 0700, keys and
ca.db 0600, certificates 0644. Every file is written to a temporary name and renamed, so a
reader never sees half a file. `create_ca` builds everything in memory before writing
anything, and refuses to touch an existing CA unless `force` is set.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from . import pki
from .errors import ConfigError
from .spiffe import check_trust_domain
from .store import Store

DEFAULT_MAX_TTL_SECONDS = 24 * 3600
CA_FILES = (
    "root.pem",
    "root.key",
    "intermediate.pem",
    "intermediate.key",
    "bundle.pem",
    "server.pem",
    "server.key",
    "ca.db",
    "config.json",
)
# present only while a root rotation is under way (docs/ROTATION.md)
NEXT_FILES = ("next-root.pem", "next-root.key", "next-intermediate.pem", "next-intermediate.key")


@dataclass(frozen=True)
class CAPaths:
    """Where each file of a CA directory lives."""

    dir: Path

    def __truediv__(self, name: str) -> Path:
        return self.dir / name

    @property
    def root_pem(self) -> Path:
        return self.dir / "root.pem"

    @property
    def root_key(self) -> Path:
        return self.dir / "root.key"

    @property
    def intermediate_pem(self) -> Path:
        return self.dir / "intermediate.pem"

    @property
    def intermediate_key(self) -> Path:
        return self.dir / "intermediate.key"

    @property
    def bundle_pem(self) -> Path:
        return self.dir / "bundle.pem"

    @property
    def server_pem(self) -> Path:
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    @property
    def next_root_pem(self) -> Path:
        return self.dir / "next-root.pem"

    @property
    def next_root_key(self) -> Path:
        return self.dir / "next-root.key"

    @property
    def next_intermediate_pem(self) -> Path:
        return self.dir / "next-intermediate.pem"

    @property
    def next_intermediate_key(self) -> Path:
        return self.dir / "next-intermediate.key"

    @property
    def previous_intermediate_pem(self) -> Path:
        """The intermediate replaced by `renew-intermediate`: renewals from its leaves are
        still accepted until it expires (no key is kept)."""
        return self.dir / "previous-intermediate.pem"

    @property
    def db(self) -> Path:
        return self.dir / "ca.db"

    @property
    def config(self) -> Path:
        return self.dir / "config.json"


@dataclass(frozen=True)
class Rotation:
    """A root rotation under way (docs/ROTATION.md). Stage 1: the new root is in the bundle,
    the old intermediate still issues. Stage 2: the new intermediate issues. Stage 3 ends the
    rotation (the old root leaves the bundle), so it is never stored."""

    stage: int
    started_at: int  # unix seconds
    target_bundle_version: int  # the first bundle version that holds the new root
    switched_at: int | None = None  # when stage 2 began
    forced: bool = False  # stage 2 was forced before every workload had reported

    def to_dict(self) -> dict[str, object]:
        return {
            "stage": self.stage,
            "started_at": self.started_at,
            "target_bundle_version": self.target_bundle_version,
            "switched_at": self.switched_at,
            "forced": self.forced,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> Rotation:
        stage = int(raw["stage"])  # type: ignore[call-overload]
        if stage not in (1, 2):
            raise ValueError(f"rotation stage {stage} is not 1 or 2")
        switched = raw.get("switched_at")
        return cls(
            stage=stage,
            started_at=int(raw["started_at"]),  # type: ignore[call-overload]
            target_bundle_version=int(raw["target_bundle_version"]),  # type: ignore[call-overload]
            switched_at=None if switched is None else int(switched),  # type: ignore[call-overload]
            forced=bool(raw.get("forced", False)),
        )


@dataclass(frozen=True)
class CAConfig:
    """config.json: the trust domain, the maximum SVID lifetime, the trust bundle version and,
    while one is under way, the state of a root rotation. config.json is written last in
    every state change: it is the commit point."""

    trust_domain: str
    max_ttl_seconds: int = DEFAULT_MAX_TTL_SECONDS
    bundle_version: int = 1
    rotation: Rotation | None = None

    def to_json(self) -> str:
        data: dict[str, object] = {
            "trust_domain": self.trust_domain,
            "max_ttl_seconds": self.max_ttl_seconds,
            "bundle_version": self.bundle_version,
        }
        if self.rotation is not None:
            data["rotation"] = self.rotation.to_dict()
        return json.dumps(data, indent=2) + "\n"


def write_file(path: Path, data: bytes | str, mode: int) -> None:
    """Write `data` to `path` atomically with permission bits `mode` from the start."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def existing_ca_files(paths: CAPaths) -> list[str]:
    return [name for name in CA_FILES if (paths.dir / name).exists()]


def create_ca(
    directory: Path, trust_domain: str, max_ttl_seconds: int, now: datetime, force: bool = False
) -> CAPaths:
    """Create a new CA in `directory` (see the module docstring). Raises ConfigError."""
    check_trust_domain(trust_domain)
    paths = CAPaths(Path(directory))
    if paths.dir.exists() and not paths.dir.is_dir():
        raise ConfigError(f"{paths.dir} exists and is not a directory")
    found = existing_ca_files(paths) if paths.dir.is_dir() else []
    if found and not force:
        raise ConfigError(
            f"{paths.dir} already holds a CA ({', '.join(found)}); use --force to replace it"
        )
    root_key = pki.new_key()
    root = pki.build_root(root_key, trust_domain, now)
    inter_key = pki.new_key()
    inter = pki.build_intermediate(inter_key.public_key(), trust_domain, root, root_key, now)
    config = CAConfig(trust_domain=trust_domain, max_ttl_seconds=max_ttl_seconds)

    paths.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(paths.dir, 0o700)
    write_file(paths.root_key, pki.key_pem(root_key), 0o600)
    write_file(paths.root_pem, pki.cert_pem(root), 0o644)
    write_file(paths.intermediate_key, pki.key_pem(inter_key), 0o600)
    write_file(paths.intermediate_pem, pki.cert_pem(inter), 0o644)
    write_file(paths.bundle_pem, pki.cert_pem(root), 0o644)
    write_file(paths.config, config.to_json(), 0o644)
    for name in (*NEXT_FILES, "previous-intermediate.pem"):  # nothing of the replaced CA survives
        (paths.dir / name).unlink(missing_ok=True)
    paths.db.unlink(missing_ok=True)
    Store.create(paths.db)
    write_server_cert(paths, inter, inter_key, [], now)
    return paths


def write_server_cert(
    paths: CAPaths,
    inter: x509.Certificate,
    inter_key: ec.EllipticCurvePrivateKey,
    extra_names: list[str],
    now: datetime,
) -> None:
    """Issue the API's TLS certificate (localhost, 127.0.0.1 + `extra_names`) into server.pem
    (leaf + intermediate) and server.key."""
    key = pki.new_key()
    cert = pki.build_server_cert(
        key.public_key(), ["localhost", "127.0.0.1", *extra_names], inter, inter_key, now
    )
    write_file(paths.server_key, pki.key_pem(key), 0o600)
    write_file(paths.server_pem, pki.cert_pem(cert, inter), 0o644)


def open_ca(directory: Path) -> tuple[CAPaths, CAConfig]:
    """Check that `directory` holds a CA and read its config.json. Raises ConfigError."""
    paths = CAPaths(Path(directory))
    if not paths.config.is_file():
        raise ConfigError(f"{paths.dir} is not a CA directory (run `meshcar ca init` first)")
    try:
        raw = json.loads(paths.config.read_text())
        config = CAConfig(
            trust_domain=check_trust_domain(str(raw["trust_domain"])),
            max_ttl_seconds=int(raw.get("max_ttl_seconds", DEFAULT_MAX_TTL_SECONDS)),
            bundle_version=int(raw.get("bundle_version", 1)),
            rotation=Rotation.from_dict(raw["rotation"]) if raw.get("rotation") else None,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{paths.config}: invalid ({exc})") from exc
    missing = [
        n
        for n in CA_FILES
        if n not in ("server.pem", "server.key") and not (paths.dir / n).exists()
    ]
    if missing:
        raise ConfigError(f"{paths.dir}: missing {', '.join(missing)}")
    if config.rotation is not None:
        absent = [n for n in NEXT_FILES if not (paths.dir / n).exists()]
        if absent:
            raise ConfigError(
                f"{paths.dir}: a root rotation is under way but {', '.join(absent)} is missing"
            )
    return paths, config


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path}: not an ECDSA key")
    return key
