"""Getting and keeping an SVID: bootstrap with the join token, then renew before expiry.

Theory of operation: `renew_delay()` is a pure function of the current certificate's
validity window (renew at `fraction` of the lifetime, +/- `jitter` of it so that a fleet
does not renew at once). `Rotator.run()` bootstraps (reusing a still-valid credential from
the state dir after a restart, else the bootstrap credential: join token file, projected
service-account token, or the Vault AppRole/token), marks the store ready, then sleeps
until the renewal point or an operator's `renew_on_request()` (POST /renew), renews over
mTLS with the current certificate, and retries with capped exponential backoff and jitter
while the CA is unreachable. The old certificate keeps serving until it actually expires; the store is only
ever replaced by a complete new credential.

The loop only schedules: every call to a CA goes through the `Issuer` it is given
(identity/issuer.py: the CA API with a join token or a Kubernetes service-account token, or
Vault/OpenBao), which says whether it has a bootstrap credential at all.

Recovery: once the current certificate has expired (the CA was down longer than its
lifetime), or the CA refuses the renewal outright (a non-retryable 4xx such as 401), the
loop stops presenting that certificate and goes back to the bootstrap credential. `state`
and `reason` say where the loop is ("valid", "retrying", "expired") for /ready and /certs;
`meshcar_identity_expired` is 1 while no valid certificate is held.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import random
from collections.abc import Callable
from typing import Any, Protocol

import trio
from cryptography import x509

from meshcar.identity.issuer import CAError, Issuer
from meshcar.tls.store import Credential, CredentialStore

log = logging.getLogger("meshcar.identity")


class _Gauge(Protocol):
    def set(self, value: float) -> None: ...


class RotationMetrics(Protocol):
    """What the loop reports to (admin/metrics.py's `Metrics` is one): passed in, so identity/
    does not import the admin layer above it."""

    @property
    def cert_not_after(self) -> _Gauge: ...
    @property
    def bundle_version(self) -> _Gauge: ...
    @property
    def identity_expired(self) -> _Gauge: ...
    @property
    def renewals(self) -> Any: ...  # a Counter by result: renewals.labels(result).inc()


def renew_delay(
    not_before: dt.datetime,
    not_after: dt.datetime,
    now: dt.datetime,
    fraction: float = 2 / 3,
    jitter: float = 0.1,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds from `now` until renewal: at fraction*(1 +/- jitter) of the lifetime."""
    lifetime = (not_after - not_before).total_seconds()
    f = fraction * (1 + jitter * (2 * rand() - 1))
    f = min(max(f, 0.05), 0.95)
    at = not_before + dt.timedelta(seconds=lifetime * f)
    return max(0.0, (at - now).total_seconds())


def retry_delay(
    attempt: int, base: float = 0.5, cap: float = 30.0, rand: Callable[[], float] = random.random
) -> float:
    """Capped exponential backoff with full jitter in [d/2, d]."""
    d = min(cap, base * (2**attempt))
    return d / 2 + rand() * d / 2


def load_saved(store: CredentialStore, spiffe_id: str) -> Credential | None:
    """A credential left in the state dir by an earlier run, if still valid and ours."""
    try:
        chain = store.chain_file.read_text()
        key = store.key_file.read_text()
        bundle = store.bundle_file.read_text()
        leaf = x509.load_pem_x509_certificate(chain.encode())
    except (OSError, ValueError):
        return None
    cred = Credential(spiffe_id, chain, key, bundle, store.saved_bundle_version())
    uris = leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)
    now = dt.datetime.now(dt.UTC)
    if uris != [spiffe_id] or not (leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc):
        return None
    return cred


