"""Configuration pieces the roles share: the checker that collects every problem with its
file and key, HOST:PORT values, the `identity:` and `http:` sections (sidecar and edge alike).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshcar.admin.paths import MAY_BE_PUBLIC, PUBLIC_PATHS, parse_public_paths
from meshcar.common.accesslog import REQUEST_FIELDS
from meshcar.common.schema import (
    BOOL,
    HOSTPORT,
    SPIFFE_ID,
    STRING,
    WORKERS,
    ListOf,
    Section,
    key,
    number,
    one_of,
)
from meshcar.errors import ConfigError, IdentityError
from meshcar.identity.spiffe import SpiffeId
from meshcar.net.forward import Timeouts
from meshcar.net.limits import TIMEOUT_KEYS, Limits
from meshcar.net.workers import MAX_WORKERS, cpu_count
from meshcar.proto.http1 import MAX_HEAD_BYTES, UNDERSCORE_ACTIONS, HeaderPolicy
from meshcar.proto.path import ESCAPED_SLASH_ACTIONS, PathOptions


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class VaultIdentity:
    """Issue directly from Vault/OpenBao PKI (`identity.vault`), instead of the CA API."""

    addrs: tuple[str, ...]  # one node, or the nodes of one HA cluster (tried in turn)
    role: str
    mount: str = "pki_int"
    token_file: Path | None = None
    approle_role_id_file: Path | None = None
    approle_secret_id_file: Path | None = None
    ca_cert: Path | None = None
    connect_timeout_seconds: float = 2.0
    timeout_seconds: float = 10.0


@dataclass(frozen=True)
class IdentityConfig:
    spiffe_id: str
    ca_url: str | None  # the CA API (None when identity.vault is used)
    ca_bundle: Path | None  # file with the root(s) of the CA API's certificate ...
    token_file: Path | None
    state_dir: Path
    ttl_seconds: int | None = None
    renew_fraction: float = 2 / 3
    bundle_refresh_seconds: float = 300.0
    ca_bundle_pem: str | None = field(default=None, repr=False)  # ... or the PEM inline
    k8s_token_file: Path | None = None  # projected service-account token (Kubernetes)
    vault: VaultIdentity | None = None


@dataclass(frozen=True)
class HttpPolicy:
    """The `http:` section (sidecar and edge alike): request-target normalisation and the
    request header policy applied by every HTTP listener."""

    path: PathOptions = PathOptions()
    headers: HeaderPolicy = HeaderPolicy()


_URL = {"type": "string", "pattern": "^https?://"}
_HEADERS = HeaderPolicy()

# The shared sections' keys (meshcar/common/schema.py): the checkers below take their allowed
# keys from these, and `meshcar config schema` renders them.
VAULT = Section(
    "Issue directly from Vault/OpenBao PKI instead of the CA API",
    {
        "addr": key(
            {"anyOf": [_URL, {"type": "array", "items": _URL, "minItems": 1}]},
            "Vault URL, or the URLs of every node of one HA cluster",
            required=True,
        ),
        "role": key(STRING, "PKI role that signs this identity", required=True),
        "mount": key({"type": "string"}, "PKI mount", "pki_int"),
        "token_file": key(STRING, "Vault token file (development; instead of the AppRole)"),
        "approle_role_id_file": key(STRING, "AppRole role_id file"),
        "approle_secret_id_file": key(STRING, "AppRole secret_id file"),
        "ca_cert": key(STRING, "CA certificate(s) to verify Vault's TLS certificate"),
        "connect_timeout_seconds": key(number(0.1, 300), "connect timeout per node", 2.0),
        "timeout_seconds": key(number(1, 300), "answer timeout once connected", 10.0),
    },
)
IDENTITY = Section(
    "The workload's SPIFFE identity and where its certificate comes from",
    {
        "spiffe_id": key(SPIFFE_ID, "the identity this process holds", required=True),
        "ca_url": key(
            {"type": "string", "pattern": "^https://"}, "the CA API (required unless vault)"
        ),
        "ca_bundle": key(STRING, "file with the root the CA API's certificate chains to"),
        "ca_bundle_pem": key(
            {"type": "string", "pattern": "-----BEGIN CERTIFICATE-----"},
            "that root as inline PEM (instead of ca_bundle)",
        ),
        "token_file": key(STRING, "join token file, used once at bootstrap"),
        "k8s_token_file": key(STRING, "projected service-account token (instead of token_file)"),
        "state_dir": key(STRING, "directory for the key and certificate", required=True),
        "ttl_seconds": key(number(10, integer=True), "requested certificate lifetime"),
        "renew_fraction": key(number(0.1, 0.9), "renew at this fraction of the lifetime", 2 / 3),
        "bundle_refresh_seconds": key(
            number(1), "how often the trust bundle is fetched again", 300
        ),
        "vault": key(VAULT, "issue from Vault/OpenBao PKI (then no ca_url/ca_bundle/token_file)"),
    },
)
HTTP_PATH = Section(
    "Request-target normalisation",
    {
        "merge_slashes": key(BOOL, "merge duplicate slashes", True),
        "escaped_slashes": key(one_of(*ESCAPED_SLASH_ACTIONS), "%2F and %5C in a path", "reject"),
    },
)
HTTP_HEADERS = Section(
    "Request header policy",
    {
        "underscores": key(one_of(*UNDERSCORE_ACTIONS), "header names with _", "reject"),
        "max_count": key(
            number(1, 1000, integer=True), "header lines per request (431 past)", _HEADERS.max_count
        ),
        "max_value_bytes": key(
            number(1, MAX_HEAD_BYTES, integer=True),
            "bytes per header value (431 past)",
            _HEADERS.max_value_bytes,
        ),
    },
)
HTTP = Section(
    "Request-target normalisation and request header policy of every HTTP listener",
    {
        "path": key(HTTP_PATH, "request-target normalisation"),
        "headers": key(HTTP_HEADERS, "request header policy"),
    },
)
ADMIN = Section(
    "The admin listener (/live /ready /metrics /certs ...)",
    {
        "listen": key(HOSTPORT, "HOST:PORT of the admin listener", required=True),
        "public_paths": key(
            ListOf(one_of(*sorted(p.decode() for p in MAY_BE_PUBLIC))),
            "paths served off loopback",
            sorted(p.decode() for p in PUBLIC_PATHS),
        ),
    },
)
RELOAD = Section(
    "Hot reload (common/reload.py): SIGHUP always reloads; this adds a file watch",
    {
        "watch_seconds": key(
            number(0, 3600),
            "poll the config file (and the edge's certificate files) every N s by mtime, "
            "size and inode, reloading on a change; 0: off (SIGHUP only)",
            0,
        ),
    },
)
ACCESS_LOG = Section(
    "The access log: one JSON line per request on stdout (docs/OPERATIONS.md)",
    {
        "fields": key(
            ListOf(one_of(*REQUEST_FIELDS), min_items=1),
            "the fields of a request line (ts and type are always there); default: all",
        ),
    },
)
_TIMEOUT_DEFAULTS = Timeouts()
TIMEOUTS = Section(
    "Progress timeouts in seconds (net/forward.py)",
    {
        k: key(
            number(0.1, 86400),
            f"progress timeout ({field_name})",
            getattr(_TIMEOUT_DEFAULTS, field_name),
        )
        for k, field_name in TIMEOUT_KEYS.items()
    },
)
LIMITS = Section(
    "Connection limits (net/limits.py)",
    {
        "max_connections": key(
            number(1, 1_000_000, integer=True),
            "open connections per listener",
            Limits().max_connections,
        ),
        "max_upstream_connections": key(
            number(1, 1_000_000, integer=True),
            "open connections per upstream",
            Limits().max_upstream_connections,
        ),
    },
)
WORKERS_KEY = key(
    WORKERS,
    "worker processes, each accepting on the traffic listeners (SO_REUSEPORT); auto: one "
    "per CPU; worker 0 serves the admin listener and renews the certificate",
    1,
)
DRAIN_SECONDS = key(number(0, 3600), "on SIGTERM: how long requests in flight may finish", 10)
LOG_LEVEL = key(
    one_of("debug", "info", "warning", "error"),
    "debug and info also log one JSON line per request (access log); warning and "
    "error turn the access log off",
    "info",
)


class Checker:
    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir
        self.problems: list[str] = []

    def bad(self, key: str, msg: str) -> None:
        self.problems.append(f"{self.source}: {key}: {msg}")

    def section(self, data: dict, key: str, required: bool = True) -> dict:
        val = data.get(key)
        if val is None:
            if required:
                self.bad(key, "missing section")
            return {}
        if not isinstance(val, dict):
            self.bad(key, "must be a mapping")
            return {}
        return val

    def unknown(self, data: dict, prefix: str, allowed: Section | set[str]) -> None:
        """Every key of `data` not in `allowed` (a section of the declarative description,
        meshcar/common/schema.py) is a problem."""
        if isinstance(allowed, Section):
            allowed = allowed.names()
        for k in data:
            if k not in allowed:
                self.bad(
                    f"{prefix}{k}", f"unknown key (expected one of: {', '.join(sorted(allowed))})"
                )

    def string(self, data: dict, key: str, path: str, required: bool = True) -> str | None:
        val = data.get(key)
        if val is None:
            if required:
                self.bad(path, "missing")
            return None
        if not isinstance(val, str) or not val:
            self.bad(path, "must be a non-empty string")
            return None
        return val

    def path(self, data: dict, key: str, path: str, required: bool = True) -> Path | None:
        s = self.string(data, key, path, required)
        if s is None:
            return None
        p = Path(s)
        return p if p.is_absolute() else self.base_dir / p

    def spiffe(self, val: Any, path: str) -> str | None:
        if not isinstance(val, str):
            self.bad(path, "must be a SPIFFE ID string")
            return None
        try:
            return str(SpiffeId.parse(val))
        except IdentityError as exc:
            self.bad(path, str(exc))
            return None

    def port(self, val: Any, path: str) -> int | None:
        if isinstance(val, bool) or not isinstance(val, int) or not (1 <= val <= 65535):
            self.bad(path, f"must be a port number 1-65535, got {val!r}")
            return None
        return val

    def hostports(self, val: Any, path: str, *, required: bool) -> list[HostPort]:
        """A list of HOST:PORT (non-empty if `required`); each bad entry reported."""
        if not isinstance(val, list) or (required and not val):
            self.bad(path, f"must be a {'non-empty ' if required else ''}list of HOST:PORT")
            return []
        out = []
        for i, e in enumerate(val):
            hp = self.hostport(e, f"{path}[{i}]")
            if hp:
                out.append(hp)
        return out

    def hostport(self, val: Any, path: str, loopback_only: bool = False) -> HostPort | None:
        if not isinstance(val, str) or ":" not in val:
            self.bad(path, f"must be HOST:PORT, got {val!r}")
            return None
        host, _, port_s = val.rpartition(":")
        host = host.strip("[]")
        if not host:
            self.bad(path, f"must be HOST:PORT, got {val!r}")
            return None
        try:
            port = int(port_s)
        except ValueError:
            self.bad(path, f"port must be a number, got {port_s!r}")
            return None
        if self.port(port, path) is None:
            return None
        if loopback_only:
            try:
                if not ipaddress.ip_address(host).is_loopback:
                    self.bad(path, f"must listen on loopback (the app's side), got {host}")
                    return None
            except ValueError:
                if host != "localhost":
                    self.bad(path, f"must be a loopback IP address, got {host!r}")
                    return None
        return HostPort(host, port)


def _identity_ca(c: Checker, data: dict, ident: dict) -> tuple[str | None, Path | None, str | None]:
    """ca_url, ca_bundle and ca_bundle_pem (the built-in CA; unused with vault)."""
    with_ca = "identity" in data and "vault" not in ident
    ca_url = c.string(ident, "ca_url", "identity.ca_url") if with_ca else None
    if ca_url and not ca_url.startswith("https://"):
        c.bad("identity.ca_url", "must be an https:// URL")
    has_pem = ident.get("ca_bundle_pem") is not None
    ca_bundle = (
        c.path(ident, "ca_bundle", "identity.ca_bundle", required=not has_pem) if with_ca else None
    )
    ca_bundle_pem = c.string(ident, "ca_bundle_pem", "identity.ca_bundle_pem", required=False)
    if ca_bundle_pem is not None and "-----BEGIN CERTIFICATE-----" not in ca_bundle_pem:
        c.bad("identity.ca_bundle_pem", "must contain a PEM certificate")
    if ca_bundle is not None and ca_bundle_pem is not None:
        c.bad("identity.ca_bundle", "give either ca_bundle or ca_bundle_pem, not both")
    return ca_url, ca_bundle, ca_bundle_pem


def _identity_tokens(c: Checker, data: dict, ident: dict) -> tuple[Path | None, Path | None]:
    token_file = (
        c.path(ident, "token_file", "identity.token_file", required=False)
        if "identity" in data
        else None
    )
    k8s_token_file = c.path(ident, "k8s_token_file", "identity.k8s_token_file", required=False)
    if token_file is not None and k8s_token_file is not None:
        c.bad("identity.token_file", "give either token_file or k8s_token_file, not both")
    return token_file, k8s_token_file


def _identity_timing(c: Checker, ident: dict) -> tuple[int | None, float, float]:
    """ttl_seconds, renew_fraction, bundle_refresh_seconds."""
    ttl = ident.get("ttl_seconds")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 10):
        c.bad("identity.ttl_seconds", "must be an integer >= 10")
        ttl = None
    frac = ident.get("renew_fraction", 2 / 3)
    if isinstance(frac, bool) or not isinstance(frac, int | float) or not (0.1 <= frac <= 0.9):
        c.bad("identity.renew_fraction", "must be a number between 0.1 and 0.9")
        frac = 2 / 3
    refresh = ident.get("bundle_refresh_seconds", 300)
    if isinstance(refresh, bool) or not isinstance(refresh, int | float) or refresh < 1:
        c.bad("identity.bundle_refresh_seconds", "must be a number of seconds >= 1")
        refresh = 300
    return ttl, float(frac), float(refresh)


def parse_identity(c: Checker, data: dict) -> IdentityConfig | None:
    """The `identity:` section (shared by the sidecar and the edge); problems go to `c`."""
    ident = c.section(data, "identity")
    c.unknown(ident, "identity.", IDENTITY)
    sid = c.spiffe(ident.get("spiffe_id"), "identity.spiffe_id") if "identity" in data else None
    vault = _vault(c, ident.get("vault")) if ident.get("vault") is not None else None
    if vault is not None:
        for k in ("ca_url", "ca_bundle", "ca_bundle_pem", "token_file", "k8s_token_file"):
            if ident.get(k) is not None:
                c.bad(
                    f"identity.{k}",
                    "not used with identity.vault (Vault authenticates the workload)",
                )
    ca_url, ca_bundle, ca_bundle_pem = _identity_ca(c, data, ident)
    token_file, k8s_token_file = _identity_tokens(c, data, ident)
    state_dir = c.path(ident, "state_dir", "identity.state_dir") if "identity" in data else None
    ttl, frac, refresh = _identity_timing(c, ident)
    if not (sid and state_dir):
        return None
    if vault is None and (not ca_url or (ca_bundle is None and ca_bundle_pem is None)):
        return None
    return IdentityConfig(
        sid,
        ca_url,
        ca_bundle,
        token_file,
        state_dir,
        ttl,
        frac,
        refresh,
        ca_bundle_pem,
        k8s_token_file,
        vault,
    )


def parse_http(c: Checker, raw: Any) -> HttpPolicy:
    """The `http:` section (shared by the sidecar and the edge); problems go to `c`."""
    if raw is None:
        return HttpPolicy()
    if not isinstance(raw, dict):
        c.bad("http", "must be a mapping {path: {...}, headers: {...}}")
        return HttpPolicy()
    c.unknown(raw, "http.", HTTP)
    path = c.section(raw, "path", required=False)
    c.unknown(path, "http.path.", HTTP_PATH)
    merge = path.get("merge_slashes", True)
    if not isinstance(merge, bool):
        c.bad("http.path.merge_slashes", "must be true or false")
        merge = True
    slashes = path.get("escaped_slashes", "reject")
    if slashes not in ESCAPED_SLASH_ACTIONS:
        c.bad("http.path.escaped_slashes", f"must be one of {', '.join(ESCAPED_SLASH_ACTIONS)}")
        slashes = "reject"
    hdrs = c.section(raw, "headers", required=False)
    c.unknown(hdrs, "http.headers.", HTTP_HEADERS)
    under = hdrs.get("underscores", "reject")
    if under not in UNDERSCORE_ACTIONS:
        c.bad("http.headers.underscores", f"must be one of {', '.join(UNDERSCORE_ACTIONS)}")
        under = "reject"
    default = HeaderPolicy()
    limits = {}
    for opt, top in (("max_count", 1000), ("max_value_bytes", MAX_HEAD_BYTES)):
        val = hdrs.get(opt, getattr(default, opt))
        if isinstance(val, bool) or not isinstance(val, int) or not (1 <= val <= top):
            c.bad(f"http.headers.{opt}", f"must be an integer between 1 and {top}")
            val = getattr(default, opt)
        limits[opt] = val
    return HttpPolicy(PathOptions(merge, slashes), HeaderPolicy(under, **limits))


def _vault_addrs(c: Checker, raw_addr: Any, p: str) -> list[str]:
    addrs: list[str] = []
    if raw_addr is None:
        c.bad(p, "is required")
    elif isinstance(raw_addr, str) or (isinstance(raw_addr, list) and raw_addr):
        for a in [raw_addr] if isinstance(raw_addr, str) else raw_addr:
            if not isinstance(a, str) or not a.startswith(("https://", "http://")):
                c.bad(p, f"must be an http(s):// URL or a list of them (got {a!r})")
            elif a.rstrip("/") in addrs:
                c.bad(p, f"names {a} twice")
            else:
                addrs.append(a.rstrip("/"))
    else:
        c.bad(p, "must be an http(s):// URL or a non-empty list of them (the nodes of one cluster)")
    return addrs


def _vault_timeouts(c: Checker, raw: dict, p: str) -> dict[str, float]:
    timeouts: dict[str, float] = {}
    for opt, default, low in (
        ("connect_timeout_seconds", 2.0, 0.1),
        ("timeout_seconds", 10.0, 1.0),
    ):
        val = raw.get(opt, default)
        if isinstance(val, bool) or not isinstance(val, int | float) or not (low <= val <= 300):
            c.bad(f"{p}.{opt}", f"must be a number of seconds between {low} and 300")
            val = default
        timeouts[opt] = float(val)
    return timeouts


def _vault(c: Checker, raw: Any) -> VaultIdentity | None:
    p = "identity.vault"
    if not isinstance(raw, dict):
        c.bad(
            p,
            "must be a mapping {addr, role, approle_role_id_file + approle_secret_id_file | token_file}",
        )
        return None
    c.unknown(raw, p + ".", VAULT)
    addrs = _vault_addrs(c, raw.get("addr"), p + ".addr")
    timeouts = _vault_timeouts(c, raw, p)
    role = c.string(raw, "role", p + ".role")
    token = c.path(raw, "token_file", p + ".token_file", required=False)
    rid = c.path(raw, "approle_role_id_file", p + ".approle_role_id_file", required=False)
    sec = c.path(raw, "approle_secret_id_file", p + ".approle_secret_id_file", required=False)
    if (token is None) == (rid is None or sec is None) or (token is not None and (rid or sec)):
        c.bad(p, "give either token_file, or both approle_role_id_file and approle_secret_id_file")
    if not (addrs and role):
        return None
    return VaultIdentity(
        tuple(addrs),
        role,
        str(raw.get("mount", "pki_int")),
        token,
        rid,
        sec,
        c.path(raw, "ca_cert", p + ".ca_cert", required=False),
        timeouts["connect_timeout_seconds"],
        timeouts["timeout_seconds"],
    )


def parse_workers(c: Checker, data: dict) -> int:
    """`workers`: a whole number from 1 to MAX_WORKERS, or `auto` (the CPUs we may use)."""
    raw = data.get("workers", 1)
    if raw == "auto":
        return cpu_count()
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_WORKERS:
        c.bad("workers", f"must be a whole number from 1 to {MAX_WORKERS}, or auto (got {raw!r})")
        return 1
    return raw


# -- loading: what every config file goes through before its own sections ----------------------


def load_yaml(path: Path) -> Any:
    """The file at `path` as parsed YAML; ConfigError naming the file if it cannot be read or
    is not YAML."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> Any:
    import yaml  # only while loading (issue 12: memory; it stays in sys.modules, ~1.7 MB)

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: not valid YAML: {exc}"]) from None


