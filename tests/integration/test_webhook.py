"""The admission webhook over real HTTPS on loopback, with real AdmissionReview v1 JSON."""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonpatch
import kubernetes_validate
import pytest
import trio
import trustme
import yaml

from meshcar.inject import cli
from meshcar.inject.patch import InjectOptions
from meshcar.inject.webhook import serve_webhook

OPTS = InjectOptions()


def pod(**spec: Any) -> dict[str, Any]:
    """A pod as the API server hands it to a webhook for a Deployment's ReplicaSet."""
    s: dict[str, Any] = {
        "serviceAccountName": "api",
        "containers": [
            {"name": "api", "image": "example/api:1", "ports": [{"containerPort": 9002}]}
        ],
    }
    s.update(spec)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "api-7c9d8f-",
            "labels": {"app": "api", "pod-template-hash": "7c9d8f"},
            "annotations": {
                "meshcar.io/app-port": "9002",
                "meshcar.io/upstreams": "payments=payments.default.svc:7003=default/payments",
                "meshcar.io/allowed-callers": "default/web",
            },
        },
        "spec": s,
    }


def review(
    obj: Any, uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002", operation: str = "CREATE"
) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "default",
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


@pytest.fixture
async def webhook(nursery: trio.Nursery) -> AsyncIterator[tuple[str, trustme.CA]]:
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "meshcar-webhook.meshcar-system.svc").configure_cert(ctx)
    listeners = await nursery.start(serve_webhook, OPTS, ctx, "127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    yield f"https://127.0.0.1:{port}", ca


def client(ca: trustme.CA) -> httpx.AsyncClient:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return httpx.AsyncClient(verify=ctx, timeout=10)


def cli_inject(obj: dict[str, Any]) -> dict[str, Any]:
    docs, _ = cli.inject_stream(yaml.safe_dump(obj), OPTS)
    return docs[0]


async def test_pod_patch_equals_cli_output(webhook: tuple[str, trustme.CA]) -> None:
    url, ca = webhook
    obj = pod()
    async with client(ca) as c:
        r = await c.post(url + "/inject", json=review(obj))
    assert r.status_code == 200
    body = r.json()
    assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
    resp = body["response"]
    assert resp["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert resp["allowed"] is True and resp["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(resp["patch"]))
    assert all(op["op"] in ("add", "replace", "remove") for op in patch)
    patched = jsonpatch.apply_patch(obj, patch)
    assert patched == cli_inject(obj)
    patched["metadata"]["name"] = "api-7c9d8f-abcde"  # the API server fills it from generateName
    kubernetes_validate.validate(patched, "1.29.0", strict=True)
    assert patched["spec"]["initContainers"][0]["name"] == "meshcar-proxy"


async def test_classic_annotation_and_pod_with_existing_init_and_env(
    webhook: tuple[str, trustme.CA],
) -> None:
    url, ca = webhook
    obj = pod(initContainers=[{"name": "migrate", "image": "example/migrate:1"}])
    obj["spec"]["containers"][0]["env"] = [{"name": "A", "value": "1"}]
    obj["metadata"]["annotations"]["meshcar.io/sidecar-mode"] = "classic"
    async with client(ca) as c:
        r = await c.post(url + "/inject", json=review(obj))
    patch = json.loads(base64.b64decode(r.json()["response"]["patch"]))
    patched = jsonpatch.apply_patch(obj, patch)
    assert patched == cli_inject(obj)
    assert [c["name"] for c in patched["spec"]["containers"]] == ["meshcar-proxy", "api"]


@pytest.mark.parametrize(
    "obj",
    [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}},
        dict(
            pod(), metadata=dict(pod()["metadata"], annotations={"meshcar.io/inject": "disabled"})
        ),
    ],
)
async def test_nothing_to_inject_is_allowed_without_patch(
    webhook: tuple[str, trustme.CA], obj: dict[str, Any]
) -> None:
    url, ca = webhook
    async with client(ca) as c:
        r = await c.post(url + "/inject", json=review(obj))
    assert r.status_code == 200
    resp = r.json()["response"]
    assert resp == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


