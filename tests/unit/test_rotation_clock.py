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
        self.calls: list[tuple[float, str]] = []  # (virtual time, "token" | "renewal" | "failed")
        self.issued: list[float] = []

    async def sign(self, spiffe_id: str, *, token: str | None = None, k8s_token: str | None = None,
                   chain_file: Path | None = None, key_file: Path | None = None,
                   ttl_seconds: int | None = None, bundle_version: int = 0,
                   trust_pem: str | None = None) -> Credential:
        now = trio.current_time()
        if self.down:
            self.calls.append((now, "failed"))
            raise CAError("CA unreachable (test)", retryable=True)
        self.calls.append((now, "token" if token else "renewal"))
        self.issued.append(now)
        chain, key = self.ca.leaf([spiffe_id], ttl=dt.timedelta(seconds=ttl_seconds or self.ttl), not_before=vnow())
        return Credential(spiffe_id, chain, key, self.ca.bundle_pem, 1)

    async def bundle(self, trust_pem: str | None = None) -> tuple[str, int]:
        return self.ca.bundle_pem, 1


def make(tmp_path: Path, ttl: int, jitter: float = 0.0) -> tuple[Rotator, FakeCA, CredentialStore, Metrics]:
    (tmp_path / "token").write_text("join-token\n")
    fake = FakeCA(ttl)
    store = CredentialStore(tmp_path / "state")
    metrics = Metrics()
    rot = Rotator(store, fake, SID, token_file=tmp_path / "token", metrics=metrics,  # type: ignore[arg-type]
                  ttl_seconds=ttl, fraction=2 / 3, jitter=jitter, clock=vnow)
    return rot, fake, store, metrics


@pytest.fixture
def virtual_validity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `CredentialStore.is_valid_now` (what /ready uses) read the virtual clock."""

    class VirtualDatetime(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> VirtualDatetime:  # type: ignore[override]
            return vnow()  # type: ignore[return-value]

    monkeypatch.setattr(store_mod, "dt", types.SimpleNamespace(datetime=VirtualDatetime, UTC=dt.UTC))


def renewals(fake: FakeCA) -> list[float]:
    return [t for t, kind in fake.calls if kind == "renewal"]


async def test_renews_at_two_thirds_of_each_lifetime(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    rot, fake, store, metrics = make(tmp_path, ttl=300)
    async with trio.open_nursery() as nursery:
        await nursery.start(rot.run)
        assert fake.calls == [(0.0, "token")]
        await trio.sleep(1001)
        nursery.cancel_scope.cancel()
    # each certificate lives 300 s and is replaced at 200 s: 200, 400, 600, 800, 1000
    assert renewals(fake) == pytest.approx([200, 400, 600, 800, 1000], abs=1.0)
    assert metrics.renewals.labels("success")._value.get() == 6  # bootstrap + 5
    assert store.credential is not None and store.credential.not_before == T0 + dt.timedelta(seconds=1000)
    assert metrics.cert_not_after._value.get() == (T0 + dt.timedelta(seconds=1300)).timestamp()


async def test_jitter_stays_within_ten_percent_and_spreads(tmp_path: Path,
                                                           autojump_clock: trio.testing.MockClock) -> None:
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


async def test_backoff_while_the_ca_is_down_then_recovers(tmp_path: Path, autojump_clock: trio.testing.MockClock,
                                                         virtual_validity: None) -> None:
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


async def test_keeps_serving_until_expiry_and_is_not_valid_after(tmp_path: Path,
                                                                 autojump_clock: trio.testing.MockClock,
                                                                 virtual_validity: None) -> None:
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
        # after expiry the loop keeps trying (at most every 0.5 s), never gives up
        before = len(fake.calls)
        await trio.sleep(10)
        assert len(fake.calls) - before >= 10
        fake.down = False
        await rot.wait_renewed()
        assert store.is_valid_now() and store.credential is not cred
        nursery.cancel_scope.cancel()
    assert metrics.renewals.labels("success")._value.get() == 2
