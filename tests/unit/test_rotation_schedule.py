"""Renewal schedule: renew point, jitter bounds, backoff (pure functions)."""

from __future__ import annotations

import datetime as dt

from meshcar.identity.rotate import renew_delay, retry_delay

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def test_renews_at_two_thirds_without_jitter() -> None:
    assert renew_delay(T0, T0 + HOUR, T0, jitter=0.0) == 2400.0


def test_jitter_stays_within_ten_percent() -> None:
    lo = renew_delay(T0, T0 + HOUR, T0, rand=lambda: 0.0)
    hi = renew_delay(T0, T0 + HOUR, T0, rand=lambda: 0.999999)
    assert 2400 * 0.9 - 1e-6 <= lo < 2400 < hi <= 2400 * 1.1 + 1e-6


def test_overdue_renewal_is_immediate() -> None:
    assert renew_delay(T0, T0 + HOUR, T0 + 2 * HOUR) == 0.0


def test_backoff_grows_and_is_capped() -> None:
    delays = [retry_delay(a, base=1, cap=30, rand=lambda: 1.0) for a in range(10)]
    assert delays[:5] == [1, 2, 4, 8, 16]
    assert max(delays) == 30
    assert all(retry_delay(a, rand=lambda: 0.0) > 0 for a in range(10))
