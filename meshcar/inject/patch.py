"""Sidecar injection as a pure function on Kubernetes objects (plain dicts).

Theory of operation: `inject_object(obj, options)` finds the Pod spec inside a workload
(Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job, CronJob),
reads the `meshcar.io/*` annotations, and returns a deep copy with the meshcar sidecar added
the way `linkerd inject` does it:

- a native sidecar (an initContainer with `restartPolicy: Always`, Kubernetes >= 1.29,
  placed first so it runs before the other init containers and the app) by default, or a
  classic container (placed first in `containers`) with `meshcar.io/sidecar-mode: classic`;
- a `startupProbe` on the admin `/ready` so that, as a native sidecar, the app containers
  start only once the sidecar holds a certificate; readiness `/ready`, liveness `/live`;
- a memory-backed emptyDir for the key and certificate, and a projected service-account
  token with the CA's audience and a short expiry (the CA verifies it, see ca/k8s_token.py);
- the sidecar configuration (docs/CONFIG.md) rendered as YAML into the env var
  `MESHCAR_CONFIG`, read by `meshcar sidecar --config-env MESHCAR_CONFIG`. The pod's own
  identity `spiffe://TD/ns/NS/sa/SA` is filled in by the kubelet through `$(VAR)` expansion
  of downward-API env vars, so the same rendering works for the CLI and the webhook;
- in proxy capture (the default): `HTTP_PROXY`/`http_proxy` (the sidecar's outbound
  listener) and `NO_PROXY`/`no_proxy` on every app container, merged with what the container
  already sets: its `NO_PROXY` entries are kept (localhost added), and an `HTTP_PROXY` it had
  becomes the sidecar's `outbound.egress_proxy`, so non-mesh hosts still go through it;
- in transparent capture (`meshcar.io/capture: transparent`): no proxy variables; an init
  container `meshcar-init` (the only container with NET_ADMIN) runs `meshcar init-iptables`,
  which redirects the pod's outbound TCP to the sidecar's transparent listener, except the
  sidecar's own uid (SIDECAR_UID) and loopback.

The app port is the `meshcar.io/app-port` annotation, else the one `containerPort` the app
containers declare; with none declared (and no annotation) the pod is outbound-only: its
inbound listens on loopback and allows no caller. Several declared ports and no annotation
is an InjectError. Non-mesh hosts are let through by the sidecar's `outbound.egress`
(`allow` unless `--egress deny` or `meshcar.io/egress: deny`).

Nothing else is touched. Objects of other kinds come back unchanged; so do workloads that
opted out (annotation or label `meshcar.io/inject: disabled`); objects already
injected (a container named `meshcar-proxy` exists) come back unchanged, so injecting twice
equals injecting once. What cannot be injected raises `InjectError` naming the object; a
field of the wrong type (`env` as a mapping, `labels` as a list, a container as a string,
`volumes: "none"`) raises its subclass `ShapeError`, naming the field's path, before
anything is read from it.
The app's protocol (`meshcar.io/app-protocol: h2c` for a gRPC server), the app ports taking
opaque TCP (`meshcar.io/inbound-tcp-ports`) and the upstreams that are opaque TCP tunnels
(`meshcar.io/tcp-upstreams: NAME=LOCAL_PORT:TARGET_PORT`, NAME one of meshcar.io/upstreams)
become `app.protocol`, `inbound.tcp` and `protocol: tcp` upstreams (docs/PROTOCOLS.md).
The annotation syntax is documented in docs/DEPLOY.md.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import yaml

from meshcar.errors import MeshcarError

PREFIX = "meshcar.io/"
ANN_INJECT = PREFIX + "inject"
ANN_INJECTED = PREFIX + "injected"
ANN_MODE = PREFIX + "sidecar-mode"
ANN_APP_PORT = PREFIX + "app-port"
ANN_INBOUND_PORT = PREFIX + "inbound-port"
ANN_OUTBOUND_PORT = PREFIX + "outbound-port"
ANN_ADMIN_PORT = PREFIX + "admin-port"
ANN_UPSTREAMS = PREFIX + "upstreams"
ANN_ALLOWED_CALLERS = PREFIX + "allowed-callers"
ANN_LOG_LEVEL = PREFIX + "log-level"
ANN_CAPTURE = PREFIX + "capture"
ANN_EGRESS = PREFIX + "egress"
ANN_MATCH = PREFIX + "match"
ANN_APP_PROTOCOL = PREFIX + "app-protocol"
ANN_INBOUND_TCP = PREFIX + "inbound-tcp-ports"
ANN_TCP_UPSTREAMS = PREFIX + "tcp-upstreams"

SIDECAR_NAME = "meshcar-proxy"
INIT_NAME = "meshcar-init"
STATE_VOLUME = "meshcar-state"
TOKEN_VOLUME = "meshcar-token"
TRUST_VOLUME = "meshcar-trust"
STATE_DIR = "/var/run/meshcar/state"
TOKEN_DIR = "/var/run/secrets/meshcar"
TOKEN_PATH = TOKEN_DIR + "/token"
TRUST_DIR = "/var/run/meshcar/trust"
TRUST_CONFIGMAP = "meshcar-ca-bundle"
TRUST_KEY = "ca-bundle.pem"
CONFIG_ENV = "MESHCAR_CONFIG"
NS_ENV = "MESHCAR_POD_NAMESPACE"
SA_ENV = "MESHCAR_POD_SERVICE_ACCOUNT"
SIDECAR_UID = 10001

DEFAULT_INBOUND_PORT = 4143
DEFAULT_OUTBOUND_PORT = 4140
DEFAULT_ADMIN_PORT = 4191

# kind -> path of keys from the object to its PodTemplateSpec ("" = the object itself)
POD_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}

PROXY_ENV_NAMES = ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")
NO_PROXY = "localhost,127.0.0.1,::1"
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SERVICE_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9._]*[A-Za-z0-9])?$")
_SPIFFE_RE = re.compile(r"^spiffe://[a-z0-9.\-_]+(/[A-Za-z0-9.\-_]+)+$")


class InjectError(MeshcarError):
    """An object cannot be injected; the message names the object and the reason."""

    status = 400


class ShapeError(InjectError):
    """A field the injector reads or writes has the wrong type; the message names the object
    and the field's path (`spec.containers[0].env: expected a list, got a mapping`)."""


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    for t, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list, "a list"),
        (dict, "a mapping"),
    ):
        if isinstance(value, t):
            return name
    return f"a {type(value).__name__}"


