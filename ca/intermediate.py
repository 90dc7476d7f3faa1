"""Renewing the issuing intermediate without a root rotation (`meshcar ca renew-intermediate`).

Theory of operation (docs/ROTATION.md). The intermediate has a fixed life (one year, never
past the root); leaves are clamped to it, so it must be replaced before it ends. A new key
and a new intermediate are issued by the *same* root, so the trust bundle does not change
and no workload needs anything new: leaves issued before and after both verify against the
unchanged roots. The replaced intermediate is kept as `previous-intermediate.pem` (its
certificate only; the key is gone): the API still accepts renewals presenting its leaves
until it expires. The API certificate is re-issued from the new intermediate by a running
`ca serve` (`tls.ServerTLS`) when config.json, the commit point, is replaced: the new key and
certificate are written first, config.json (same content, a new file) last, each
atomically; a running server notices it on its next request, no restart.

Refused during a root rotation (that already makes a new intermediate), and while the
previous renewal's leaves are still valid (only one older intermediate is accepted).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from . import files, pki
from .errors import ConfigError
from .issuer import key_id
from .rotation import _cert_info
from .sign import rfc3339
from .store import Store


def renew_intermediate(directory: Path, now: datetime) -> dict[str, Any]:
    """Issue a new intermediate from the current root and make it the issuing one."""
    paths, config = files.open_ca(directory)
    if config.rotation is not None:
        raise ConfigError(
            "a root rotation is under way (it brings its own new intermediate): "
            "finish it with `meshcar ca rotate-root` first"
        )
    old = files.load_cert(paths.intermediate_pem)
    if paths.previous_intermediate_pem.exists():
        prev = files.load_cert(paths.previous_intermediate_pem)
        still = [r for r in Store(paths.db).unexpired(rfc3339(now)) if r.issuer == key_id(prev)]
        if still:
            last = max(r.not_after for r in still)
            raise ConfigError(
                f"{len(still)} certificate(s) from the intermediate replaced last time are "
                f"valid until {last}; renew the intermediate again after that"
            )
    root = files.load_cert(paths.root_pem)
    root_key = files.load_key(paths.root_key)
    if root.not_valid_after_utc <= now:
        raise ConfigError(
            f"the root expired at {rfc3339(root.not_valid_after_utc)}: rotate the root instead"
        )
    key = pki.new_key()
    new = pki.build_intermediate(key.public_key(), config.trust_domain, root, root_key, now)
    files.write_file(paths.previous_intermediate_pem, pki.cert_pem(old), 0o644)
    files.write_file(paths.intermediate_key, pki.key_pem(key), 0o600)
    files.write_file(paths.intermediate_pem, pki.cert_pem(new), 0o644)
    files.write_file(paths.config, config.to_json(), 0o644)  # the commit point (a new file)
    out: dict[str, Any] = {
        "event": "ca.renew_intermediate",
        "intermediate": _cert_info(new),
        "previous": _cert_info(old),
        "bundle_version": config.bundle_version,
    }
    if new.not_valid_after_utc == root.not_valid_after_utc:
        out["warning"] = (
            f"the new intermediate ends with the root at {rfc3339(root.not_valid_after_utc)}: "
            "rotate the root (`meshcar ca rotate-root`) before then"
        )
    return out
