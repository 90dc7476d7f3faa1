"""`meshcar check FILE`: is this sidecar or edge config ready to run, and is its world?

One line per check, `ok`, `warn` or `FAIL` and a message, in this order:

- `config`: the file parses and passes every config check (`meshcar config validate`);
  warn when `inbound.permissive` is on (plaintext callers accepted);
- `file`: every file the config names (CA bundle, token files, Vault files, the edge's
  certificates, keys and client CAs) exists and is readable;
- `ca` / `vault`: the CA API's `/healthz` (or Vault's `/v1/sys/health`) answers over TLS
  verified by the configured bundle; `clock`: our clock against the CA's `Date` header;
- `bundle`, `chain`, `expiry`: the credential held in `identity.state_dir` (chain.pem,
  key.pem, bundle.pem) chains to its trust bundle, its key matches, and how long it has left
  (warn past its renewal point, FAIL once expired); the edge's route certificates likewise;
- `port`: every listener's address can be bound (one held by the running process itself, as
  its admin `/live` shows, is ok);
- `peer`: an mTLS handshake with the held credential to every endpoint of every upstream (the
  edge: every bridge backend), and the SPIFFE ID it presents is the one the config expects.

Exit status: 0 no check failed (warnings allowed), 1 a check failed, 2 the config is invalid
(only the config check runs then). `--output json` prints
`{"file", "kind", "exit", "checks": [{"check", "status", "message"}]}`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import json
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from meshcar.common.config import HostPort, IdentityConfig
from meshcar.common.files import identity_files, unreadable
from meshcar.configcli import check as config_problems
from meshcar.edge.config import EdgeConfig, load_edge_config
from meshcar.edge.files import route_files
from meshcar.errors import ConfigError, IdentityError
from meshcar.sidecar.config import SidecarConfig, load_config
from meshcar.tls.contexts import mesh_client_context
from meshcar.tls.svid import svid_from_der

OK, WARN, FAIL = "ok", "warn", "FAIL"
SKEW_WARN_SECONDS = 5.0
SKEW_FAIL_SECONDS = 60.0


@dataclass
class Report:
    checks: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, check: str, status: str, message: str) -> None:
        self.checks.append((check, status, message))

    def failed(self) -> bool:
        return any(s == FAIL for _, s, _ in self.checks)


@dataclass
class Options:
    timeout: float = 3.0
    now: dt.datetime | None = None

    def clock(self) -> dt.datetime:
        return self.now or dt.datetime.now(dt.UTC)


# -- files -------------------------------------------------------------------------------------


def referenced_files(cfg: SidecarConfig | EdgeConfig) -> list[tuple[str, Path]]:
    """(config key, path) of every file the config names."""
    files = identity_files(cfg.identity)
    if isinstance(cfg, EdgeConfig):
        files += route_files(cfg)
    return files


def check_files(cfg: SidecarConfig | EdgeConfig, rep: Report) -> None:
    for k, path in referenced_files(cfg):
        why = unreadable(path)
        rep.add("file", FAIL if why else OK, f"{k}: {path} {why or 'readable'}")


# -- the CA or Vault ---------------------------------------------------------------------------


def _ca_context(ident: IdentityConfig) -> ssl.SSLContext:
    if ident.ca_bundle_pem is not None:
        return ssl.create_default_context(cadata=ident.ca_bundle_pem)
    if ident.ca_bundle is not None:
        return ssl.create_default_context(cafile=str(ident.ca_bundle))
    return ssl.create_default_context()


def _get(url: str, ctx: ssl.SSLContext, timeout: float) -> tuple[int, str | None]:
    """(status, Date header) of a GET over HTTPS (or HTTP)."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn: http.client.HTTPConnection
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(u.hostname or "", u.port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=timeout)
    try:
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        conn.request("GET", target, headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Date")
    finally:
        conn.close()


def _skew(date: str | None, sent: float, got: float, rep: Report) -> None:
    if not date:
        rep.add("clock", WARN, "the CA sent no Date header: clock skew not measured")
        return
    try:
        theirs = parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        rep.add("clock", WARN, f"the CA's Date header {date!r} is not an HTTP date")
        return
    # the Date header has one-second resolution: the server's clock was in [theirs, theirs+1)
    # somewhere between our send and our receive
    ahead = sent - (theirs + 1)  # our clock ahead of theirs by at least this
    behind = theirs - got  # behind by at least this
    skew = max(ahead, behind, 0.0)
    status = FAIL if skew >= SKEW_FAIL_SECONDS else WARN if skew >= SKEW_WARN_SECONDS else OK
    way = "ahead of" if ahead > behind else "behind"
    rep.add(
        "clock",
        status,
        "clock within 1 s of the CA's" if skew == 0 else f"clock {skew:.0f} s {way} the CA's",
    )


def check_issuer(ident: IdentityConfig | None, opts: Options, rep: Report) -> None:
    if ident is None:
        return
    if ident.vault is not None:
        for addr in ident.vault.addrs:
            ctx = (
                ssl.create_default_context(cafile=str(ident.vault.ca_cert))
                if ident.vault.ca_cert is not None
                else ssl.create_default_context()
            )
            url = addr.rstrip("/") + "/v1/sys/health?standbyok=true"
            try:
                status, _ = _get(url, ctx, opts.timeout)
            except (OSError, ssl.SSLError) as exc:
                rep.add("vault", FAIL, f"{addr} unreachable: {exc}")
                continue
            ok = status in (200, 429, 473)
            rep.add("vault", OK if ok else FAIL, f"{addr} answers /v1/sys/health with {status}")
        return
    assert ident.ca_url is not None
    try:
        ctx = _ca_context(ident)
    except (OSError, ssl.SSLError) as exc:
        rep.add("ca", FAIL, f"identity.ca_bundle cannot be loaded: {exc}")
        return
    sent = time.time()
    try:
        status, date = _get(ident.ca_url.rstrip("/") + "/healthz", ctx, opts.timeout)
    except ssl.SSLCertVerificationError as exc:
        rep.add("ca", FAIL, f"{ident.ca_url}: TLS certificate not trusted by ca_bundle: {exc}")
        return
    except (OSError, ssl.SSLError) as exc:
        rep.add("ca", FAIL, f"{ident.ca_url} unreachable: {exc}")
        return
    got = time.time()
    rep.add("ca", OK if status == 200 else FAIL, f"{ident.ca_url} answers /healthz: {status}")
    _skew(date, sent, got, rep)


# -- the credential held -----------------------------------------------------------------------


def _certs(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def chain_problem(chain: list[x509.Certificate], roots: list[x509.Certificate]) -> str | None:
    """Why `chain` (leaf first) does not chain to one of `roots` (None: it does)."""
    for child, parent in zip(chain, chain[1:], strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except (InvalidSignature, ValueError, TypeError) as exc:
            return f"{child.subject.rfc4514_string()} is not signed by the next certificate ({exc})"
    top = chain[-1]
    for root in roots:
        if top == root:
            return None
        try:
            top.verify_directly_issued_by(root)
            return None
        except (InvalidSignature, ValueError, TypeError):  # not this root: try the next
            continue
    return f"{top.issuer.rfc4514_string()} (the chain's top issuer) is not in the trust bundle"


def _expiry(what: str, leaf: x509.Certificate, renew_fraction: float, opts: Options) -> tuple:
    now = opts.clock()
    left = (leaf.not_valid_after_utc - now).total_seconds()
    life = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    if now < leaf.not_valid_before_utc:
        return FAIL, f"{what} is not valid before {leaf.not_valid_before_utc.isoformat()}"
    if left <= 0:
        return FAIL, f"{what} expired {_human(-left)} ago ({leaf.not_valid_after_utc.isoformat()})"
    renew_at = life * (1 - renew_fraction)
    msg = f"{what} expires in {_human(left)} ({leaf.not_valid_after_utc.isoformat()})"
    if left < renew_at:
        return WARN, msg + ": past its renewal point, is renewal failing?"
    return OK, msg


def _human(seconds: float) -> str:
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60}m"
    if s >= 60:
        return f"{s // 60}m{s % 60}s"
    return f"{s}s"


def _key_matches(key_pem: bytes, leaf: x509.Certificate) -> bool:
    key = serialization.load_pem_private_key(key_pem, None)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return key.public_key().public_bytes(enc, pub) == leaf.public_key().public_bytes(enc, pub)


def check_held(ident: IdentityConfig | None, opts: Options, rep: Report) -> bool:
    """The credential in the state dir; True if there is a usable one (for the peer checks)."""
    if ident is None:
        return False
    d = ident.state_dir
    chain_f, key_f, bundle_f = d / "chain.pem", d / "key.pem", d / "bundle.pem"
    if not chain_f.exists():
        rep.add("chain", WARN, f"no certificate held yet ({chain_f}): one is issued at start")
        return False
    try:
        chain = _certs(chain_f.read_bytes())
        roots = _certs(bundle_f.read_bytes())
        key_pem = key_f.read_bytes()
    except (OSError, ValueError) as exc:
        rep.add("chain", FAIL, f"the credential in {d} cannot be read: {exc}")
        return False
    why = chain_problem(chain, roots)
    rep.add(
        "bundle",
        FAIL if why else OK,
        f"{chain_f} does not chain to {bundle_f}: {why}"
        if why
        else f"{chain_f} chains to the trust bundle ({len(roots)} root(s))",
    )
    try:
        sid = svid_from_der(chain[0].public_bytes(serialization.Encoding.DER)).spiffe_id
    except IdentityError as exc:
        sid = None
        rep.add("chain", FAIL, f"{chain_f}: {exc}")
    if sid is not None and sid != ident.spiffe_id:
        rep.add("chain", FAIL, f"{chain_f} is for {sid}, the config says {ident.spiffe_id}")
    elif sid is not None:
        good = _key_matches(key_pem, chain[0])
        rep.add(
            "chain",
            OK if good else FAIL,
            f"{sid}: key matches" if good else f"{key_f} is not the key of {chain_f}",
        )
    status, msg = _expiry(
        f"the certificate of {ident.spiffe_id}", chain[0], ident.renew_fraction, opts
    )
    rep.add("expiry", status, msg)
    return why is None and status != FAIL


def check_route_certs(cfg: EdgeConfig, opts: Options, rep: Report) -> None:
    for r in cfg.routes:
        if r.cert_file is None or r.key_file is None:
            continue
        if unreadable(r.cert_file) or unreadable(r.key_file):
            continue  # reported by the file check
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(r.cert_file), str(r.key_file))
            leaf = _certs(r.cert_file.read_bytes())[0]
        except (ssl.SSLError, ValueError, OSError) as exc:
            rep.add("chain", FAIL, f"{r.host}: {r.cert_file} with {r.key_file}: {exc}")
            continue
        rep.add("chain", OK, f"{r.host}: {r.cert_file} and its key load")
        status, msg = _expiry(f"{r.host}'s certificate", leaf, 2 / 3, opts)
        rep.add("expiry", WARN if status == WARN else status, msg)


# -- ports -------------------------------------------------------------------------------------


def _listeners(cfg: SidecarConfig | EdgeConfig) -> list[tuple[str, HostPort]]:
    if isinstance(cfg, EdgeConfig):
        out = [("listen.https", cfg.https_listen), ("listen.http", cfg.http_listen)]
    else:
        out = [
            ("inbound.listen", cfg.inbound_listen),
            ("outbound.listen", cfg.outbound_listen),
            ("outbound.transparent_listen", cfg.transparent_listen),
        ]
        out += [
            (f"outbound.upstreams.{u.name}.local_port", HostPort("127.0.0.1", u.local_port))
            for u in cfg.upstreams
            if u.local_port
        ]
    out.append(("admin.listen", cfg.admin_listen))
    return [(k, hp) for k, hp in out if hp is not None]


def _bind_error(hp: HostPort) -> OSError | None:
    family = socket.AF_INET6 if ":" in hp.host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((hp.host, hp.port))
        return None
    except OSError as exc:
        return exc
    finally:
        s.close()


def _running(admin: HostPort, timeout: float) -> bool:
    """Does a meshcar admin listener answer /live there (the process itself holds the ports)?"""
    try:
        status, _ = _get(
            f"http://{admin.host}:{admin.port}/live", ssl.create_default_context(), timeout
        )
    except OSError:
        return False
    return status == 200


def check_ports(cfg: SidecarConfig | EdgeConfig, opts: Options, rep: Report) -> None:
    running: bool | None = None
    for k, hp in _listeners(cfg):
        err = _bind_error(hp)
        if err is None:
            rep.add("port", OK, f"{k} {hp.host}:{hp.port} is free")
            continue
        if err.errno == errno.EADDRINUSE:
            if running is None:
                running = _running(cfg.admin_listen, opts.timeout)
            if running:
                rep.add("port", OK, f"{k} {hp.host}:{hp.port} is held by the running process")
            else:
                rep.add("port", FAIL, f"{k} {hp.host}:{hp.port} is in use by another process")
        else:
            rep.add("port", FAIL, f"{k} {hp.host}:{hp.port} cannot be bound: {err.strerror}")


# -- peers -------------------------------------------------------------------------------------


def _peers(cfg: SidecarConfig | EdgeConfig) -> list[tuple[str, HostPort, str]]:
    if isinstance(cfg, SidecarConfig):
        return [(u.name, ep, u.spiffe_id) for u in cfg.upstreams for ep in u.endpoints]
    out = []
    for r in cfg.routes:
        for b in r.default_split.backends:
            if b.spiffe_id is not None:
                out += [(r.host, ep, b.spiffe_id) for ep in b.endpoints]
    return out


def peer_identity(ctx: ssl.SSLContext, hp: HostPort, timeout: float, trust_domain: str) -> str:
    """The SPIFFE ID the peer at `hp` proves in an mTLS handshake with `ctx`."""
    with socket.create_connection((hp.host, hp.port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=None) as tls:
            der = tls.getpeercert(binary_form=True)
    return svid_from_der(der, trust_domain=trust_domain).spiffe_id


def check_peers(cfg: SidecarConfig | EdgeConfig, held: bool, opts: Options, rep: Report) -> None:
    peers = _peers(cfg)
    if not peers:
        return
    ident = cfg.identity
    if not held or ident is None:
        rep.add("peer", WARN, f"{len(peers)} peer endpoint(s) not checked: no usable credential")
        return
    d = ident.state_dir
    ctx = mesh_client_context(d / "chain.pem", d / "key.pem", (d / "bundle.pem").read_text())
    td = ident.spiffe_id.split("/")[2]
    for name, hp, want in peers:
        where = f"{name} {hp.host}:{hp.port}"
        try:
            got = peer_identity(ctx, hp, opts.timeout, td)
        except (OSError, ssl.SSLError) as exc:
            rep.add("peer", FAIL, f"{where}: no mTLS handshake: {exc}")
            continue
        except IdentityError as exc:
            rep.add("peer", FAIL, f"{where}: {exc}")
            continue
        if got != want:
            rep.add("peer", FAIL, f"{where} presents {got}, expected {want}")
        else:
            rep.add("peer", OK, f"{where} presents {want}")


# -- the command -------------------------------------------------------------------------------


def run_checks(path: Path, kind: str | None, opts: Options) -> tuple[str, int, Report]:
    """(kind, exit status, report) of every check of the config at `path`."""
    rep = Report()
    kind, problems = config_problems(path, kind)
    if problems:
        for p in problems:
            rep.add("config", FAIL, p)
        return kind, 2, rep
    cfg: SidecarConfig | EdgeConfig
    try:
        cfg = load_edge_config(path) if kind == "edge" else load_config(path)
    except ConfigError as exc:  # pragma: no cover - the check above parses the same
        for p in exc.problems:
            rep.add("config", FAIL, p)
        return kind, 2, rep
    rep.add("config", OK, f"{path}: valid {kind} config")
    if isinstance(cfg, SidecarConfig) and cfg.permissive:
        rep.add(
            "config",
            WARN,
            "inbound.permissive: plaintext callers are accepted on the mesh port, as "
            "unauthenticated (for migration: turn it off once every caller has a sidecar)",
        )
    check_files(cfg, rep)
    check_issuer(cfg.identity, opts, rep)
    held = check_held(cfg.identity, opts, rep)
    if isinstance(cfg, EdgeConfig):
        check_route_certs(cfg, opts, rep)
    check_ports(cfg, opts, rep)
    check_peers(cfg, held, opts, rep)
    return kind, 1 if rep.failed() else 0, rep


def render(path: Path, kind: str, code: int, rep: Report, output: str) -> str:
    if output == "json":
        checks = [{"check": c, "status": s, "message": m} for c, s, m in rep.checks]
        return json.dumps({"file": str(path), "kind": kind, "exit": code, "checks": checks})
    lines = [f"{s:<4} {c:<6} {m}" for c, s, m in rep.checks]
    verdict = {0: "all checks passed", 1: "some checks FAILED", 2: "the config is invalid"}
    warned = sum(1 for _, s, _ in rep.checks if s == WARN)
    lines.append(f"{verdict[code]}" + (f" ({warned} warning(s))" if warned else ""))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="meshcar check",
        description="Check a sidecar or edge config and what it depends on (exit 0 ok, "
        "1 a check failed, 2 the config is invalid).",
    )
    parser.add_argument("file", type=Path, metavar="FILE")
    parser.add_argument("--kind", choices=["sidecar", "edge"], help="default: guessed")
    parser.add_argument("--output", choices=["text", "json"], default="text")
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds per network check (default 3)"
    )
    args = parser.parse_args(argv)
    kind, code, rep = run_checks(args.file, args.kind, Options(timeout=args.timeout))
    print(render(args.file, kind, code, rep, args.output))
    sys.stdout.flush()
    return code