def _expect(value: Any, kind: type, path: str, where: str, *, required: bool = False) -> None:
    """`value` (None allowed unless `required`) must be a `kind`: dict, list or str."""
    if value is None and not required:
        return
    if not isinstance(value, kind) or (kind is str and isinstance(value, bool)):
        want = "a mapping" if kind is dict else "a list" if kind is list else "a string"
        raise ShapeError(f"{where}: {path}: expected {want}, got {type_name(value)}")


def _check_meta(meta: Any, path: str, where: str) -> None:
    _expect(meta, dict, path, where)
    for key in ("labels", "annotations"):
        values = (meta or {}).get(key)
        _expect(values, dict, f"{path}.{key}", where)
        for k, v in (values or {}).items():
            if isinstance(v, dict | list):
                raise ShapeError(
                    f"{where}: {path}.{key}[{str(k)!r}]: expected a string, got {type_name(v)}"
                )


def check_shapes(obj: dict[str, Any], where: str) -> None:
    """Every field `inject_object` reads or writes has its Kubernetes type, so that a wrong
    type is one clear ShapeError naming the field instead of a traceback or a silently
    wrong result (a string `volumes` is not a list of its characters). Missing fields are
    left to the checks that follow (they have their own messages)."""
    _check_meta(obj.get("metadata"), "metadata", where)
    node: Any = obj
    path = ""
    for key in POD_TEMPLATE_PATHS[obj["kind"]]:
        path = f"{path}.{key}" if path else key
        node = node.get(key)
        _expect(node, dict, path, where)
        if node is None:
            return
    if path:
        _check_meta(node.get("metadata"), path + ".metadata", where)
    spec_path = f"{path}.spec" if path else "spec"
    spec = node.get("spec")
    _expect(spec, dict, spec_path, where)
    if spec is None:
        return
    for key in ("initContainers", "containers", "volumes"):
        items = spec.get(key)
        _expect(items, list, f"{spec_path}.{key}", where)
        for i, item in enumerate(items or []):
            item_path = f"{spec_path}.{key}[{i}]"
            _expect(item, dict, item_path, where, required=True)
            _expect(item.get("name"), str, item_path + ".name", where, required=key != "volumes")
            if key == "volumes":
                continue
            for sub in ("env", "ports"):
                entries = item.get(sub)
                _expect(entries, list, f"{item_path}.{sub}", where)
                for j, entry in enumerate(entries or []):
                    _expect(entry, dict, f"{item_path}.{sub}[{j}]", where, required=True)


@dataclass(frozen=True)
class InjectOptions:
    """Cluster-wide injection settings (CLI flags / webhook flags)."""

    image: str = "meshcar:0.1.0"
    ca_url: str = "https://meshcar-ca.meshcar-system.svc:8600"
    trust_domain: str = "meshcar.demo"
    sidecar_mode: str = "native"  # native | classic (default; the annotation overrides)
    ca_bundle_pem: str | None = None  # inline trust root; None = ConfigMap meshcar-ca-bundle
    token_audience: str = "meshcar-ca"
    token_expiration_seconds: int = 600  # the minimum Kubernetes allows
    image_pull_policy: str = "IfNotPresent"
    capture: str = "proxy"  # proxy (HTTP_PROXY) | transparent (iptables init container)
    egress: str = "allow"  # the sidecar's outbound.egress for hosts outside the mesh

    def __post_init__(self) -> None:
        if self.sidecar_mode not in ("native", "classic"):
            raise InjectError(f"sidecar mode must be native or classic, not {self.sidecar_mode!r}")
        if self.capture not in ("proxy", "transparent"):
            raise InjectError(f"capture must be proxy or transparent, not {self.capture!r}")
        if self.egress not in ("allow", "deny"):
            raise InjectError(f"egress must be allow or deny, not {self.egress!r}")


