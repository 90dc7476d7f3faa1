"""The renewal schedule of `Rotator.run` in virtual time (trio's MockClock, autojump).

The CA client is an in-memory double of `CAClient.sign/bundle` that issues real certificates
(so the credential store builds real SSLContexts) whose validity is measured on the same
virtual clock. It stands in for the network only; the real CA is exercised end to end in
tests/e2e/test_rotation*.py.
"""

from __future__ import annotations

import datetime as dt
import types
from pathlib import Path

import pytest
import trio
import trio.testing

import meshcar.tls.store as store_mod
from meshcar.admin.metrics import Metrics
from meshcar.identity.caclient import CAError
from meshcar.identity.issuer import JoinTokenIssuer
from meshcar.identity.rotate import Rotator
from meshcar.tls.store import Credential, CredentialStore
from tests.support.pki import ThrowawayCA

SID = "spiffe://meshcar.test/svc/api"
T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


def vnow() -> dt.datetime:
    """Virtual wall clock: T0 plus trio's (mock) time."""
    return T0 + dt.timedelta(seconds=trio.current_time())


class FakeCA:
    """In-memory CAClient double: issues `ttl`-second certificates starting now (virtual)."""

    def __init__(self, ttl: int) -> None:
        self.ca = ThrowawayCA.create("clock")
        self.ttl = ttl
        self.down = False
        self.refuse_renewals = False  # answer renewals 401 (the CA no longer accepts the cert)
        # the API's certificate chains to a root only the held trust bundle has (after a root
        # rotation): a request that does not trust that bundle fails TLS verification
        self.api_needs_held_bundle = False
        self.calls: list[tuple[float, str]] = []  # (virtual time, "token" | "renewal" | "failed")
        self.issued: list[float] = []

    async def sign(
        self,
        spiffe_id: str,
        *,
        token: str | None = None,
        k8s_token: str | None = None,
        chain_file: Path | None = None,
        key_file: Path | None = None,
        ttl_seconds: int | None = None,
        bundle_version: int = 0,
        trust_pem: str | None = None,
    ) -> Credential:
        now = trio.current_time()
        if self.down:
            self.calls.append((now, "failed"))
            raise CAError("CA unreachable (test)", retryable=True)
        if self.api_needs_held_bundle and trust_pem != self.ca.bundle_pem:
            self.calls.append((now, "failed"))
            raise CAError("CA unreachable: certificate verify failed (test)", retryable=True)
        if chain_file is not None and self.refuse_renewals:
            self.calls.append((now, "refused"))
            raise CAError("CA refused: 401 certificate not accepted (test)", retryable=False)
        if chain_file is not None:  # like the real CA: an expired client certificate fails TLS
            leaf = Credential(spiffe_id, chain_file.read_text(), "", "").not_after
            if leaf <= vnow():
                self.calls.append((now, "refused"))
                raise CAError("CA refused: 401 expired client certificate (test)", retryable=False)
        self.calls.append((now, "token" if token else "renewal"))
        self.issued.append(now)
        chain, key = self.ca.leaf(
            [spiffe_id], ttl=dt.timedelta(seconds=ttl_seconds or self.ttl), not_before=vnow()
        )
        return Credential(spiffe_id, chain, key, self.ca.bundle_pem, 1)

    async def bundle(self, trust_pem: str | None = None) -> tuple[str, int]:
        return self.ca.bundle_pem, 1


def make(
    tmp_path: Path, ttl: int, jitter: float = 0.0
) -> tuple[Rotator, FakeCA, CredentialStore, Metrics]:
    (tmp_path / "token").write_text("join-token\n")
    fake = FakeCA(ttl)
    store = CredentialStore(tmp_path / "state")
    metrics = Metrics()
    rot = Rotator(
        store,
        JoinTokenIssuer(fake, tmp_path / "token"),
        SID,
        metrics=metrics,  # type: ignore[arg-type]
        ttl_seconds=ttl,
        fraction=2 / 3,
        jitter=jitter,
        clock=vnow,
    )
    return rot, fake, store, metrics


