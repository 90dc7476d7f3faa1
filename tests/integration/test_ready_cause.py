"""`/ready` names why no certificate is held (issue 15), not only "no certificate yet"."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trio

from meshcar.sidecar.main import Sidecar
from tests.integration.conftest import make_cfg
from tests.support.pki import ThrowawayCA
from tests.support.ports import free_ports


async def test_ready_says_why_bootstrap_failed(tmp_path: Path, nursery: trio.Nursery) -> None:
    (closed,) = free_ports(1)  # nothing listens: the CA is unreachable
    token = tmp_path / "token"
    token.write_text("t")
    bundle = tmp_path / "ca.pem"
    bundle.write_text(ThrowawayCA.create().bundle_pem)
    cfg = make_cfg(tmp_path, "web", 1, [], {})
    ident = dataclasses.replace(
        cfg.identity, ca_url=f"https://127.0.0.1:{closed}", token_file=token, ca_bundle=bundle
    )
    sidecar = Sidecar(dataclasses.replace(cfg, identity=ident))
    assert sidecar.ready() == (False, "no certificate yet")
    nursery.start_soon(sidecar.rotator.bootstrap)
    with trio.fail_after(10):
        while sidecar.rotator.state != "expired":  # the first failed attempt is recorded
            await trio.sleep(0.01)
    ok, why = sidecar.ready()
    assert not ok
    assert why.startswith("no certificate yet: bootstrap failed: "), why
    assert f"CA unreachable at https://127.0.0.1:{closed}" in why, why
    nursery.cancel_scope.cancel()
