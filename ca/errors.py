"""The CA's error hierarchy: every error it raises on purpose carries an HTTP status and a code.

`ca/api.py` is the one place these become HTTP responses
(`{"error": code, "message": message}`); the CLI prints them as one-line messages.
Messages never contain secrets (tokens, keys).
"""

from __future__ import annotations


class CAError(Exception):
    """Root of the CA's errors. `status` is the HTTP status, `code` the short error code."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class BadRequest(CAError):
    """The request is not what the API accepts (not JSON, missing or ill-typed fields)."""

    status = 400
    code = "bad_request"


class BadCSR(CAError):
    """The CSR is malformed or its self-signature does not verify."""

    status = 400
    code = "bad_csr"


class UnsupportedKey(CAError):
    """The CSR's public key is not ECDSA P-256."""

    status = 400
    code = "unsupported_key"


class TooLarge(CAError):
    """The request body is over the limit."""

    status = 413
    code = "too_large"


class Unauthenticated(CAError):
    """No valid credential: codes no_credential, bad_token, token_expired, token_used_up,
    bad_k8s_token, bad_client_certificate."""

    status = 401
    code = "no_credential"


class Forbidden(CAError):
    """The identity is authenticated, but the issuing backend's policy does not allow it
    (a Vault/OpenBao PKI role that does not permit this SPIFFE ID)."""

    status = 403
    code = "forbidden"


class NotFound(CAError):
    status = 404
    code = "not_found"


class MethodNotAllowed(CAError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, allow: str) -> None:
        super().__init__(message)
        self.allow = allow


class Unavailable(CAError):
    """The CA cannot issue right now (for example its intermediate has expired)."""

    status = 503
    code = "unavailable"


class ConfigError(CAError):
    """Bad command-line input or a CA directory that cannot be used (CLI exit status 1)."""

    status = 400
    code = "config"


class InvalidSpiffeId(ConfigError):
    """A SPIFFE ID is malformed or outside the CA's trust domain."""

    code = "bad_spiffe_id"