async def test_already_injected_gets_no_patch(webhook: tuple[str, trustme.CA]) -> None:
    url, ca = webhook
    injected = cli_inject(pod())
    async with client(ca) as c:
        r = await c.post(url + "/inject", json=review(injected))
    assert "patch" not in r.json()["response"]


async def test_uninjectable_pod_is_allowed_with_a_warning(webhook: tuple[str, trustme.CA]) -> None:
    url, ca = webhook
    async with client(ca) as c:
        r = await c.post(url + "/inject", json=review(pod(hostNetwork=True)))
        two_ports = pod()
        del two_ports["metadata"]["annotations"]["meshcar.io/app-port"]
        two_ports["spec"]["containers"][0]["ports"].append({"containerPort": 9100})
        r2 = await c.post(url + "/inject", json=review(two_ports))
    resp = r.json()["response"]
    assert resp["allowed"] is True and "patch" not in resp
    assert "hostNetwork" in resp["warnings"][0] and "pod/api-7c9d8f-" in resp["warnings"][0]
    resp2 = r2.json()["response"]
    assert resp2["allowed"] is True and "patch" not in resp2
    assert "several ports (9002, 9100)" in resp2["warnings"][0]
    assert "meshcar.io/app-port" in resp2["warnings"][0]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "not a JSON object"),
        (
            json.dumps(
                {
                    "apiVersion": "admission.k8s.io/v1beta1",
                    "kind": "AdmissionReview",
                    "request": {"uid": "x"},
                }
            ).encode(),
            "admission.k8s.io/v1",
        ),
        (
            json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
            "missing request",
        ),
        (json.dumps(review(pod(), uid="")).encode(), "missing request.uid"),
        (
            json.dumps(
                dict(review(None), request=dict(review(None)["request"], object="x"))
            ).encode(),
            "not an object",
        ),
    ],
)
async def test_malformed_review_gets_400_and_server_keeps_serving(
    webhook: tuple[str, trustme.CA], body: bytes, message: str
) -> None:
    url, ca = webhook
    async with client(ca) as c:
        r = await c.post(
            url + "/inject", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400
        assert r.json()["error"] == "bad_review" and message in r.json()["message"]
        ok = await c.post(url + "/inject", json=review(pod()))
        assert ok.status_code == 200 and "patch" in ok.json()["response"]


async def test_http_errors(webhook: tuple[str, trustme.CA]) -> None:
    url, ca = webhook
    async with client(ca) as c:
        assert (await c.get(url + "/healthz")).json() == {"status": "ok"}
        assert (await c.get(url + "/inject")).status_code == 405
        assert (await c.post(url + "/mutate", json={})).status_code == 404
        big = await c.post(url + "/inject", content=b"x" * (5 * 1024 * 1024))
        assert big.status_code == 413 and big.json()["error"] == "too_large"
    async with client(ca) as c:
        assert (await c.post(url + "/inject", json=review(pod()))).status_code == 200


async def _raw(url: str, ca: trustme.CA, data: bytes) -> bytes:
    """Send raw bytes over TLS; return one whole HTTP response (head + Content-Length body)."""
    port = int(url.rsplit(":", 1)[1])
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    stream = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="127.0.0.1"
    )
    await stream.send_all(data)
    reply = b""
    with trio.fail_after(5):
        while True:
            head, sep, body = reply.partition(b"\r\n\r\n")
            if sep:
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    )
                )
                if len(body) >= length:
                    break
            chunk = await stream.receive_some(65536)
            assert chunk, f"connection closed before a whole response: {reply!r}"
            reply += chunk
    await stream.aclose()
    return reply


