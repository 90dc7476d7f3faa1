"""The live credential store: the current SVID, key and trust bundle, swapped atomically.

Theory of operation: a `Credential` is an immutable value. `CredentialStore.install()`
writes it to the state directory (files 0600 in a 0700 directory, written to a temporary
name and renamed), builds fresh server and client SSLContexts from it and then replaces one
reference. New handshakes pick up the new contexts; connections already established keep
the context they were made with, so a renewal never drops a connection. `ready` is set the
first time a credential is installed: no traffic is served before that.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import trio
from cryptography import x509

from meshcar.tls.contexts import (
    mesh_client_context,
    mesh_server_context,
    mesh_tcp_client_context,
)


@dataclass(frozen=True)
class Credential:
    spiffe_id: str
    chain_pem: str  # leaf first, then intermediates
    key_pem: str = field(repr=False)
    bundle_pem: str
    bundle_version: int = 0

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.chain_pem.encode())

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial_hex(self) -> str:
        return format(self.leaf.serial_number, "x")


@dataclass(frozen=True)
class _Live:
    credential: Credential
    server_ctx: ssl.SSLContext
    client_ctx: ssl.SSLContext
    tcp_ctx: list[ssl.SSLContext] = field(default_factory=list)  # built on first use


def write_private(path: Path, data: str) -> None:
    """Write a file 0600 atomically (temporary name, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def ensure_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


class CredentialStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        ensure_private_dir(state_dir)
        self._live: _Live | None = None
        self.ready = trio.Event()

    @property
    def key_file(self) -> Path:
        return self.state_dir / "key.pem"

    @property
    def chain_file(self) -> Path:
        return self.state_dir / "chain.pem"

    @property
    def bundle_file(self) -> Path:
        return self.state_dir / "bundle.pem"

    @property
    def bundle_version_file(self) -> Path:
        return self.state_dir / "bundle_version"

    def saved_bundle_version(self) -> int:
        """The bundle version written with the saved credential (0 if none or unreadable)."""
        try:
            return int(self.bundle_version_file.read_text().strip())
        except (OSError, ValueError):
            return 0

    def install(self, cred: Credential) -> None:
        write_private(self.key_file, cred.key_pem)
        write_private(self.chain_file, cred.chain_pem)
        write_private(self.bundle_file, cred.bundle_pem)
        write_private(self.bundle_version_file, f"{cred.bundle_version}\n")
        server = mesh_server_context(self.chain_file, self.key_file, cred.bundle_pem)
        client = mesh_client_context(self.chain_file, self.key_file, cred.bundle_pem)
        self._live = _Live(cred, server, client)
        self.ready.set()

    @property
    def credential(self) -> Credential | None:
        return self._live.credential if self._live else None

    def server_context(self) -> ssl.SSLContext:
        assert self._live is not None, "no credential installed yet"
        return self._live.server_ctx

    def client_context(self) -> ssl.SSLContext:
        assert self._live is not None, "no credential installed yet"
        return self._live.client_ctx

    def tcp_client_context(self) -> ssl.SSLContext:
        """The client context of opaque TCP tunnels (ALPN meshcar-tcp/1 only), made from the
        current credential on first use."""
        live = self._live
        assert live is not None, "no credential installed yet"
        if not live.tcp_ctx:
            live.tcp_ctx.append(
                mesh_tcp_client_context(self.chain_file, self.key_file, live.credential.bundle_pem)
            )
        return live.tcp_ctx[0]

    def is_valid_now(self) -> bool:
        cred = self.credential
        return cred is not None and cred.not_after > dt.datetime.now(dt.UTC)