def object_name(obj: Any) -> str:
    """`kind/name` (with namespace when set) for messages."""
    if not isinstance(obj, dict):
        return "<not an object>"
    raw_meta = obj.get("metadata")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    name = meta.get("name") or meta.get("generateName") or "<unnamed>"
    ns = meta.get("namespace")
    kind = str(obj.get("kind", "<no kind>")).lower()
    return f"{kind}/{name}" + (f" (namespace {ns})" if ns else "")


def is_injectable_kind(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("kind") in POD_TEMPLATE_PATHS


def _pod_template(obj: dict[str, Any], where: str) -> dict[str, Any]:
    node: Any = obj
    for key in POD_TEMPLATE_PATHS[obj["kind"]]:
        if not isinstance(node, dict) or not isinstance(node.get(key), dict):
            raise InjectError(f"{where}: no pod template (missing {key!r})")
        node = node[key]
    if not isinstance(node.get("spec"), dict):
        raise InjectError(f"{where}: no pod spec")
    return node


def pod_template(obj: dict[str, Any]) -> dict[str, Any]:
    """The PodTemplateSpec (or the Pod itself) of an injectable object already checked."""
    return _pod_template(obj, object_name(obj))


def _all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            if isinstance(c, dict):
                out.append(c)
    return out


def is_injected(obj: dict[str, Any]) -> bool:
    """Structural check: a container named meshcar-proxy already exists in the pod spec."""
    if not is_injectable_kind(obj):
        return False
    try:
        tmpl = _pod_template(obj, object_name(obj))
    except InjectError:
        return False
    return any(c.get("name") == SIDECAR_NAME for c in _all_containers(tmpl["spec"]))


def _annotations(obj: dict[str, Any], tmpl: dict[str, Any]) -> dict[str, str]:
    """The pod template's annotations, falling back to the workload's own for missing keys."""
    merged: dict[str, str] = {}
    for meta in (obj.get("metadata"), tmpl.get("metadata")):
        if isinstance(meta, dict) and isinstance(meta.get("annotations"), dict):
            merged.update({str(k): str(v) for k, v in meta["annotations"].items()})
    return merged


def _port(ann: dict[str, str], key: str, default: int | None, where: str) -> int:
    raw = ann.get(key)
    if raw is None:
        if default is None:
            raise InjectError(f"{where}: annotation {key} is required (the app's local HTTP port)")
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise InjectError(f"{where}: annotation {key}: {raw!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise InjectError(f"{where}: annotation {key}: {value} is not in 1..65535")
    return value


def parse_identity(text: str, trust_domain: str) -> str:
    """`spiffe://...` as is, or the shorthand `NS/SA` -> `spiffe://TD/ns/NS/sa/SA`."""
    text = text.strip()
    if text.startswith("spiffe://"):
        if not _SPIFFE_RE.match(text):
            raise ValueError(f"{text!r} is not a valid SPIFFE ID")
        return text
    parts = text.split("/")
    if len(parts) == 2 and all(_NAME_RE.match(p) for p in parts):
        return f"spiffe://{trust_domain}/ns/{parts[0]}/sa/{parts[1]}"
    raise ValueError(f"{text!r} is neither a spiffe:// ID nor NAMESPACE/SERVICEACCOUNT")


def _items(raw: str) -> list[str]:
    return [item for item in re.split(r"[,\s]+", raw.strip()) if item]


def parse_allowed_callers(raw: str, trust_domain: str) -> list[str]:
    """Comma- or whitespace-separated identities (SPIFFE IDs or NS/SA)."""
    out: list[str] = []
    for item in _items(raw):
        ident = parse_identity(item, trust_domain)
        if ident not in out:
            out.append(ident)
    return out


def _parse_hostport(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return text


def parse_upstreams(raw: str, trust_domain: str) -> dict[str, dict[str, Any]]:
    """`NAME=HOST:PORT[;HOST:PORT...]=IDENTITY` entries, separated by commas or whitespace."""
    out: dict[str, dict[str, Any]] = {}
    for item in _items(raw):
        parts = item.split("=", 2)
        if len(parts) != 3:
            raise ValueError(f"{item!r} is not NAME=HOST:PORT[;HOST:PORT...]=IDENTITY")
        name, endpoints, ident = parts
        if not _SERVICE_RE.match(name):
            raise ValueError(f"{item!r}: {name!r} is not a valid service name")
        if name in out:
            raise ValueError(f"upstream {name!r} is given twice")
        eps = [_parse_hostport(e) for e in endpoints.split(";") if e]
        if not eps:
            raise ValueError(f"{item!r}: no endpoints")
        out[name] = {"endpoints": eps, "spiffe_id": parse_identity(ident, trust_domain)}
    return out


@dataclass(frozen=True)
class PodSettings:
    """What the annotations of one pod say."""

    mode: str
    app_port: int | None  # None: outbound-only (no app port annotated or declared)
    inbound_port: int
    outbound_port: int
    admin_port: int
    allowed_callers: tuple[str, ...]
    upstreams: tuple[tuple[str, tuple[str, ...], str], ...]  # (name, endpoints, spiffe id)
    log_level: str | None
    capture: str = "proxy"  # proxy | transparent
    egress: str = "allow"  # allow | deny
    egress_proxy: str | None = None  # HOST:PORT of the HTTP_PROXY the app had
    match: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (upstream, original destinations)
    app_protocol: str = "http1"  # app.protocol: http1 | h2c
    inbound_tcp: tuple[tuple[int, str], ...] = ()  # inbound.tcp: (app port, proxy_protocol)
    tcp_upstreams: tuple[tuple[str, int, int], ...] = ()  # (upstream, local_port, target_port)


def declared_ports(spec: dict[str, Any]) -> list[int]:
    """The TCP containerPorts the app containers (not init containers) declare, in order."""
    out: list[int] = []
    for c in spec.get("containers") or []:
        if not isinstance(c, dict) or c.get("name") == SIDECAR_NAME:
            continue
        for p in c.get("ports") or []:
            port = p.get("containerPort") if isinstance(p, dict) else None
            if p.get("protocol", "TCP") == "TCP" and isinstance(port, int) and port not in out:
                out.append(port)
    return out


def _app_port(ann: dict[str, str], spec: dict[str, Any], where: str) -> int | None:
    """The annotation, else the single declared containerPort, else None (outbound-only)."""
    if ann.get(ANN_APP_PORT, "").strip() == "none":
        return None  # outbound-only, said explicitly
    if ANN_APP_PORT in ann:
        return _port(ann, ANN_APP_PORT, None, where)
    ports = declared_ports(spec)
    if len(ports) > 1:
        listed = ", ".join(map(str, ports))
        raise InjectError(
            f"{where}: the containers declare several ports ({listed}): "
            f"set annotation {ANN_APP_PORT} to the one the mesh should reach"
        )
    return ports[0] if ports else None


def _choice(
    ann: dict[str, str], key: str, default: str, allowed: tuple[str, ...], where: str
) -> str:
    value = ann.get(key, default).strip()
    if value not in allowed:
        raise InjectError(f"{where}: annotation {key}: {value!r} is not {' or '.join(allowed)}")
    return value


def parse_match(raw: str, upstreams: dict[str, Any]) -> dict[str, list[str]]:
    """`NAME=IP:PORT[;IP:PORT...]` entries: the original destinations of an upstream."""
    out: dict[str, list[str]] = {}
    for item in _items(raw):
        name, sep, dests = item.partition("=")
        if not sep or name not in upstreams:
            raise ValueError(f"{item!r} is not UPSTREAM=IP:PORT[;IP:PORT...] of a known upstream")
        out.setdefault(name, []).extend(_parse_hostport(d) for d in dests.split(";") if d)
    return out


def _number(text: str, what: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{what} {text!r} is not a port in 1..65535")
    return int(text)


def parse_inbound_tcp(raw: str) -> list[tuple[int, str]]:
    """`PORT[:proxy-v2]` entries: the app ports that take opaque TCP from the mesh
    (`inbound.tcp`), with a PROXY v2 header first for `:proxy-v2`."""
    out: list[tuple[int, str]] = []
    for item in _items(raw):
        port, sep, flag = item.partition(":")
        if sep and flag != "proxy-v2":
            raise ValueError(f"{item!r} is not PORT or PORT:proxy-v2")
        value = _number(port, "port")
        if value in [p for p, _ in out]:
            raise ValueError(f"port {value} is given twice")
        out.append((value, "v2" if sep else "none"))
    return out


def parse_tcp_upstreams(raw: str, upstreams: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """`NAME=LOCAL_PORT:TARGET_PORT` entries: the upstream NAME (of meshcar.io/upstreams) is
    an opaque TCP tunnel (`protocol: tcp`): the app connects to 127.0.0.1:LOCAL_PORT, the
    peer's sidecar to its app's TARGET_PORT (one of the peer's inbound-tcp-ports)."""
    out: dict[str, tuple[int, int]] = {}
    for item in _items(raw):
        name, sep, ports = item.partition("=")
        local, sep2, target = ports.partition(":")
        if not sep or not sep2:
            raise ValueError(f"{item!r} is not UPSTREAM=LOCAL_PORT:TARGET_PORT")
        if name not in upstreams:
            raise ValueError(f"{item!r}: {name!r} is not an upstream of {ANN_UPSTREAMS}")
        if name in out:
            raise ValueError(f"upstream {name!r} is given twice")
        out[name] = (_number(local, "local port"), _number(target, "target port"))
    return out


def _tcp_settings(
    ann: dict[str, str], ups: dict[str, Any], ports: dict[str, int | None], where: str
) -> tuple[str, list[tuple[int, str]], dict[str, tuple[int, int]]]:
    """app-protocol, inbound-tcp-ports and tcp-upstreams, checked against the pod's ports."""
    protocol = _choice(ann, ANN_APP_PROTOCOL, "http1", ("http1", "h2c"), where)
    try:
        tcp_in = parse_inbound_tcp(ann.get(ANN_INBOUND_TCP, ""))
    except ValueError as exc:
        raise InjectError(f"{where}: annotation {ANN_INBOUND_TCP}: {exc}") from None
    if tcp_in and ports["app"] is None:
        raise InjectError(
            f"{where}: annotation {ANN_INBOUND_TCP} needs an app port: "
            f"set {ANN_APP_PORT} or declare the app's containerPort"
        )
    try:
        tcp_up = parse_tcp_upstreams(ann.get(ANN_TCP_UPSTREAMS, ""), ups)
    except ValueError as exc:
        raise InjectError(f"{where}: annotation {ANN_TCP_UPSTREAMS}: {exc}") from None
    sidecar = {ports[k]: k for k in ("inbound", "outbound", "admin")}
    locals_seen: dict[int, str] = {}
    for name, (local, _) in tcp_up.items():
        clash = sidecar.get(local) or locals_seen.get(local)
        if clash or local == ports["app"]:
            raise InjectError(
                f"{where}: annotation {ANN_TCP_UPSTREAMS}: local port {local} of {name!r} "
                f"is taken ({clash or 'app'})"
            )
        locals_seen[local] = f"upstream {name!r}"
    for port, _ in tcp_in:
        if port in sidecar:
            raise InjectError(
                f"{where}: annotation {ANN_INBOUND_TCP}: port {port} is the sidecar's "
                f"{sidecar[port]} port"
            )
    return protocol, tcp_in, tcp_up


def _match(
    ann: dict[str, str], ups: dict[str, Any], where: str, tcp: frozenset[str] = frozenset()
) -> dict[str, list[str]]:
    """Original destinations per upstream: its IP-literal endpoints plus meshcar.io/match.
    Opaque TCP upstreams (`tcp`) have none: the app dials their local port."""
    try:
        extra = parse_match(ann.get(ANN_MATCH, ""), ups)
    except ValueError as exc:
        raise InjectError(f"{where}: annotation {ANN_MATCH}: {exc}") from None
    if both := sorted(tcp & extra.keys()):
        raise InjectError(
            f"{where}: annotation {ANN_MATCH}: {both[0]!r} is a tcp upstream "
            f"({ANN_TCP_UPSTREAMS}); transparent capture is for http upstreams only"
        )
    out: dict[str, list[str]] = {}
    for name, u in ups.items():
        if name in tcp:
            continue
        ips = [e for e in u["endpoints"] if _is_ip(e.rpartition(":")[0])]
        out[name] = list(dict.fromkeys(ips + extra.get(name, [])))
    return out


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _callers(
    ann: dict[str, str], options: InjectOptions, app_port: int | None, where: str
) -> list[str]:
    """meshcar.io/allowed-callers, which needs an app port."""
    try:
        callers = parse_allowed_callers(ann.get(ANN_ALLOWED_CALLERS, ""), options.trust_domain)
    except ValueError as exc:
        raise InjectError(f"{where}: annotation {ANN_ALLOWED_CALLERS}: {exc}") from None
    if callers and app_port is None:
        raise InjectError(
            f"{where}: annotation {ANN_ALLOWED_CALLERS} needs an app port: "
            f"set {ANN_APP_PORT} or declare the app's containerPort"
        )
    return callers


def pod_settings(
    ann: dict[str, str], options: InjectOptions, where: str, spec: dict[str, Any] | None = None
) -> PodSettings:
    """Validate the meshcar.io/* annotations of one pod (and, without an app-port annotation,
    read the port its containers declare); every problem is an InjectError."""
    mode = _choice(ann, ANN_MODE, options.sidecar_mode, ("native", "classic"), where)
    capture = _choice(ann, ANN_CAPTURE, options.capture, ("proxy", "transparent"), where)
    egress = _choice(ann, ANN_EGRESS, options.egress, ("allow", "deny"), where)
    app_port = _app_port(ann, spec or {}, where)
    inbound = _port(ann, ANN_INBOUND_PORT, DEFAULT_INBOUND_PORT, where)
    outbound = _port(ann, ANN_OUTBOUND_PORT, DEFAULT_OUTBOUND_PORT, where)
    admin = _port(ann, ANN_ADMIN_PORT, DEFAULT_ADMIN_PORT, where)
    ports = {"app": app_port, "inbound": inbound, "outbound": outbound, "admin": admin}
    if len(set(ports.values())) != len(ports):
        raise InjectError(f"{where}: ports must differ, got {ports}")
    callers = _callers(ann, options, app_port, where)
    try:
        ups = parse_upstreams(ann.get(ANN_UPSTREAMS, ""), options.trust_domain)
    except ValueError as exc:
        raise InjectError(f"{where}: annotation {ANN_UPSTREAMS}: {exc}") from None
    level = ann.get(ANN_LOG_LEVEL)
    if level is not None and level not in ("debug", "info", "warning", "error"):
        raise InjectError(f"{where}: annotation {ANN_LOG_LEVEL}: {level!r} is not a log level")
    app_protocol, tcp_in, tcp_up = _tcp_settings(ann, ups, ports, where)
    match = _match(ann, ups, where, frozenset(tcp_up)) if capture == "transparent" else {}
    return PodSettings(
        mode=mode,
        app_port=app_port,
        inbound_port=inbound,
        outbound_port=outbound,
        admin_port=admin,
        allowed_callers=tuple(callers),
        upstreams=tuple((n, tuple(u["endpoints"]), u["spiffe_id"]) for n, u in ups.items()),
        log_level=level,
        capture=capture,
        egress=egress,
        egress_proxy=_egress_proxy(spec or {}, where, outbound) if capture == "proxy" else None,
        match=tuple((n, tuple(m)) for n, m in match.items()),
        app_protocol=app_protocol,
        inbound_tcp=tuple(tcp_in),
        tcp_upstreams=tuple((n, lp, tp) for n, (lp, tp) in tcp_up.items()),
    )


def render_config(settings: PodSettings, options: InjectOptions) -> str:
    """The sidecar's YAML configuration (docs/CONFIG.md) with the pod identity as $(VARS)."""
    identity: dict[str, Any] = {
        "spiffe_id": f"spiffe://{options.trust_domain}/ns/$({NS_ENV})/sa/$({SA_ENV})",
        "ca_url": options.ca_url,
    }
    if options.ca_bundle_pem is not None:
        identity["ca_bundle_pem"] = options.ca_bundle_pem
    else:
        identity["ca_bundle"] = f"{TRUST_DIR}/{TRUST_KEY}"
    identity["k8s_token_file"] = TOKEN_PATH
    identity["state_dir"] = STATE_DIR
    listen_key = "transparent_listen" if settings.capture == "transparent" else "listen"
    outbound: dict[str, Any] = {
        listen_key: f"127.0.0.1:{settings.outbound_port}",
        "upstreams": _render_upstreams(settings),
        "egress": settings.egress,
    }
    if settings.egress_proxy and settings.egress == "allow":
        outbound["egress_proxy"] = settings.egress_proxy
    config: dict[str, Any] = {
        "identity": identity,
        **_render_app_inbound(settings),
        "outbound": outbound,
        "admin": {"listen": f"0.0.0.0:{settings.admin_port}"},
    }
    if settings.log_level:
        config["log_level"] = settings.log_level
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def _render_upstreams(settings: PodSettings) -> dict[str, Any]:
    """`outbound.upstreams`: http upstreams (with `match` in transparent capture) and
    `protocol: tcp` ones (meshcar.io/tcp-upstreams)."""
    matches = dict(settings.match)
    tcp = {name: (local, target) for name, local, target in settings.tcp_upstreams}
    upstreams: dict[str, Any] = {}
    for name, eps, sid in settings.upstreams:
        upstreams[name] = {"endpoints": list(eps), "spiffe_id": sid}
        if name in tcp:
            upstreams[name] = {"protocol": "tcp", **upstreams[name]}
            upstreams[name]["local_port"], upstreams[name]["target_port"] = tcp[name]
        if matches.get(name):
            upstreams[name]["match"] = list(matches[name])
    return upstreams


def _render_app_inbound(settings: PodSettings) -> dict[str, Any]:
    """The `app` and `inbound` sections (with `app.protocol` and `inbound.tcp` when set)."""
    # outbound-only: the sidecar config still has an app and an inbound, but the inbound
    # listens on loopback and allows no caller, so nothing reaches the (unused) app port
    in_host = "0.0.0.0" if settings.app_port is not None else "127.0.0.1"
    app: dict[str, Any] = {"host": "127.0.0.1", "port": settings.app_port or settings.inbound_port}
    if settings.app_protocol != "http1":
        app["protocol"] = settings.app_protocol
    inbound: dict[str, Any] = {
        "listen": f"{in_host}:{settings.inbound_port}",
        "allow": list(settings.allowed_callers),
    }
    if settings.inbound_tcp:
        inbound["tcp"] = [
            {"port": port, **({"proxy_protocol": pp} if pp != "none" else {})}
            for port, pp in settings.inbound_tcp
        ]
    return {"app": app, "inbound": inbound}


def _probe(path: str, port: int, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": 1,
        "failureThreshold": failures,
    }


def sidecar_container(settings: PodSettings, options: InjectOptions) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "command": ["meshcar", "sidecar", "--config-env", CONFIG_ENV],
        "env": [
            {"name": NS_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": SA_ENV, "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {"name": CONFIG_ENV, "value": render_config(settings, options)},
        ],
        "ports": [
            {"name": "meshcar-inbound", "containerPort": settings.inbound_port, "protocol": "TCP"},
            {"name": "meshcar-admin", "containerPort": settings.admin_port, "protocol": "TCP"},
        ],
        "startupProbe": _probe("/ready", settings.admin_port, 1, 120),
        "readinessProbe": _probe("/ready", settings.admin_port, 5, 3),
        "livenessProbe": _probe("/live", settings.admin_port, 10, 3),
        "resources": {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"memory": "128Mi"},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": STATE_VOLUME, "mountPath": STATE_DIR},
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
        ],
    }
    if options.ca_bundle_pem is None:
        container["volumeMounts"].append(
            {"name": TRUST_VOLUME, "mountPath": TRUST_DIR, "readOnly": True}
        )
    if settings.mode == "native":
        container["restartPolicy"] = "Always"
    return container


def sidecar_volumes(options: InjectOptions) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": STATE_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        {
            "name": TOKEN_VOLUME,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": options.token_audience,
                            "expirationSeconds": options.token_expiration_seconds,
                            "path": "token",
                        }
                    }
                ]
            },
        },
    ]
    if options.ca_bundle_pem is None:
        volumes.append(
            {
                "name": TRUST_VOLUME,
                "configMap": {
                    "name": TRUST_CONFIGMAP,
                    "items": [{"key": TRUST_KEY, "path": TRUST_KEY}],
                },
            }
        )
    return volumes