@pytest.mark.parametrize("chunked", [False, True])
async def test_oversized_body_gets_413(webhook: tuple[str, trustme.CA], chunked: bool) -> None:
    url, ca = webhook
    if chunked:
        chunk = b"x" * 65536
        piece = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        data = (
            b"POST /inject HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + piece * 70
        )
    else:
        data = b"POST /inject HTTP/1.1\r\nHost: x\r\nContent-Length: 5242880\r\n\r\n"
    reply = await _raw(url, ca, data)
    assert reply.startswith(b"HTTP/1.1 413") and b"too_large" in reply
    async with client(ca) as c:
        assert (await c.post(url + "/inject", json=review(pod()))).status_code == 200


async def test_broken_clients_do_not_stop_others(webhook: tuple[str, trustme.CA]) -> None:
    url, ca = webhook
    port = int(url.rsplit(":", 1)[1])
    # a client that connects and never says anything, one that speaks plain HTTP to the TLS
    # port, and one that sends garbage after a real handshake
    silent = await trio.open_tcp_stream("127.0.0.1", port)
    plain = await trio.open_tcp_stream("127.0.0.1", port)
    await plain.send_all(b"POST /inject HTTP/1.1\r\nHost: x\r\n\r\n")
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    garbage = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="127.0.0.1"
    )
    await garbage.send_all(b"NOT HTTP AT ALL\r\n\r\n")
    reply = await garbage.receive_some(4096)
    assert reply.startswith(b"HTTP/1.1 400")
    async with client(ca) as c:
        for _ in range(3):  # keep-alive on one connection
            r = await c.post(url + "/inject", json=review(pod()))
            assert r.status_code == 200 and "patch" in r.json()["response"]
    for s in (silent, plain, garbage):
        await s.aclose()