class Rotator:
    def __init__(
        self,
        store: CredentialStore,
        issuer: Issuer,
        spiffe_id: str,
        *,
        metrics: RotationMetrics,
        ttl_seconds: int | None = None,
        fraction: float = 2 / 3,
        jitter: float = 0.1,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.clock = clock or _utcnow  # wall clock; tests pass one driven by trio's MockClock
        self.store = store
        self.issuer = issuer  # identity/issuer.py: CA API (join or k8s token) or Vault
        self.spiffe_id = spiffe_id
        self.metrics = metrics
        self.ttl_seconds = ttl_seconds
        self.fraction = fraction
        self.jitter = jitter
        self.next_renewal: dt.datetime | None = None
        self.state = "starting"  # starting | valid | retrying | expired
        self.reason = "no certificate yet"
        self._wake = trio.Event()
        self._reschedule = False  # woken only to recompute the schedule (a renewal was done)
        self._renewed = trio.Event()

    async def renew_on_request(self) -> str:
        """Renew now for an operator (POST /renew), then make the loop schedule its next
        renewal from the new certificate instead of the old one. Raises CAError."""
        how = await self.renew_once()
        self._reschedule = True
        self._wake.set()
        return how

    async def wait_renewed(self) -> None:
        await self._renewed.wait()

    def _install(self, cred: Credential, how: str) -> None:
        self.store.install(cred)
        self.metrics.cert_not_after.set(cred.not_after.timestamp())
        self.metrics.bundle_version.set(cred.bundle_version)
        _event(
            "identity.installed",
            how=how,
            spiffe_id=cred.spiffe_id,
            serial=cred.serial_hex,
            not_after=cred.not_after.isoformat(),
        )

    async def bootstrap(self) -> None:
        saved = load_saved(self.store, self.spiffe_id)
        if saved is not None:
            self._install(saved, "reused from state dir")
            return
        attempt = 0
        while True:
            try:
                cred = await self._sign_with_bootstrap_credential()
            except CAError as exc:
                self.metrics.renewals.labels("bootstrap_failure").inc()
                self._set_state("expired", f"bootstrap failed: {exc}")
                _event(
                    "identity.bootstrap_failed",
                    error=str(exc),
                    attempt=attempt,
                    level=logging.WARNING,
                )
                await trio.sleep(retry_delay(attempt, cap=30.0 if exc.retryable else 60.0))
                attempt += 1
                continue
            self.metrics.renewals.labels("bootstrap").inc()
            self._install(cred, "bootstrap")
            return

    @property
    def has_bootstrap_credential(self) -> bool:
        return self.issuer.has_bootstrap_credential

    async def _sign_with_bootstrap_credential(self) -> Credential:
        # A re-bootstrap (after expiry or a refused renewal) verifies the CA API with the held
        # trust bundle too, as renewals do: after a root rotation the API chains to a root
        # that `ca_bundle` may not have.
        held = self.store.credential
        trust = held.bundle_pem if held is not None else None
        return await self.issuer.bootstrap(
            self.spiffe_id, ttl_seconds=self.ttl_seconds, trust_pem=trust
        )

    def _set_state(self, state: str, reason: str) -> None:
        self.state, self.reason = state, reason
        self.metrics.identity_expired.set(1 if state == "expired" else 0)

    async def renew_once(self) -> str:
        """Replace the credential once; returns how. Raises CAError (counted) on failure.

        With a valid certificate this renews over mTLS. With an expired one, or when the CA
        refuses the renewal as non-retryable, it falls back to the bootstrap credential.
        """
        cur = self.store.credential
        assert cur is not None
        try:
            if cur.not_after > self.clock() or not self.has_bootstrap_credential:
                try:
                    cred = await self.issuer.renew(
                        cur,
                        chain_file=self.store.chain_file,
                        key_file=self.store.key_file,
                        ttl_seconds=self.ttl_seconds,
                    )
                    how = "renewed"
                except CAError as exc:
                    if exc.retryable or not self.has_bootstrap_credential:
                        raise
                    _event(
                        "identity.renewal_refused",
                        error=str(exc),
                        level=logging.WARNING,
                        action="falling back to the bootstrap credential",
                    )
                    cred = await self._sign_with_bootstrap_credential()
                    how = "re-bootstrapped after a refused renewal"
            else:
                cred = await self._sign_with_bootstrap_credential()
                how = "re-bootstrapped after expiry"
        except CAError as exc:
            self.metrics.renewals.labels("failure").inc()
            expired = cur.not_after <= self.clock()
            self._set_state("expired" if expired else "retrying", str(exc))
            raise
        self._install(cred, how)
        self.metrics.renewals.labels("success").inc()
        self._set_state("valid", how)
        return how

    async def refresh_bundle(self) -> bool:
        """Fetch the CA's trust bundle; swap it in if it changed. True if it changed."""
        held = self.store.credential
        pem, version = await self.issuer.bundle(held.bundle_pem if held else None)
        cur = self.store.credential
        if cur is None or (pem == cur.bundle_pem and version == cur.bundle_version):
            return False
        self._install(
            dataclasses.replace(cur, bundle_pem=pem, bundle_version=version),
            "trust bundle refreshed",
        )
        return True

    async def bundle_loop(self, interval: float) -> None:
        """Refresh the trust bundle every `interval` seconds (renewals refresh it too)."""
        while True:
            await trio.sleep(interval * (0.9 + 0.2 * random.random()))
            try:
                await self.refresh_bundle()
            except CAError as exc:
                _event("identity.bundle_refresh_failed", error=str(exc), level=logging.WARNING)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.bootstrap()
        self._set_state("valid", "bootstrapped")
        task_status.started()
        attempt = 0
        while True:
            cred = self.store.credential
            assert cred is not None
            now = self.clock()
            if attempt == 0:
                delay = renew_delay(
                    cred.not_before, cred.not_after, now, self.fraction, self.jitter
                )
            else:
                # capped exponential backoff with jitter; while still valid, never wait past
                # a quarter of what is left (so a short outage cannot outlast the certificate)
                remaining = (cred.not_after - now).total_seconds()
                delay = retry_delay(attempt - 1)
                if remaining > 0:
                    delay = min(delay, max(remaining / 4, 0.5))
            self.next_renewal = now + dt.timedelta(seconds=delay)
            with trio.move_on_after(delay):
                await self._wake.wait()
            self._wake = trio.Event()
            if self._reschedule:
                self._reschedule = False
                attempt = 0
                continue
            try:
                await self.renew_once()
            except CAError as exc:
                attempt += 1
                _event(
                    "identity.renew_failed", error=str(exc), attempt=attempt, level=logging.WARNING
                )
                continue
            attempt = 0
            self._renewed.set()
            self._renewed = trio.Event()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _event(name: str, level: int = logging.INFO, **fields: object) -> None:
    log.log(level, json.dumps({"event": name, **fields}, default=str))
