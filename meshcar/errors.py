"""The one error hierarchy of meshcar. Each error carries, like h11's ProtocolError, the HTTP
status it hints (`status`), a short `reason` for logs and metrics, whether an answer can
still be written downstream (`answer`) and whether the connection must close after it
(`close`). `meshcar.net.respond.refusal_for` is the one place these become responses."""

from __future__ import annotations


class MeshcarError(Exception):
    """Root of every error meshcar raises on purpose."""

    status = 500
    reason = "internal"
    answer = True  # a response can still be written to the client
    close = False  # the client connection must close after the answer (or without one)


class ConfigError(MeshcarError):
    """A configuration file is invalid; `problems` lists every problem, each naming file and key."""

    reason = "config"

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


class ProtocolError(MeshcarError):
    """The remote side broke a protocol (HTTP, TLS, PROXY). `status` hints the HTTP answer;
    the connection it came on cannot be trusted to frame another message."""

    reason = "protocol"
    close = True

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.partial: list[object] = []  # events parsed before the error in the same read


class UpstreamError(MeshcarError):
    """The upstream could not be reached or answered badly (502/503/504), before any byte of
    its response went to the client: the client still gets an answer."""

    reason = "upstream"

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


class CircuitOpen(UpstreamError):
    """An upstream's circuit-breaking limit (connections, pending or concurrent requests)
    is reached: a fast 503, never retried."""

    reason = "circuit_open"

    def __init__(self, message: str) -> None:
        super().__init__(message, 503)


class IdentityError(MeshcarError):
    """A certificate or SPIFFE ID is missing, malformed or not the expected one."""

    status = 403
    reason = "identity"


class DownstreamGone(MeshcarError):
    """The client went away or sent a broken body: close everything, answer nobody."""

    status = 499  # what the access log records
    reason = "client_gone"
    answer = False
    close = True


class RequestBodyStalled(DownstreamGone):
    """No request-body byte within the body timeout: answer 408 and close."""

    status = 408
    reason = "request_body_timeout"
    answer = True  # nothing was sent to the client yet


class ClientNotReading(DownstreamGone):
    """The client stopped taking the response for the write timeout: close both sides."""

    reason = "client_not_reading"


class BodyTooLarge(MeshcarError):
    """A streamed request body passed the route's limit: answer 413 and close."""

    status = 413
    reason = "body_too_large"
    close = True


class ResponseStarted(MeshcarError):
    """The upstream failed after the response head was sent: only closing is left."""

    status = 499  # what the access log records (the head it sent had its own status)
    reason = "response_broken"
    answer = False
    close = True