async def test_meshcar_webhook_command(tmp_path: Any) -> None:
    """`meshcar webhook` as a real process: refuses unreadable TLS files clearly, else serves."""
    import subprocess
    import sys

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    bad = await trio.run_process(
        [
            sys.executable,
            "-m",
            "meshcar.cli",
            "webhook",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            str(tmp_path / "missing.crt"),
            "--tls-key",
            str(key_file),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert bad.returncode == 2 and b"missing.crt" in bad.stderr
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
                    str(cert_file),
                    "--tls-key",
                    str(key_file),
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
            async with client(ca) as c:
                r = await c.post(f"https://127.0.0.1:{port}/inject", json=review(pod()))
            assert r.status_code == 200 and "patch" in r.json()["response"]
        finally:
            proc.terminate()


def _bare_pod(**spec: Any) -> dict[str, Any]:
    """A pod with no meshcar.io annotation at all."""
    obj = pod(**spec)
    obj["metadata"]["annotations"] = {}
    return obj


@pytest.mark.parametrize(
    "case", ["single containerPort", "outbound-only", "proxy variables set", "transparent"]
)
async def test_pods_without_app_port_annotation_are_injected(
    webhook: tuple[str, trustme.CA], case: str
) -> None:
    """Issue 16: the webhook used to admit such pods without a sidecar."""
    url, ca = webhook
    obj = _bare_pod()
    app = obj["spec"]["containers"][0]
    if case == "outbound-only":
        del app["ports"]
        obj["metadata"]["annotations"]["meshcar.io/upstreams"] = (
            "payments=p.default.svc:4143=default/payments"
        )
    elif case == "proxy variables set":
        app["env"] = [
            {"name": "HTTP_PROXY", "value": "http://squid.corp:3128"},
            {"name": "NO_PROXY", "value": ".corp.example"},
        ]
    elif case == "transparent":
        obj["metadata"]["annotations"]["meshcar.io/capture"] = "transparent"
    async with client(ca) as c:
        r = await c.post(url + "/inject", json=review(obj))
    resp = r.json()["response"]
    assert resp["allowed"] is True and "warnings" not in resp, resp
    patched = jsonpatch.apply_patch(obj, json.loads(base64.b64decode(resp["patch"])))
    assert patched == cli_inject(obj)
    patched["metadata"]["name"] = "api-7c9d8f-abcde"
    kubernetes_validate.validate(patched, "1.29.0", strict=True)
    inits = [c["name"] for c in patched["spec"]["initContainers"]]
    sidecar = next(c for c in patched["spec"]["initContainers"] if c["name"] == "meshcar-proxy")
    cfg = yaml.safe_load(next(e for e in sidecar["env"] if e["name"] == "MESHCAR_CONFIG")["value"])
    env = {e["name"]: e.get("value") for e in patched["spec"]["containers"][0].get("env", [])}
    if case == "transparent":
        assert inits == ["meshcar-init", "meshcar-proxy"] and env == {}
        assert cfg["outbound"]["transparent_listen"] == "127.0.0.1:4140"
    else:
        assert inits == ["meshcar-proxy"]
        assert env["HTTP_PROXY"] == "http://127.0.0.1:4140"
    if case == "outbound-only":
        assert cfg["inbound"] == {"listen": "127.0.0.1:4143", "allow": []}
    else:
        assert cfg["app"]["port"] == 9002
    if case == "proxy variables set":
        assert env["NO_PROXY"] == ".corp.example,localhost,127.0.0.1,::1"
        assert cfg["outbound"]["egress_proxy"] == "squid.corp:3128"


async def test_grpc_and_tcp_annotations_are_injected(webhook: tuple[str, trustme.CA]) -> None:
    """Issue 16 / 13: app-protocol, inbound-tcp-ports and tcp-upstreams through the webhook
    give the same patch as `meshcar inject`, and a config the sidecar's loader accepts."""
    from meshcar.sidecar.config import parse_config

    url, ca = webhook
    obj = pod()
    obj["metadata"]["annotations"].update(
        {
            "meshcar.io/app-protocol": "h2c",
            "meshcar.io/inbound-tcp-ports": "9013 5432:proxy-v2",
            "meshcar.io/upstreams": "payments=payments.default.svc:7003=default/payments, "
            "payments-db=payments.default.svc:7003=default/payments",
            "meshcar.io/tcp-upstreams": "payments-db=7312:9013",
        }
    )
    async with client(ca) as c:
        r = await c.post(url + "/inject", json=review(obj))
    resp = r.json()["response"]
    assert resp["allowed"] is True and "warnings" not in resp, resp
    patched = jsonpatch.apply_patch(obj, json.loads(base64.b64decode(resp["patch"])))
    assert patched == cli_inject(obj)
    patched["metadata"]["name"] = "api-7c9d8f-abcde"
    for version in ("1.29.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(patched, version, strict=True)
    sidecar = next(c for c in patched["spec"]["initContainers"] if c["name"] == "meshcar-proxy")
    text = next(e for e in sidecar["env"] if e["name"] == "MESHCAR_CONFIG")["value"]
    data = yaml.safe_load(
        text.replace("$(MESHCAR_POD_NAMESPACE)", "default").replace(
            "$(MESHCAR_POD_SERVICE_ACCOUNT)", "api"
        )
    )
    data["identity"]["token_file"] = data["identity"].pop("k8s_token_file")
    cfg = parse_config(data, "$MESHCAR_CONFIG")
    assert cfg.app_protocol == "h2c"
    assert [(t.port, t.proxy_protocol) for t in cfg.tcp_ports] == [(9013, "none"), (5432, "v2")]
    ups = {u.name: (u.protocol, u.local_port, u.target_port) for u in cfg.upstreams}
    assert ups == {"payments": ("http", None, None), "payments-db": ("tcp", 7312, 9013)}


async def test_bad_tcp_upstream_annotation_is_allowed_with_a_warning(
    webhook: tuple[str, trustme.CA],
) -> None:
    url, ca = webhook
    obj = pod()
    obj["metadata"]["annotations"]["meshcar.io/tcp-upstreams"] = "nope=7312:9013"
    async with client(ca) as c:
        r = await c.post(url + "/inject", json=review(obj))
    resp = r.json()["response"]
    assert resp["allowed"] is True and "patch" not in resp, resp
    assert any("meshcar.io/tcp-upstreams" in w for w in resp["warnings"]), resp