def top_level(data: Any, source: str, base_dir: Path | None, allowed: Section) -> Checker:
    """The start of every config parse: the checker for `source` (paths relative to
    `base_dir`, default the current directory), once the top level is a mapping; its keys
    not in `allowed` are problems."""
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping"])
    c = Checker(source, base_dir or Path.cwd())
    c.unknown(data, "", allowed)
    return c


def parse_reload(c: Checker, data: dict) -> float:
    """The `reload:` section: the file watch interval in seconds (0: off, SIGHUP only)."""
    raw = c.section(data, "reload", required=False)
    c.unknown(raw, "reload.", RELOAD)
    watch = raw.get("watch_seconds", 0)
    if isinstance(watch, bool) or not isinstance(watch, int | float) or not 0 <= watch <= 3600:
        c.bad("reload.watch_seconds", f"must be a number of seconds from 0 to 3600 (got {watch!r})")
        return 0.0
    if 0 < watch < 0.1:
        c.bad("reload.watch_seconds", "must be 0 (off) or at least 0.1 s (no busy loop)")
        return 0.0
    return float(watch)


def parse_access_log(c: Checker, data: dict) -> tuple[str, ...] | None:
    """The `access_log:` section: the request line's fields (None: every field)."""
    raw = c.section(data, "access_log", required=False)
    c.unknown(raw, "access_log.", ACCESS_LOG)
    fields = raw.get("fields")
    if fields is None:
        return None
    if not isinstance(fields, list) or not fields:
        c.bad("access_log.fields", "must be a non-empty list of field names")
        return None
    bad = [f for f in fields if f not in REQUEST_FIELDS]
    if bad:
        c.bad("access_log.fields", f"unknown {bad}: the fields are {', '.join(REQUEST_FIELDS)}")
        return None
    return tuple(fields)


def parse_admin(c: Checker, data: dict) -> tuple[HostPort | None, frozenset[bytes] | None]:
    """The `admin:` section: its listener and the paths served without a token (None: the
    default `PUBLIC_PATHS`)."""
    admin = c.section(data, "admin")
    c.unknown(admin, "admin.", ADMIN)
    admin_listen = c.hostport(admin.get("listen"), "admin.listen") if "admin" in data else None
    public_paths, why = parse_public_paths(
        admin.get("public_paths", sorted(p.decode() for p in PUBLIC_PATHS))
    )
    for w in why:
        c.bad("admin.public_paths", w)
    return admin_listen, public_paths
