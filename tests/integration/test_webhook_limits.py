"""The admission webhook under hostile input (issue 10 item 11): bounded memory for any body
(measured on a real `meshcar webhook` process), an answer for deeply nested JSON, a denial
naming the field for wrong-typed pods, never a traceback, and the webhook serving afterwards."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshcar.inject.patch import InjectError, InjectOptions, inject_object
from meshcar.inject.webhook import MAX_BODY, MAX_JSON_DEPTH, review_response, serve_webhook
from tests.integration.test_webhook import _raw, client, pod, review, webhook

__all__ = ["webhook"]  # the fixture, re-used

OPTS = InjectOptions()


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


def wrong_typed() -> list[tuple[str, Any, str]]:
    """(what, pod, the field path the error must name)."""
    cases: list[tuple[str, Any, str]] = []

    def case(what: str, path: str, change: Any) -> None:
        p = pod()
        change(p)
        cases.append((what, p, path))

    case(
        "env as a map",
        "spec.containers[0].env: expected a list, got a mapping",
        lambda p: p["spec"]["containers"][0].__setitem__("env", {"A": "1"}),
    )
    case(
        "labels as a list",
        "metadata.labels: expected a mapping, got a list",
        lambda p: p["metadata"].__setitem__("labels", ["app"]),
    )
    case(
        "a container as a string",
        "spec.containers[0]: expected a mapping, got a string",
        lambda p: p["spec"]["containers"].__setitem__(0, "api"),
    )
    case(
        "volumes as a string",
        "spec.volumes: expected a list, got a string",
        lambda p: p["spec"].__setitem__("volumes", "none"),
    )
    case(
        "containers as a map",
        "spec.containers: expected a list, got a mapping",
        lambda p: p["spec"].__setitem__("containers", {"name": "api"}),
    )
    case(
        "initContainers as a number",
        "spec.initContainers: expected a list, got an integer",
        lambda p: p["spec"].__setitem__("initContainers", 3),
    )
    case(
        "annotations as a string",
        "metadata.annotations: expected a mapping, got a string",
        lambda p: p["metadata"].__setitem__("annotations", "meshcar.io/app-port=9002"),
    )
    case(
        "an annotation value as a list",
        "metadata.annotations['meshcar.io/app-port']: expected a string",
        lambda p: p["metadata"]["annotations"].__setitem__("meshcar.io/app-port", [9002]),
    )
    case(
        "an env entry as a string",
        "spec.containers[0].env[0]: expected a mapping, got a string",
        lambda p: p["spec"]["containers"][0].__setitem__("env", ["A=1"]),
    )
    case(
        "ports as a map",
        "spec.containers[0].ports: expected a list, got a mapping",
        lambda p: p["spec"]["containers"][0].__setitem__("ports", {"containerPort": 9002}),
    )
    case(
        "a container name as a list",
        "spec.containers[0].name: expected a string, got a list",
        lambda p: p["spec"]["containers"][0].__setitem__("name", ["api"]),
    )
    case(
        "a volume as null",
        "spec.volumes[0]: expected a mapping, got null",
        lambda p: p["spec"].__setitem__("volumes", [None]),
    )
    case(
        "spec as a list",
        "spec: expected a mapping, got a list",
        lambda p: p.__setitem__("spec", []),
    )
    case(
        "metadata as a string",
        "metadata: expected a mapping, got a string",
        lambda p: p.__setitem__("metadata", "api"),
    )
    dep = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "api"},
        "spec": {"template": {"metadata": {"labels": "app=api"}, "spec": pod()["spec"]}},
    }
    cases.append(
        ("template labels as a string", dep, "spec.template.metadata.labels: expected a mapping")
    )
    dep2 = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "api"},
        "spec": {"template": ["x"]},
    }
    cases.append(("template as a list", dep2, "spec.template: expected a mapping, got a list"))
    return cases


CASES = wrong_typed()


@pytest.mark.parametrize(("what", "obj", "path"), CASES, ids=[c[0] for c in CASES])
async def test_wrong_typed_pods_are_denied_naming_the_field(
    webhook: tuple[str, trustme.CA], what: str, obj: Any, path: str
) -> None:
    url, ca = webhook
    async with client(ca) as c:
        r = await c.post(url + "/inject", json=review(obj))
        assert r.status_code == 200
        resp = r.json()["response"]
        assert resp["allowed"] is False and "patch" not in resp
        assert resp["status"]["code"] == 400 and path in resp["status"]["message"], resp
        assert "\n" not in resp["status"]["message"]
        ok = await c.post(url + "/inject", json=review(pod()))
        assert ok.status_code == 200 and "patch" in ok.json()["response"]


@pytest.mark.parametrize(("what", "obj", "path"), CASES, ids=[c[0] for c in CASES])
def test_inject_cli_exits_2_with_one_line_naming_the_field(
    tmp_path: Path, what: str, obj: Any, path: str
) -> None:
    src = tmp_path / "in.json"  # JSON is YAML
    src.write_text(json.dumps(obj))
    r = subprocess.run(
        [sys.executable, "-m", "meshcar.cli", "inject", "-f", str(src)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and path in lines[0] and lines[0].startswith(f"meshcar inject: {src}: ")
    ), r.stderr


def test_inject_cli_deep_yaml_exits_2(tmp_path: Path) -> None:
    for text in ("[" * 100_000, "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 3000))):
        src = tmp_path / "deep.yaml"
        src.write_text(text)
        r = subprocess.run(
            [sys.executable, "-m", "meshcar.cli", "inject", "-f", str(src)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("meshcar inject: "), r.stderr


async def test_deep_json_gets_an_answer(webhook: tuple[str, trustme.CA]) -> None:
    url, ca = webhook
    async with client(ca) as c:
        for body in (
            deep(100_000),
            json.dumps(review({"kind": "Pod", "x": json.loads(deep(MAX_JSON_DEPTH))})).encode(),
            json.dumps(review(dict(pod(), x=[0] * 60_000))).encode(),
        ):
            r = await c.post(
                url + "/inject", content=body, headers={"content-type": "application/json"}
            )
            assert r.status_code == 400 and r.json()["error"] == "bad_review", r.text
            assert "nests deeper" in r.json()["message"] or "JSON values" in r.json()["message"]
        ok = await c.post(url + "/inject", json=review(pod()))
        assert ok.status_code == 200 and "patch" in ok.json()["response"]


# --- never a traceback, for any shape -----------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
FIELDS = [
    "metadata",
    "spec",
    "containers",
    "initContainers",
    "volumes",
    "env",
    "ports",
    "name",
    "labels",
    "annotations",
    "hostNetwork",
    "template",
]


def mutate(draw: st.DrawFn) -> Any:
    """A valid pod (or Deployment) with random JSON put at random places of its tree."""
    obj: Any = pod()
    if draw(st.booleans()):
        obj = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "d"},
            "spec": {"template": {"metadata": obj["metadata"], "spec": obj["spec"]}},
        }
    for _ in range(draw(st.integers(1, 4))):
        node = obj
        for _ in range(draw(st.integers(0, 4))):
            children = (
                [k for k, v in node.items() if isinstance(v, dict | list)]
                if isinstance(node, dict)
                else [i for i, v in enumerate(node) if isinstance(v, dict | list)]
            )
            if not children:
                break
            node = node[draw(st.sampled_from(children))]
        if isinstance(node, dict):
            node[draw(st.sampled_from(FIELDS))] = draw(JSON)
        elif isinstance(node, list) and node:
            node[draw(st.integers(0, len(node) - 1))] = draw(JSON)
    return obj


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.composite(mutate)())
def test_random_shapes_never_raise_anything_but_inject_errors(obj: Any) -> None:
    try:
        inject_object(obj, OPTS)
    except InjectError:
        pass
    answer = review_response(json.dumps(review(obj)).encode(), OPTS)
    assert answer.status in (200, 400)
    if answer.status == 200:
        resp = answer.body["response"]
        assert resp["allowed"] is True or resp["status"]["code"] == 400


# --- bounded memory, measured on a real process --------------------------------------------------


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_webhook_memory_stays_bounded_for_any_body(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(
            lambda task_status=trio.TASK_STATUS_IGNORED: trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "meshcar.cli",
                    "webhook",
                    "--listen",
                    "127.0.0.1:0",
                    "--tls-cert",
                    str(tmp_path / "tls.crt"),
                    "--tls-key",
                    str(tmp_path / "tls.key"),
                ],
                stderr=subprocess.PIPE,
                check=False,
                task_status=task_status,
            )
        )
        try:
            buf = b""
            with trio.fail_after(20):
                while b"webhook listening on" not in buf:
                    chunk = await proc.stderr.receive_some(4096)
                    assert chunk, buf
                    buf += chunk
            port = int(buf.split(b"webhook listening on 127.0.0.1:")[1].split(b'"')[0])
            url = f"https://127.0.0.1:{port}"
            async with client(ca) as c:  # warm up: every code path once, with a small body
                assert (await c.post(url + "/inject", json=review(pod()))).status_code == 200
                assert (await c.post(url + "/inject", content=b"[" * 100)).status_code == 400
            before = peak_rss_mb(proc.pid)

            # 4 MiB and 64 MiB declared: 413 before the body is read
            for size in (4 << 20, 64 << 20):
                reply = await _raw(
                    url,
                    ca,
                    b"POST /inject HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size,
                )
                assert reply.startswith(b"HTTP/1.1 413")
            # 64 MiB really sent, in one stream and chunked: counted as it arrives
            for chunked in (False, True):
                reply = await send_big(port, ca, 64 << 20, chunked)
                assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
            # the largest bodies under the cap: one huge string (served), many small values (refused)
            big_pod = pod()
            big_pod["metadata"]["annotations"]["example.com/blob"] = "y" * (MAX_BODY - 8192)
            many = (
                json.dumps(review(dict(pod(), x=["z" * 30] * 60_000))).encode()[: MAX_BODY - 10]
                + b"]}}"
            )
            async with client(ca) as c:
                r = await c.post(url + "/inject", json=review(big_pod))
                assert r.status_code == 200 and "patch" in r.json()["response"]
                r = await c.post(url + "/inject", content=many)
                assert r.status_code == 400
                r = await c.post(url + "/inject", content=deep(100_000))
                assert r.status_code == 400
                assert (await c.post(url + "/inject", json=review(pod()))).status_code == 200
            growth = peak_rss_mb(proc.pid) - before
            print(f"webhook peak RSS {before:.1f} MB -> +{growth:.1f} MB")
            assert growth < 16, f"peak RSS grew by {growth:.1f} MB"
        finally:
            proc.terminate()


async def send_big(port: int, ca: trustme.CA, size: int, chunked: bool) -> bytes:
    """POST `size` bytes, reading the answer as it comes (the server answers before the end)."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    stream = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="127.0.0.1"
    )
    head = b"POST /inject HTTP/1.1\r\nHost: x\r\n" + (
        b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"Content-Length: %d\r\n\r\n" % size
    )
    piece = b"x" * 65536
    if chunked:
        piece = b"%x\r\n" % len(piece) + piece + b"\r\n"
    reply = b""

    async def sender() -> None:
        try:
            await stream.send_all(head)
            for _ in range(size // 65536):
                await stream.send_all(piece)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            n.start_soon(sender)
            try:
                while b"\r\n\r\n" not in reply:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    reply += chunk
            except trio.BrokenResourceError:
                pass
            n.cancel_scope.cancel()
    await trio.aclose_forcefully(stream)
    return reply


# -- connections per process ---------------------------------------------------------------


async def test_connections_over_the_limit_are_closed_and_the_webhook_recovers(
    nursery: trio.Nursery,
) -> None:
    """Two idle TCP connections fill a limit of 2: a third is closed before any TLS byte;
    once one of the two goes, HTTPS requests are served again."""
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    listeners = await nursery.start(
        partial(serve_webhook, InjectOptions(), ctx, "127.0.0.1", 0, max_connections=2)
    )
    port = listeners[0].socket.getsockname()[1]
    held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
    await (
        trio.testing.wait_all_tasks_blocked()
    )  # both accepted and counted (waiting for a ClientHello)
    third = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(10):
        assert await third.receive_some(100) == b""  # closed by the webhook, nothing sent
    await third.aclose()
    await held[0].aclose()
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    with trio.fail_after(20):
        while True:  # the freed slot is counted out when its handler notices the close
            try:
                async with httpx.AsyncClient(verify=client_ctx, timeout=5) as c:
                    r = await c.get(f"https://127.0.0.1:{port}/healthz")
                break
            except httpx.TransportError:
                await trio.sleep(0.05)
    assert r.status_code == 200
    await held[1].aclose()