@pytest.fixture
def virtual_validity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `CredentialStore.is_valid_now` (what /ready uses) read the virtual clock."""

    class VirtualDatetime(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> VirtualDatetime:  # type: ignore[override]
            return vnow()  # type: ignore[return-value]

    monkeypatch.setattr(
        store_mod, "dt", types.SimpleNamespace(datetime=VirtualDatetime, UTC=dt.UTC)
    )


def renewals(fake: FakeCA) -> list[float]:
    return [t for t, kind in fake.calls if kind == "renewal"]


async def test_renews_at_two_thirds_of_each_lifetime(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rot, fake, store, metrics = make(tmp_path, ttl=300)
    async with trio.open_nursery() as nursery:
        await nursery.start(rot.run)
        assert fake.calls == [(0.0, "token")]
        await trio.sleep(1001)
        nursery.cancel_scope.cancel()
    # each certificate lives 300 s and is replaced at 200 s: 200, 400, 600, 800, 1000
    assert renewals(fake) == pytest.approx([200, 400, 600, 800, 1000], abs=1.0)
    assert metrics.renewals.labels("success")._value.get() == 5  # the bootstrap is not a renewal
    assert metrics.renewals.labels("bootstrap")._value.get() == 1
    assert store.credential is not None and store.credential.not_before == T0 + dt.timedelta(
        seconds=1000
    )
    assert metrics.cert_not_after._value.get() == (T0 + dt.timedelta(seconds=1300)).timestamp()


async def test_jitter_stays_within_ten_percent_and_spreads(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rot, fake, _, _ = make(tmp_path, ttl=600, jitter=0.1)
    async with trio.open_nursery() as nursery:
        await nursery.start(rot.run)
        await trio.sleep(600 * 40)
        nursery.cancel_scope.cancel()
    issued = fake.issued
    gaps = [b - a for a, b in zip(issued, issued[1:], strict=False)]
    assert len(gaps) >= 40
    # 2/3 of 600 s = 400 s, +/- 10 %: [360, 440] (plus up to 1 s of certificate-time rounding)
    assert all(359 <= g <= 441 for g in gaps), gaps
    assert max(gaps) - min(gaps) > 20, "jitter should spread renewals"


async def test_backoff_while_the_ca_is_down_then_recovers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, virtual_validity: None
) -> None:
    rot, fake, store, metrics = make(tmp_path, ttl=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(rot.run)
        first = store.credential
        assert first is not None
        fake.down = True
        await trio.sleep(2400 + 300)  # the renewal point (2400 s) and 300 s of failures
        failed = [t for t, kind in fake.calls if kind == "failed"]
        assert failed[0] == pytest.approx(2400, abs=1.0)
        gaps = [b - a for a, b in zip(failed, failed[1:], strict=False)]
        # capped exponential backoff with jitter: attempt k waits within [d/2, d], d = min(30, 0.5 * 2**k)
        for k, gap in enumerate(gaps):
            d = min(30.0, 0.5 * 2**k)
            assert d / 2 - 1e-6 <= gap <= d + 1e-6, (k, gap)
        assert max(gaps) <= 30 + 1e-6 and max(gaps) >= 15
        # still serving with the first certificate, and still valid
        assert store.credential is first and store.is_valid_now()
        assert metrics.renewals.labels("failure")._value.get() == len(failed)
        fake.down = False
        await rot.wait_renewed()
        assert trio.current_time() - failed[-1] <= 30 + 1e-6  # renewed at the next retry
        assert store.credential is not first and store.is_valid_now()
        nursery.cancel_scope.cancel()


async def test_keeps_serving_until_expiry_and_is_not_valid_after(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, virtual_validity: None
) -> None:
    rot, fake, store, metrics = make(tmp_path, ttl=600)
    async with trio.open_nursery() as nursery:
        await nursery.start(rot.run)
        cred = store.credential
        assert cred is not None
        ctx = store.server_context()
        fake.down = True
        await trio.sleep(599)  # just before expiry: the renewal attempts all failed
        assert renewals(fake) == [] and len([c for c in fake.calls if c[1] == "failed"]) > 5
        assert store.credential is cred and store.server_context() is ctx and store.is_valid_now()
        await trio.sleep(2)  # past not-after without a replacement: /ready must go false
        assert store.credential is cred and not store.is_valid_now()
        assert rot.state == "expired" and metrics.identity_expired._value.get() == 1
        # after expiry the loop keeps trying with capped, jittered backoff: never gives up,
        # never spins (round 1 retried every 0.5 s forever)
        before = len(fake.calls)
        await trio.sleep(600)
        after_expiry = fake.calls[before:]
        assert 10 <= len(after_expiry) <= 600 / 15 + 2, len(after_expiry)
        gaps = [b[0] - a[0] for a, b in zip(after_expiry, after_expiry[1:], strict=False)]
        assert max(gaps) <= 30 + 1e-6 and min(gaps[-5:]) >= 15 - 1e-6, gaps
        fake.down = False
        await rot.wait_renewed()
        assert store.is_valid_now() and store.credential is not cred
        # recovery used the bootstrap credential (the expired certificate was never presented)
        assert fake.calls[-1][1] == "token" and "refused" not in [k for _, k in fake.calls]
        assert rot.state == "valid" and metrics.identity_expired._value.get() == 0
        nursery.cancel_scope.cancel()
    assert metrics.renewals.labels("success")._value.get() == 1


async def test_re_bootstrap_after_expiry_trusts_the_held_bundle(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, virtual_validity: None
) -> None:
    """After a root rotation the CA API chains to the new root, which only the held trust
    bundle has (`ca_bundle` still names the old one): the re-bootstrap after an expiry must
    verify the API with it too, as renewals do (the lifecycle chaos test found this)."""
    rot, fake, store, _ = make(tmp_path, ttl=120)
    async with trio.open_nursery() as nursery:
        await nursery.start(rot.run)
        fake.api_needs_held_bundle = True
        fake.down = True
        await trio.sleep(200)  # past expiry
        assert rot.state == "expired"
        fake.down = False
        with trio.fail_after(120):
            await rot.wait_renewed()
        assert store.is_valid_now() and fake.calls[-1][1] == "token"
        nursery.cancel_scope.cancel()


async def test_refused_renewal_falls_back_to_the_bootstrap_credential(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rot, fake, store, metrics = make(tmp_path, ttl=300)
    async with trio.open_nursery() as nursery:
        await nursery.start(rot.run)
        first = store.credential
        fake.refuse_renewals = True  # e.g. the CA lost its record of this certificate
        await rot.wait_renewed()
        assert [k for _, k in fake.calls] == ["token", "refused", "token"]
        assert (
            fake.calls[1][0] == pytest.approx(200, abs=1.0) and fake.calls[2][0] == fake.calls[1][0]
        )
        assert (
            store.credential is not first
            and rot.reason == "re-bootstrapped after a refused renewal"
        )
        nursery.cancel_scope.cancel()


async def test_expired_without_bootstrap_credential_keeps_retrying_with_backoff(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, virtual_validity: None
) -> None:
    rot, fake, store, metrics = make(tmp_path, ttl=120)
    async with trio.open_nursery() as nursery:
        await nursery.start(rot.run)
        rot.issuer = JoinTokenIssuer(fake, None)  # type: ignore[arg-type]  # the join token was single-use and is gone
        fake.down = True
        await trio.sleep(400)
        fake.down = False
        await trio.sleep(120)
        # the expired certificate is refused (not retryable) and there is nothing to fall
        # back to: the loop keeps trying, slowly, and says why
        assert rot.state == "expired" and "expired client certificate" in rot.reason
        tail = [t for t, _ in fake.calls[-4:]]
        assert all(b - a >= 15 - 1e-6 for a, b in zip(tail, tail[1:], strict=False)), fake.calls[
            -4:
        ]
        nursery.cancel_scope.cancel()


async def test_operator_renewal_reschedules_the_loop(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rot, fake, store, metrics = make(tmp_path, ttl=300)
    async with trio.open_nursery() as nursery:
        await nursery.start(rot.run)
        await trio.sleep(100)
        assert await rot.renew_on_request() == "renewed"
        await trio.sleep(250)  # the old schedule would renew at 200; the new one at 100 + 200
        assert renewals(fake) == pytest.approx([100, 300], abs=1.0)
        nursery.cancel_scope.cancel()
    assert metrics.renewals.labels("success")._value.get() == 2


async def test_failed_operator_renewal_is_counted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rot, fake, store, metrics = make(tmp_path, ttl=300)
    async with trio.open_nursery() as nursery:
        await nursery.start(rot.run)
        fake.down = True
        with pytest.raises(CAError):
            await rot.renew_on_request()
        assert metrics.renewals.labels("failure")._value.get() == 1
        assert rot.state == "retrying"
        nursery.cancel_scope.cancel()


def test_bundle_version_survives_a_restart(tmp_path: Path) -> None:
    ca = ThrowawayCA.create()
    store = CredentialStore(tmp_path / "state")
    cred = ca.credential(SID)
    from dataclasses import replace

    store.install(replace(cred, bundle_version=7))
    from meshcar.identity.rotate import load_saved

    again = load_saved(CredentialStore(tmp_path / "state"), SID)
    assert again is not None and again.bundle_version == 7
