"""The one error hierarchy of meshcar; each error carries the HTTP status it hints (`status`)."""

from __future__ import annotations


class MeshcarError(Exception):
    """Root of every error meshcar raises on purpose."""

    status = 500


class ConfigError(MeshcarError):
    """A configuration file is invalid; `problems` lists every problem, each naming file and key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


class ProtocolError(MeshcarError):
    """The remote side broke a protocol (HTTP, TLS, PROXY). `status` hints the HTTP answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.partial: list[object] = []  # events parsed before the error in the same read


class UpstreamError(MeshcarError):
    """The upstream could not be reached or answered badly (502/503/504)."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


class IdentityError(MeshcarError):
    """A certificate or SPIFFE ID is missing, malformed or not the expected one."""

    status = 403
