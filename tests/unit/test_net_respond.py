"""The error model of the request path (issue 11): every error carries its status hint,
a reason for logs and whether an answer can still be written; `net/respond.py` is the one
place that turns them into the response written downstream (memory streams, no sockets)."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from meshcar import errors
from meshcar.net.httpconn import HttpConn
from meshcar.net.respond import Refuse, answer, refusal_for
from meshcar.proto.http1 import RequestHead, ResponseHead
from tests.support.memhttp import read_message

# (error, status hint, an answer is written, the connection closes after it)
CASES = [
    (errors.UpstreamError("refused", 502), 502, True, False),
    (errors.UpstreamError("slow", 504), 504, True, False),
    (errors.ProtocolError("bad head", 431), 431, True, True),
    (errors.BodyTooLarge("request body larger than 10 bytes"), 413, True, True),
    (errors.RequestBodyStalled("no request body bytes for 1s"), 408, True, True),
    (errors.DownstreamGone("client closed"), 499, False, True),
    (errors.ClientNotReading("client did not read"), 499, False, True),
    (errors.ResponseStarted("upstream closed mid-body"), 499, False, True),
    (errors.IdentityError("no SPIFFE ID"), 403, True, False),
]


def _req(body: bool) -> RequestHead:
    return RequestHead(
        b"POST" if body else b"GET",
        b"/",
        "1.1",
        [(b"Host", b"x")],
        True,
        False,
        5 if body else None,
    )


@pytest.mark.parametrize(("exc", "status", "answered", "close"), CASES)
def test_every_request_path_error_carries_its_hint(
    exc: errors.MeshcarError, status: int, answered: bool, close: bool
) -> None:
    assert isinstance(exc, errors.MeshcarError) and exc.reason
    assert (exc.status, exc.answer, exc.close) == (status, answered, close)
    refusal = refusal_for(exc)
    if not answered:
        assert refusal is None
    else:
        assert refusal == Refuse(status, str(exc), close=close)


def test_the_upstream_is_named_only_in_upstream_errors() -> None:
    assert refusal_for(errors.UpstreamError("refused"), "app at 127.0.0.1:1") == Refuse(
        502, "app at 127.0.0.1:1: refused"
    )
    stalled = refusal_for(errors.RequestBodyStalled("no bytes"), "app at 127.0.0.1:1")
    assert stalled is not None and stalled.message == "no bytes"


async def _written(refuse: Refuse, req: RequestHead | None) -> tuple[bool, ResponseHead, dict]:
    client, server = trio.testing.memory_stream_pair()
    keep = await answer(HttpConn(server, "request"), refuse, req)
    head, body, _ = await read_message(HttpConn(client, "response"))
    assert isinstance(head, ResponseHead)
    return keep, head, json.loads(body)


async def test_answer_writes_json_and_keeps_a_bodiless_request_open() -> None:
    refuse = Refuse(429, "slow down", ((b"Retry-After", b"3"),))
    keep, head, body = await _written(refuse, _req(body=False))
    assert keep and head.status == 429 and head.keep_alive
    assert head.header(b"retry-after") == b"3"
    assert head.header(b"content-type") == b"application/json"
    assert body == {"error": 429, "message": "slow down"}


async def test_answer_closes_when_a_request_body_is_left_unread() -> None:
    keep, head, _ = await _written(Refuse(403, "no"), _req(body=True))
    assert not keep and not head.keep_alive


async def test_answer_closes_when_the_refusal_says_so() -> None:
    keep, head, body = await _written(Refuse(408, "too slow", close=True), _req(body=False))
    assert not keep and not head.keep_alive and body["error"] == 408


async def test_answer_to_a_client_that_is_gone_is_no_error() -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.aclose()
    assert await answer(HttpConn(server, "request"), Refuse(502, "x"), _req(body=False)) is False


def test_grpc_refusal_is_trailers_only_with_http_200() -> None:
    from meshcar.net.respond import grpc_refusal

    codes = {s: dict(grpc_refusal(s, "x"))[b"grpc-status"] for s in (403, 429, 502, 503, 504)}
    assert codes == {403: b"7", 429: b"8", 502: b"14", 503: b"14", 504: b"4"}
    hs = dict(grpc_refusal(418, "100% café\n"))
    assert hs[b":status"] == b"200" and hs[b"content-type"] == b"application/grpc"
    assert hs[b"grpc-status"] == b"2"  # UNKNOWN
    assert hs[b"grpc-message"] == b"100%25 caf%C3%A9%0A"  # percent-encoded, as gRPC says
