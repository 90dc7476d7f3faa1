"""The files a config names, and which of them cannot be read: `meshcar check` lists each,
and the sidecar and the edge refuse to start naming every one that is missing at once (not
one per restart)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from meshcar.common.config import IdentityConfig


def identity_files(ident: IdentityConfig | None) -> list[tuple[str, Path]]:
    """(config key, path) of every file the `identity:` section names."""
    if ident is None:
        return []
    out = [
        ("identity.ca_bundle", ident.ca_bundle),
        ("identity.token_file", ident.token_file),
        ("identity.k8s_token_file", ident.k8s_token_file),
    ]
    v = ident.vault
    if v is not None:
        out += [
            ("identity.vault.token_file", v.token_file),
            ("identity.vault.approle_role_id_file", v.approle_role_id_file),
            ("identity.vault.approle_secret_id_file", v.approle_secret_id_file),
            ("identity.vault.ca_cert", v.ca_cert),
        ]
    return [(k, p) for k, p in out if p is not None]


def unreadable(path: Path) -> str | None:
    """Why the file at `path` cannot be read (None: it can)."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except FileNotFoundError:
        return "does not exist"
    except IsADirectoryError:
        return "is a directory"
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    return None


def unreadable_files(files: Iterable[tuple[str, Path]]) -> list[str]:
    """`KEY: PATH why` of every file of `files` that cannot be read."""
    out = []
    for k, path in files:
        why = unreadable(path)
        if why is not None:
            out.append(f"{k}: {path} {why}")
    return out


BOOTSTRAP_KEYS = ("identity.token_file", "identity.k8s_token_file")


def startup_problems(files: Iterable[tuple[str, Path]], ident: IdentityConfig | None) -> list[str]:
    """Every file of `files` a process about to start cannot read. A bootstrap token is
    needed only while `identity.state_dir` holds no certificate (renewals use mTLS, so a
    one-use join token may be gone by the next start)."""
    held = ident is not None and (ident.state_dir / "chain.pem").exists()
    return unreadable_files((k, p) for k, p in files if not (held and k in BOOTSTRAP_KEYS))
