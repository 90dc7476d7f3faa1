"""Credential and bundle swaps under live pools: pooled, idle and new connections all work.

Round 1's sidecar died on the first *new* outbound connection after a renewal, because the
TLS session cached from the old client context was offered to the new one. These tests
open new connections after each swap (the pool is emptied, as an idle timeout would).
"""

from __future__ import annotations

import httpx

from tests.integration.conftest import Mesh, sid
from tests.integration.test_sidecar_pair import proxied
from tests.support.pki import ThrowawayCA


def _handshakes(mesh: Mesh, result: str) -> float:
    return mesh.client.metrics.handshakes.labels("outbound", result)._value.get()


async def test_new_connection_after_renewal_does_not_reuse_old_session(mesh: Mesh) -> None:
    async with proxied(mesh) as c:
        for _ in range(2):  # a connection is made and its session remembered
            assert (await c.get("http://api/a")).status_code == 200
        await mesh.client.outbound.pool.close_all()
        assert (await c.get("http://api/b")).status_code == 200
        assert _handshakes(mesh, "resumed") == 1  # resumption works before any swap

        # Renewal: a new client context. The pooled (idle) connection stays usable...
        mesh.client.store.install(mesh.ca.credential(sid("web")))
        assert (await c.get("http://api/c")).status_code == 200
        # ...and a new connection (idle timeout passed) must not meet the old session.
        await mesh.client.outbound.pool.close_all()
        for _ in range(3):
            r = await c.get("http://api/d")
            assert r.status_code == 200, r.text
        assert _handshakes(mesh, "failure") == 0
        full_after_swap = _handshakes(mesh, "full")
        # The session of the new context is cached and resumed from then on.
        await mesh.client.outbound.pool.close_all()
        assert (await c.get("http://api/e")).status_code == 200
        assert _handshakes(mesh, "full") == full_after_swap
        assert _handshakes(mesh, "resumed") == 2


async def test_bundle_change_then_burst_of_new_connections(mesh: Mesh) -> None:
    async with proxied(mesh) as c:
        assert (await c.get("http://api/a")).status_code == 200
    # A trust-bundle change (the same CA plus an extra root, as in a staged root rotation).
    extra = ThrowawayCA.create()
    cred = mesh.ca.credential(sid("web"))
    from dataclasses import replace

    mesh.client.store.install(
        replace(
            cred,
            bundle_pem=cred.bundle_pem + extra.bundle_pem,
            bundle_version=cred.bundle_version + 1,
        )
    )
    await mesh.client.outbound.pool.close_all()
    import trio

    statuses: list[int] = []

    async def one(client: httpx.AsyncClient) -> None:
        statuses.append((await client.get("http://api/burst")).status_code)

    clients = [proxied(mesh) for _ in range(8)]
    try:
        async with trio.open_nursery() as n:  # concurrent: the pool must dial several
            for cl in clients:
                n.start_soon(one, cl)
    finally:
        for cl in clients:
            await cl.aclose()
    assert statuses == [200] * 8
    assert mesh.client.metrics.pool_connections.labels("api")._value.get() >= 2
