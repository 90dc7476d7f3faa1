"""The issuer interface (meshcar/identity/issuer.py): what each backend sends for bootstrap,
renewal and bundle, and that the rotation loop knows only the interface."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from meshcar.identity.issuer import CAError, Issuer, JoinTokenIssuer, K8sTokenIssuer, VaultIssuer
from meshcar.tls.store import Credential

ROOT = Path(__file__).resolve().parents[2]
SID = "spiffe://test/web"


class Recorder:
    """Stands in for CAClient / VaultClient: records each call's keyword arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def sign(self, spiffe_id: str, **kw: Any) -> Credential:
        self.calls.append(("sign", {"spiffe_id": spiffe_id, **kw}))
        return Credential(spiffe_id, "", "", "bundle")

    async def bundle(self, **kw: Any) -> tuple[str, int]:
        self.calls.append(("bundle", kw))
        return "bundle", 3


HELD = Credential(SID, "chain", "key", "held-bundle", 7)


async def _exercise(issuer: Issuer, rec: Recorder) -> list[tuple[str, dict[str, Any]]]:
    await issuer.bootstrap(SID, ttl_seconds=60, trust_pem="trust")
    await issuer.renew(HELD, chain_file=Path("c.pem"), key_file=Path("k.pem"), ttl_seconds=60)
    assert await issuer.bundle("trust") == ("bundle", 3)
    return rec.calls


async def test_join_token_issuer(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("join-1\n")
    rec = Recorder()
    issuer = JoinTokenIssuer(rec, token)  # type: ignore[arg-type]
    assert issuer.has_bootstrap_credential
    calls = await _exercise(issuer, rec)
    assert calls == [
        ("sign", {"spiffe_id": SID, "token": "join-1", "ttl_seconds": 60, "trust_pem": "trust"}),
        (
            "sign",
            {
                "spiffe_id": SID,
                "chain_file": Path("c.pem"),
                "key_file": Path("k.pem"),
                "ttl_seconds": 60,
                "bundle_version": 7,
                "trust_pem": "held-bundle",
            },
        ),
        ("bundle", {"trust_pem": "trust"}),
    ]
    token.write_text("")
    with pytest.raises(CAError, match="is empty") as err:
        await issuer.bootstrap(SID, ttl_seconds=None, trust_pem=None)
    assert not err.value.retryable


async def test_join_token_issuer_without_a_token_renews_only() -> None:
    issuer = JoinTokenIssuer(Recorder(), None)  # type: ignore[arg-type]
    assert not issuer.has_bootstrap_credential
    with pytest.raises(CAError, match="no token_file configured") as err:
        await issuer.bootstrap(SID, ttl_seconds=None, trust_pem=None)
    assert not err.value.retryable


async def test_k8s_token_issuer_reads_the_projected_token_afresh(tmp_path: Path) -> None:
    token = tmp_path / "sa-token"
    token.write_text("jwt-1")
    rec = Recorder()
    issuer = K8sTokenIssuer(rec, token)  # type: ignore[arg-type]
    assert issuer.has_bootstrap_credential
    await issuer.bootstrap(SID, ttl_seconds=None, trust_pem=None)
    token.write_text("jwt-2")  # the kubelet rotated it
    await issuer.bootstrap(SID, ttl_seconds=None, trust_pem=None)
    assert [c[1]["k8s_token"] for c in rec.calls] == ["jwt-1", "jwt-2"]
    (tmp_path / "sa-token").unlink()
    with pytest.raises(CAError, match="cannot read k8s_token_file"):
        await issuer.bootstrap(SID, ttl_seconds=None, trust_pem=None)


async def test_vault_issuer_sends_no_meshcar_token() -> None:
    rec = Recorder()
    issuer = VaultIssuer(rec)  # type: ignore[arg-type]
    assert issuer.has_bootstrap_credential
    calls = await _exercise(issuer, rec)
    assert calls == [
        ("sign", {"spiffe_id": SID, "ttl_seconds": 60}),
        ("sign", {"spiffe_id": SID, "ttl_seconds": 60}),
        ("bundle", {}),
    ]


def test_the_rotation_loop_knows_only_the_interface() -> None:
    tree = ast.parse((ROOT / "meshcar" / "identity" / "rotate.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {m for m in imported if m.startswith("meshcar.identity")} == {"meshcar.identity.issuer"}