def _proxy_env(settings: PodSettings, env: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The proxy variables for one container: HTTP_PROXY is the sidecar; NO_PROXY keeps
    the entries the container had (either case) and adds localhost."""
    proxy = f"http://127.0.0.1:{settings.outbound_port}"
    entries: list[str] = []
    for e in env:
        if e.get("name") in ("NO_PROXY", "no_proxy"):
            entries.extend(x.strip() for x in str(e.get("value") or "").split(",") if x.strip())
    entries.extend(NO_PROXY.split(","))
    no_proxy = ",".join(dict.fromkeys(entries))
    return [
        {"name": "HTTP_PROXY", "value": proxy},
        {"name": "http_proxy", "value": proxy},
        {"name": "NO_PROXY", "value": no_proxy},
        {"name": "no_proxy", "value": no_proxy},
    ]


def _egress_proxy(spec: dict[str, Any], where: str, outbound_port: int) -> str | None:
    """HOST:PORT of the HTTP_PROXY the app containers already set (the same in all), which
    the sidecar then uses for hosts outside the mesh; InjectError when it cannot be merged
    (taken from a ConfigMap or Secret, not http://, or different in two containers)."""
    found = _http_proxies(spec, where)
    found.discard(f"http://127.0.0.1:{outbound_port}")
    if not found:
        return None
    if len(found) > 1:
        raise InjectError(
            f"{where}: the containers set different HTTP_PROXY values {sorted(found)}"
        )
    return _proxy_hostport(found.pop(), where)


def _http_proxies(spec: dict[str, Any], where: str) -> set[str]:
    """The HTTP_PROXY/http_proxy values of the app containers; InjectError for a valueFrom
    of any proxy variable (its value is not in the manifest)."""
    found: set[str] = set()
    for c in spec.get("containers") or []:
        for e in c.get("env") or []:
            name = e.get("name")
            if name in PROXY_ENV_NAMES and "valueFrom" in e:
                raise InjectError(
                    f"{where}: container {c.get('name')!r} takes {name} from valueFrom; "
                    "meshcar cannot merge it (set it as a value)"
                )
            value = str(e.get("value") or "").strip()
            if name in ("HTTP_PROXY", "http_proxy") and value:
                found.add(value)
    return found


def _proxy_hostport(url: str, where: str) -> str:
    """HOST:PORT of an http:// proxy URL (port 80 by default)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "http", url
    hostport = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    if ":" not in hostport:
        hostport += ":80"
    try:
        _parse_hostport(hostport)
    except ValueError:
        scheme = "bad"
    if scheme.lower() != "http":
        raise InjectError(
            f"{where}: HTTP_PROXY {url!r}: only an http://HOST:PORT proxy can be merged"
        )
    return hostport


def init_container(settings: PodSettings, options: InjectOptions) -> dict[str, Any]:
    """Transparent capture: installs the pod's iptables rules, then exits. The only
    container with NET_ADMIN (and NET_RAW, which iptables needs); it runs as root so it
    can, and nothing else does. Outbound capture only: peers are dialed at their mesh
    port, and the app port stays reachable for the kubelet's probes."""
    command = [
        "meshcar",
        "init-iptables",
        "--proxy-uid",
        str(SIDECAR_UID),
        "--redirect-port",
        str(settings.outbound_port),
    ]
    return {
        "name": INIT_NAME,
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "command": command,
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"memory": "64Mi"},
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            # iptables-legacy takes its lock in /run/xtables.lock (istio-init does the same)
            "readOnlyRootFilesystem": False,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def _check_pod_spec(spec: dict[str, Any], settings: PodSettings, where: str) -> None:
    if spec.get("hostNetwork"):
        raise InjectError(
            f"{where}: hostNetwork pods cannot be injected (the sidecar's ports would be the node's)"
        )
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise InjectError(f"{where}: the pod has no containers")
    taken = {settings.inbound_port, settings.admin_port, settings.outbound_port}
    for c in _all_containers(spec):
        for p in c.get("ports") or []:
            if isinstance(p, dict) and p.get("containerPort") in taken:
                raise InjectError(
                    f"{where}: container {c.get('name')!r} uses port {p['containerPort']}, "
                    "which the sidecar needs (set meshcar.io/inbound-port, -outbound-port, -admin-port)"
                )
    for key in ("volumes",):
        for v in spec.get(key) or []:
            if isinstance(v, dict) and v.get("name") in (STATE_VOLUME, TOKEN_VOLUME, TRUST_VOLUME):
                raise InjectError(f"{where}: volume name {v['name']!r} is reserved for meshcar")
    _check_transparent(spec, settings, where)


def _check_transparent(spec: dict[str, Any], settings: PodSettings, where: str) -> None:
    """Transparent capture: the init container's name is free, and every upstream has an
    original destination to be captured at (else its calls would leave as egress)."""
    if settings.capture != "transparent":
        return
    if any(c.get("name") == INIT_NAME for c in _all_containers(spec)):
        raise InjectError(f"{where}: container name {INIT_NAME!r} is reserved for meshcar")
    matched = {name for name, dests in settings.match if dests}
    matched |= {name for name, _, _ in settings.tcp_upstreams}  # dialed at their local port
    for name, _, _ in settings.upstreams:
        if name not in matched:
            raise InjectError(
                f"{where}: upstream {name!r} has no IP:PORT to capture: add it to annotation "
                f"{ANN_MATCH} ({name}=CLUSTER_IP:PORT) or give an IP endpoint"
            )


def inject_object(obj: Any, options: InjectOptions) -> Any:
    """Return the object with the sidecar injected, or unchanged (other kinds, opted out,
    already injected). Never mutates its argument."""
    if not is_injectable_kind(obj):
        return obj
    where = object_name(obj)
    check_shapes(obj, where)
    if is_injected(obj):
        return obj
    tmpl = _pod_template(obj, where)
    ann = _annotations(obj, tmpl)
    if not _injection_enabled(ann, tmpl, where):
        return obj
    settings = pod_settings(ann, options, where, tmpl["spec"])
    _check_pod_spec(tmpl["spec"], settings, where)
    return _patched(obj, settings, options, where)


def _injection_enabled(ann: dict, tmpl: dict, where: str) -> bool:
    """Whether the pod asks for the sidecar (the default) or opts out with `disabled`."""
    inject = ann.get(ANN_INJECT, "enabled").strip()
    labels = (tmpl.get("metadata") or {}).get("labels") or {}
    if inject == "disabled" or labels.get(ANN_INJECT) == "disabled":
        return False
    if inject != "enabled":
        raise InjectError(
            f"{where}: annotation {ANN_INJECT}: {inject!r} is not enabled or disabled"
        )
    return True


def _patched(obj: Any, settings: PodSettings, options: InjectOptions, where: str) -> Any:
    """A copy of the checked object with the sidecar, its volumes and the proxy env added."""
    out = copy.deepcopy(obj)
    tmpl = _pod_template(out, where)
    spec = tmpl["spec"]
    meta = tmpl["metadata"] = tmpl.get("metadata") or {}  # `metadata: null` as none at all
    annotations = meta["annotations"] = meta.get("annotations") or {}
    annotations[ANN_INJECTED] = "true"
    annotations[ANN_MODE] = settings.mode

    annotations[ANN_CAPTURE] = settings.capture
    # the port the sidecar reaches (inferred or annotated), "none" for outbound-only
    annotations[ANN_APP_PORT] = "none" if settings.app_port is None else str(settings.app_port)

    if settings.capture == "proxy":
        for c in spec["containers"]:
            old = c.get("env") or []
            env = [e for e in old if e.get("name") not in PROXY_ENV_NAMES]
            c["env"] = env + _proxy_env(settings, old)

    sidecar = sidecar_container(settings, options)
    inits = list(spec.get("initContainers") or [])
    init = [init_container(settings, options)] if settings.capture == "transparent" else []
    if settings.mode == "native":
        # the rules first, then the sidecar, then the pod's own init containers (captured)
        spec["initContainers"] = init + [sidecar] + inits
    else:
        annotations.setdefault(
            "kubectl.kubernetes.io/default-container", spec["containers"][0]["name"]
        )
        spec["containers"] = [sidecar] + list(spec["containers"])
        if init:  # no sidecar runs during a classic pod's init containers: capture after them
            spec["initContainers"] = inits + init
    spec["volumes"] = list(spec.get("volumes") or []) + sidecar_volumes(options)
    return out


def inject_document(doc: Any, options: InjectOptions) -> Any:
    """Inject one YAML document: a workload, a `kind: List` (items injected), or anything else."""
    if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
        out = dict(doc)
        out["items"] = [inject_object(item, options) for item in doc["items"]]
        return out
    return inject_object(doc, options)
