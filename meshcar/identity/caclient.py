"""Client of the CA API (docs/CA-API.md): bootstrap with a join token, renew over mTLS.

Only the CSR goes to the CA; the private key stays in this process and its state dir.

The CA's HTTPS certificate is verified against the configured `ca_bundle` (handed out of
band) plus, when the caller passes it, the trust bundle the workload already holds (it came
from the CA over a verified connection). So after a trust-root rotation the CA API may
present a certificate chained to the new root without every workload's `ca_bundle` file
being replaced first (docs/ROTATION.md).
"""

from __future__ import annotations

import json as jsonlib
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from meshcar.errors import MeshcarError
from meshcar.identity import httpsclient
from meshcar.identity.keys import csr_pem, key_pem, new_key
from meshcar.tls.store import Credential
from meshcar_tlsprofile import restrict_groups


class CAError(MeshcarError):
    """The CA refused or could not be reached. `retryable` says whether to try again."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class CAClient:
    url: str
    ca_bundle: Path | None  # root(s) the CA's HTTPS certificate chains to (a file) ...
    timeout: float = 10.0
    ca_bundle_pem: str | None = field(default=None, repr=False)  # ... or inline PEM

    def _ssl(
        self, chain_file: Path | None, key_file: Path | None, trust_pem: str | None = None
    ) -> ssl.SSLContext:
        try:
            if self.ca_bundle_pem is not None:
                ctx = ssl.create_default_context(cadata=self.ca_bundle_pem)
            else:
                ctx = ssl.create_default_context(cafile=str(self.ca_bundle))
        except (OSError, ssl.SSLError) as exc:
            raise CAError(
                f"cannot load the CA bundle {self.ca_bundle or '(inline)'}: {exc}", retryable=True
            ) from None
        if trust_pem:
            try:
                ctx.load_verify_locations(cadata=trust_pem)
            except (ssl.SSLError, ValueError):
                pass  # a damaged held bundle must not stop bootstrap with the configured one
        if chain_file is not None and key_file is not None:
            ctx.load_cert_chain(str(chain_file), str(key_file))
        return restrict_groups(ctx)  # X25519/P-256/P-384 only

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
        """Get a new SVID: with a join token (bootstrap) or our current cert (renewal)."""
        key = new_key()
        body: dict[str, object] = {"csr": csr_pem(key, spiffe_id), "bundle_version": bundle_version}
        if token is not None:
            body["token"] = token
        if k8s_token is not None:
            body["k8s_token"] = k8s_token
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        data = await self._request(
            "POST",
            "/v1/sign",
            json=body,
            chain_file=chain_file,
            key_file=key_file,
            trust_pem=trust_pem,
        )
        try:
            chain = data["chain"]
            bundle = data["bundle"]
            got_id = data["spiffe_id"]
            version = int(data.get("bundle_version", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise CAError(f"CA answered without {exc}", retryable=True) from None
        if got_id != spiffe_id:
            raise CAError(
                f"CA issued {got_id!r}, but this sidecar is configured as {spiffe_id!r}",
                retryable=False,
            )
        return Credential(got_id, chain, key_pem(key), bundle, version)

    async def bundle(self, trust_pem: str | None = None) -> tuple[str, int]:
        ctx = self._ssl(None, None, trust_pem)
        try:
            resp = await httpsclient.request(
                "GET", self.url.rstrip("/") + "/v1/bundle", ctx, timeout=self.timeout
            )
        except httpsclient.HTTPSFailure as exc:
            raise CAError(f"CA unreachable: {exc}", retryable=True) from None
        if resp.status != 200:
            raise CAError(f"CA bundle request failed: {resp.status}", retryable=True)
        return resp.text, int(resp.headers.get("x-meshcar-bundle-version", "0"))

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: object,
        chain_file: Path | None,
        key_file: Path | None,
        trust_pem: str | None = None,
    ) -> dict:
        ctx = self._ssl(chain_file, key_file, trust_pem)
        try:
            resp = await httpsclient.request(
                method,
                self.url.rstrip("/") + path,
                ctx,
                body=jsonlib.dumps(json).encode(),
                timeout=self.timeout,
            )
        except httpsclient.HTTPSFailure as exc:
            raise CAError(f"CA unreachable at {self.url}: {exc}", retryable=True) from None
        try:
            data = jsonlib.loads(resp.body)
        except ValueError:
            data = {}
        if resp.status != 200:
            msg = data.get("message") if isinstance(data, dict) else None
            raise CAError(
                f"CA refused: {resp.status} {msg or resp.text[:200]}",
                retryable=resp.status >= 500 or resp.status == 429,
            )
        if not isinstance(data, dict):
            raise CAError("CA answered with something that is not a JSON object", retryable=True)
        return data
