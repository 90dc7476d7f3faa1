"""Issuing directly from Vault / OpenBao's PKI engine (no meshcar CA in between).

The sidecar generates its key, sends only the CSR to `POST /v1/<mount>/sign/<role>` with
`uri_sans` set to its SPIFFE ID, and gets the leaf plus the chain; the trust bundle is the
self-signed root(s) at the end of the mount's CA chain. Vault authenticates the workload
(AppRole, or a token for development) and its role decides which SPIFFE IDs it may get:
a workload asking for another identity is refused by Vault. hvac is blocking, so every
call runs in a worker thread. The same `sign`/`bundle` interface as `CAClient`, so the
rotation loop is the same whatever the backend.

High availability: `addr` may name several nodes of one cluster (an OpenBao/Vault raft
cluster). Each call goes to the node that answered last, and moves on to the next one when
a node cannot answer: connection refused or timed out (a short connect timeout, so a dead
host costs seconds, not the read timeout), a 5xx (sealed, not initialised, no active node),
429/412, or a redirect. A standby normally forwards requests to the active node itself; it
answers 307 to the active node's address only while it cannot forward (during an election,
the 307 names the node that just died). Redirects are never followed blindly (the token
would go wherever the Location says): the named node is tried next only if it is one of
the configured addresses. The login token is valid on every node of the cluster, so a
failover keeps it. A 400 (the role refuses this identity) or a second 403 ends the call at
once: every node would give the same answer.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import hvac  # type: ignore[import-untyped]
import hvac.exceptions  # type: ignore[import-untyped]
import requests
import trio
from cryptography import x509

from meshcar.identity.caclient import CAError
from meshcar.identity.keys import csr_pem, key_pem, new_key
from meshcar.tls.store import Credential

log = logging.getLogger("meshcar.identity")

# answers after which another node of the cluster may do better
_NODE_FAILURES: tuple[type[Exception], ...] = (
    hvac.exceptions.InternalServerError,
    hvac.exceptions.VaultNotInitialized,
    hvac.exceptions.VaultDown,
    hvac.exceptions.BadGateway,
    hvac.exceptions.UnexpectedError,
    hvac.exceptions.RateLimitExceeded,
    hvac.exceptions.PreconditionFailed,
    requests.RequestException,
    OSError,
)


class _TryAnotherNode(Exception):
    """This node cannot answer now; `location` is where it redirected to, if anywhere."""

    def __init__(self, reason: str, location: str | None = None) -> None:
        super().__init__(reason)
        self.location = location


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _refuse_redirects(resp: requests.Response, *_: object, **__: object) -> None:
    """requests response hook: a redirect (a standby's 307) is reported, not followed."""
    if resp.is_redirect:
        location = resp.headers.get("Location", "")
        resp.close()
        raise _TryAnotherNode(
            f"redirected ({resp.status_code}) to {_origin(location) or '?'}", location
        )


def _pem_blocks(text: str) -> list[str]:
    end = "-----END CERTIFICATE-----"
    return [b.strip() + "\n" + end + "\n" for b in text.split(end) if "BEGIN CERTIFICATE" in b]


def _self_signed(pem: str) -> bool:
    cert = x509.load_pem_x509_certificate(pem.encode())
    return cert.issuer == cert.subject


@dataclass
class VaultClient:
    addr: str | Sequence[str]  # one node, or every node of one HA cluster
    role: str
    mount: str = "pki_int"
    token_file: Path | None = None
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    approle_mount: str = "approle"
    ca_cert: Path | None = None
    timeout: float = 10.0  # for an answer, once connected
    connect_timeout: float = 2.0  # per node: a dead host must not hold a renewal for long
    _client: Any = field(default=None, repr=False)
    _token: str | None = field(default=None, repr=False)
    _current: int = field(default=0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        addrs = (self.addr,) if isinstance(self.addr, str) else tuple(self.addr)
        if not addrs:
            raise ValueError("VaultClient needs at least one address")
        self.addrs = tuple(a.rstrip("/") for a in addrs)

    def _client_at(self, addr: str) -> Any:
        if self._client is None:
            verify: bool | str = str(self.ca_cert) if self.ca_cert else True
            session = requests.Session()
            session.verify = verify  # hvac takes verify from a session it is given
            session.hooks["response"].append(_refuse_redirects)
            self._client = hvac.Client(
                url=addr,
                timeout=(self.connect_timeout, self.timeout),
                verify=verify,
                session=session,
                allow_redirects=False,
            )
        self._client.url = addr
        self._client.token = self._token
        return self._client

    def _login(self, client: Any) -> None:
        if self.token_file is not None:
            self._token = _read_secret(self.token_file, "token_file")
        else:
            assert self.role_id_file and self.secret_id_file
            client.auth.approle.login(
                role_id=_read_secret(self.role_id_file, "approle_role_id_file"),
                secret_id=_read_secret(self.secret_id_file, "approle_secret_id_file"),
                mount_point=self.approle_mount,
            )
            self._token = client.token
        client.token = self._token

    def _call_node(self, addr: str, fn: Any) -> Any:
        """`fn` on one node (logging in first if needed). Raises CAError, or _TryAnotherNode."""
        client = self._client_at(addr)
        for attempt in (0, 1):
            try:
                if self._token is None:
                    self._login(client)
                return fn(client)
            except _TryAnotherNode:
                raise
            except hvac.exceptions.Forbidden as exc:
                self._token = None  # an expired token: log in again once
                if attempt:
                    raise CAError(f"Vault refused: {exc}", retryable=False) from None
            except hvac.exceptions.InvalidRequest as exc:
                raise CAError(f"Vault refused the request: {exc}", retryable=False) from None
            except _NODE_FAILURES as exc:
                raise _TryAnotherNode(f"{type(exc).__name__}: {exc}") from None
            except hvac.exceptions.VaultError as exc:
                raise CAError(f"Vault failing at {addr}: {exc}", retryable=True) from None
        raise AssertionError("unreachable")

    def _call(self, fn: Any) -> Any:
        """`fn(client)` on the node that answered last, else on the others in turn."""
        with self._lock:
            n = len(self.addrs)
            order = [self.addrs[(self._current + i) % n] for i in range(n)]
            failed: list[str] = []
            while order:
                addr = order.pop(0)
                try:
                    result = self._call_node(addr, fn)
                except _TryAnotherNode as exc:
                    failed.append(f"{addr}: {exc}")
                    # a standby's redirect names the active node: next, if it is one of ours
                    target = _origin(exc.location) if exc.location else None
                    named = [a for a in order if _origin(a) == target]
                    if named:
                        order.remove(named[0])
                        order.insert(0, named[0])
                    continue
                index = self.addrs.index(addr)
                if index != self._current or failed:
                    _event(
                        "identity.vault_node",
                        addr=addr,
                        previous=self.addrs[self._current],
                        failed=failed,
                    )
                self._current = index
                return result
            raise CAError("no Vault node could answer: " + "; ".join(failed), retryable=True)

    def _sign_blocking(self, csr: str, spiffe_id: str, ttl_seconds: int | None) -> dict:
        extra: dict[str, Any] = {"uri_sans": spiffe_id, "format": "pem"}
        if ttl_seconds:
            extra["ttl"] = f"{ttl_seconds}s"
        return self._call(
            lambda c: c.secrets.pki.sign_certificate(
                name=self.role, csr=csr, common_name="", extra_params=extra, mount_point=self.mount
            )["data"]
        )

    async def sign(
        self, spiffe_id: str, *, ttl_seconds: int | None = None, **_: object
    ) -> Credential:
        """A new SVID for `spiffe_id` (Vault's own auth; meshcar join tokens do not apply)."""
        key = new_key()
        data = await trio.to_thread.run_sync(
            self._sign_blocking, csr_pem(key, spiffe_id), spiffe_id, ttl_seconds
        )
        chain_certs = [
            b
            for c in data.get("ca_chain") or [data.get("issuing_ca", "")]
            if c
            for b in _pem_blocks(c)
        ]
        roots = [c for c in chain_certs if _self_signed(c)]
        if not roots:
            raise CAError(
                "Vault's CA chain has no root: configure the intermediate with its root "
                "(deploy/vault/setup.sh does)",
                retryable=False,
            )
        intermediates = [c for c in chain_certs if not _self_signed(c)]
        chain = "".join(_pem_blocks(data["certificate"]) + intermediates)
        return Credential(spiffe_id, chain, key_pem(key), "".join(roots), 0)

    async def bundle(self, **_: object) -> tuple[str, int]:
        def fetch(c: Any) -> str:
            return c.secrets.pki.read_ca_certificate_chain(mount_point=self.mount)

        text = await trio.to_thread.run_sync(self._call, fetch)
        roots = [b for b in _pem_blocks(text) if _self_signed(b)]
        if not roots:
            raise CAError("Vault's CA chain has no root", retryable=True)
        return "".join(roots), 0


def _read_secret(path: Path, key: str) -> str:
    """A credential file, read afresh at each login (it may have been rotated)."""
    try:
        return path.read_text().strip()
    except OSError as exc:  # before any request: not a node failure
        raise CAError(
            f"cannot read identity.vault.{key} {path}: {exc.strerror}", retryable=True
        ) from None


def _event(name: str, **fields: object) -> None:
    log.info(json.dumps({"event": name, **fields}, default=str))
