"""`meshcar ca init|serve|token|rotate-root|status|vault-setup`: parse arguments, call the CA
modules, map errors to exit 1.

Output contract (docs/CA.md): `init` prints one JSON line `{"event": "ca.init", ...}`;
`token` prints the join token alone on one line; `serve` prints
`{"event": "ca.ready", "listen": "HOST:PORT"}` once bound, then one JSON line per request,
and `{"event": "ca.stopped"}` on SIGINT/SIGTERM (exit 0); `rotate-root` prints one JSON
line saying which stage it reached; `status` prints the rotation state as one JSON object;
`vault-setup` one JSON line (no secrets). Errors are one line on stderr
(`meshcar ca init: ...`) with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from . import files
from .api import CAServer, json_log
from .auth import Authenticator, K8sVerifier, mint_token, projected_token_verifier
from .duration import parse_duration
from .errors import CAError, ConfigError
from .issuer import BuiltinIssuer, Issuer, LiveIssuer, utcnow
from .sign import SignService
from .store import Store
from .tls import ServerTLS

IN_CLUSTER_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshcar ca", description="meshcar's certificate authority")
    sub = p.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create a root, an intermediate and the API certificate")
    init.add_argument("--dir", required=True, type=Path, help="CA directory (created 0700)")
    init.add_argument(
        "--trust-domain", required=True, help="SPIFFE trust domain, e.g. meshcar.demo"
    )
    init.add_argument("--max-ttl", default="24h", help="maximum SVID lifetime (default 24h)")
    init.add_argument("--force", action="store_true", help="replace an existing CA in --dir")

    serve = sub.add_parser("serve", help="serve the HTTPS API")
    serve.add_argument("--dir", required=True, type=Path)
    serve.add_argument("--listen", required=True, help="HOST:PORT (port 0 picks a free port)")
    serve.add_argument(
        "--drain-seconds",
        type=float,
        default=10.0,
        metavar="S",
        help="on SIGTERM/SIGINT, how long requests in flight may finish (default 10)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes accepting on the one listening socket (default 1; builtin backend only)",
    )
    serve.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="extra DNS name or IP for the API certificate (repeatable)",
    )
    k8s = serve.add_argument_group("Kubernetes projected service-account tokens (k8s_token)")
    k8s.add_argument(
        "--k8s-issuer",
        metavar="URL",
        help="the cluster's service-account issuer (enables k8s_token)",
    )
    k8s.add_argument(
        "--k8s-audience", default="meshcar-ca", help="required audience (default meshcar-ca)"
    )
    k8s.add_argument(
        "--k8s-jwks",
        type=Path,
        metavar="FILE",
        help="JWKS file (kubectl get --raw /openid/v1/jwks)",
    )
    k8s.add_argument(
        "--k8s-discovery-url",
        "--k8s-discovery",
        dest="k8s_discovery",
        metavar="URL",
        help="fetch the JWKS at start by OIDC discovery from URL (https://kubernetes.default.svc)",
    )
    k8s.add_argument(
        "--k8s-discovery-ca",
        metavar="FILE",
        help=f"CA file for discovery (default: {IN_CLUSTER_CA} if it exists)",
    )
    k8s.add_argument(
        "--k8s-discovery-token-file",
        type=Path,
        metavar="FILE",
        help=f"bearer token file for discovery (default: {IN_CLUSTER_TOKEN} if it exists)",
    )

    backend = serve.add_argument_group("issuing backend")
    backend.add_argument(
        "--backend",
        choices=("builtin", "vault"),
        default="builtin",
        help="builtin: sign with the intermediate in --dir (default); vault: Vault/OpenBao PKI",
    )
    backend.add_argument(
        "--vault-addr", metavar="URL", help="Vault/OpenBao address, e.g. https://vault:8200"
    )
    backend.add_argument(
        "--vault-mount", default="pki_int", help="PKI mount that signs (default pki_int)"
    )
    backend.add_argument(
        "--vault-role",
        metavar="ROLE",
        help="PKI role to sign with; {path} becomes the SPIFFE ID path with - for /",
    )
    backend.add_argument(
        "--vault-token-file", type=Path, metavar="FILE", help="Vault token (development)"
    )
    backend.add_argument("--vault-approle-role-id-file", type=Path, metavar="FILE")
    backend.add_argument("--vault-approle-secret-id-file", type=Path, metavar="FILE")
    backend.add_argument("--vault-approle-mount", default="approle")
    backend.add_argument(
        "--vault-ca-cert", type=Path, metavar="FILE", help="CA file for Vault's own TLS certificate"
    )
    backend.add_argument(
        "--vault-refresh", default="60s", help="how often to re-read Vault's CA chain (default 60s)"
    )

    rotate = sub.add_parser(
        "rotate-root", help="advance a trust-root rotation by one stage (docs/ROTATION.md)"
    )
    rotate.add_argument("--dir", required=True, type=Path)
    rotate.add_argument(
        "--force",
        action="store_true",
        help="switch issuing (stage 2) even if some workloads have not reported the new bundle",
    )

    renew = sub.add_parser(
        "renew-intermediate",
        help="issue a new intermediate from the same root (no bundle change; docs/ROTATION.md)",
    )
    renew.add_argument("--dir", required=True, type=Path)

    status = sub.add_parser("status", help="print the CA's rotation state as JSON")
    status.add_argument("--dir", required=True, type=Path)

    vs = sub.add_parser(
        "vault-setup", help="configure PKI mounts, roles and AppRoles on a fresh Vault/OpenBao"
    )
    vs.add_argument("--addr", required=True, metavar="URL")
    vs.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="admin token file (default: $VAULT_TOKEN or $BAO_TOKEN, or --token)",
    )
    vs.add_argument("--token", help=argparse.SUPPRESS)  # development only: visible in ps
    vs.add_argument("--trust-domain", required=True)
    vs.add_argument(
        "--out", required=True, type=Path, help="directory for vault-root.pem and AppRole files"
    )
    vs.add_argument("--root-mount", default="pki")
    vs.add_argument("--int-mount", default="pki_int")
    vs.add_argument("--role", default="meshcar-workloads")
    vs.add_argument(
        "--allowed-uri",
        action="append",
        default=[],
        metavar="PATTERN",
        help="URI SAN pattern the role allows (default spiffe://TD/svc/*; repeatable)",
    )
    vs.add_argument(
        "--workload",
        action="append",
        default=[],
        metavar="PATH",
        help="also a role, policy and AppRole allowing only spiffe://TD/PATH (repeatable)",
    )
    vs.add_argument("--max-ttl", default="24h")
    vs.add_argument(
        "--ca-cert", type=Path, metavar="FILE", help="CA file for Vault's TLS certificate"
    )

    token = sub.add_parser("token", help="mint a join token bound to one SPIFFE ID")
    token.add_argument("--dir", required=True, type=Path)
    token.add_argument("--spiffe-id", required=True)
    token.add_argument("--ttl", default="24h", help="token lifetime (default 24h)")
    token.add_argument(
        "--uses", default=1, type=int, help="how many certificates it may obtain (default 1)"
    )
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            return _init(args)
        if args.command == "token":
            return _token(args)
        if args.command == "rotate-root":
            return _rotate_root(args)
        if args.command == "status":
            return _status(args)
        if args.command == "renew-intermediate":
            return _renew_intermediate(args)
        if args.command == "vault-setup":
            return _vault_setup(args)
        return _serve(args)
    except CAError as exc:
        print(f"meshcar ca {args.command}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"meshcar ca {args.command}: {exc.filename or ''}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1


def _init(args: argparse.Namespace) -> int:
    max_ttl = parse_duration(args.max_ttl)
    paths = files.create_ca(args.dir, args.trust_domain, max_ttl, utcnow(), force=args.force)
    json_log(
        {
            "event": "ca.init",
            "dir": str(paths.dir),
            "trust_domain": args.trust_domain,
            "max_ttl_seconds": max_ttl,
            "root": str(paths.root_pem),
            "bundle": str(paths.bundle_pem),
        }
    )
    return 0


def _token(args: argparse.Namespace) -> int:
    ttl = parse_duration(args.ttl)
    if args.uses < 1:
        raise ConfigError("--uses must be at least 1")
    paths, config = files.open_ca(args.dir)
    token = mint_token(
        Store(paths.db), config.trust_domain, args.spiffe_id, ttl, args.uses, int(time.time())
    )
    print(token)
    return 0


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8600")
    return host, int(port)


def load_k8s_verifier(args: argparse.Namespace, trust_domain: str) -> K8sVerifier | None:
    """The k8s_token verifier configured by the --k8s-* flags, or None if not enabled."""
    source = args.k8s_jwks or args.k8s_discovery
    if not args.k8s_issuer:
        if source:
            raise ConfigError("--k8s-jwks/--k8s-discovery-url need --k8s-issuer")
        return None
    if bool(args.k8s_jwks) == bool(args.k8s_discovery):
        raise ConfigError(
            "--k8s-issuer needs exactly one of --k8s-jwks FILE or --k8s-discovery-url URL"
        )
    from .k8s_token import K8sTokenError, fetch_jwks, load_jwks_file

    try:
        if args.k8s_jwks:
            jwks = load_jwks_file(str(args.k8s_jwks))
        else:
            ca_file = args.k8s_discovery_ca or (
                IN_CLUSTER_CA if Path(IN_CLUSTER_CA).is_file() else None
            )
            token_file = args.k8s_discovery_token_file or (
                Path(IN_CLUSTER_TOKEN) if Path(IN_CLUSTER_TOKEN).is_file() else None
            )
            bearer = token_file.read_text().strip() if token_file else None
            jwks = fetch_jwks(
                args.k8s_discovery,
                expected_issuer=args.k8s_issuer,
                ca_file=ca_file,
                bearer_token=bearer,
            )
    except K8sTokenError as exc:
        raise ConfigError(exc.reason) from None
    return projected_token_verifier(jwks, args.k8s_issuer, args.k8s_audience, trust_domain)


def _rotate_root(args: argparse.Namespace) -> int:
    from .rotation import advance

    json_log(advance(args.dir, utcnow(), force=args.force))
    return 0


def _renew_intermediate(args: argparse.Namespace) -> int:
    from .intermediate import renew_intermediate

    out = renew_intermediate(args.dir, utcnow())
    json_log(out)
    if "warning" in out:
        print(f"meshcar ca renew-intermediate: WARNING: {out['warning']}", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    from .rotation import status

    st = status(args.dir, utcnow())
    print(json.dumps(st, indent=2))
    for warning in st["warnings"]:
        print(f"meshcar ca status: WARNING: {warning}", file=sys.stderr)
    return 0


def _vault_setup(args: argparse.Namespace) -> int:
    import hvac  # type: ignore[import-untyped]
    import hvac.exceptions  # type: ignore[import-untyped]
    import requests

    from .vault_setup import VaultLayout, setup

    if args.token_file is not None:
        token = args.token_file.read_text().strip()
    else:
        token = args.token or os.environ.get("VAULT_TOKEN") or os.environ.get("BAO_TOKEN") or ""
    if not token:
        raise ConfigError("no admin token: use --token-file FILE or set VAULT_TOKEN")
    parse_duration(args.max_ttl)
    client = hvac.Client(
        url=args.addr, token=token, verify=str(args.ca_cert) if args.ca_cert else True
    )
    layout = VaultLayout(
        trust_domain=args.trust_domain,
        root_mount=args.root_mount,
        int_mount=args.int_mount,
        role=args.role,
        allowed_uris=tuple(args.allowed_uri),
        workloads=tuple(args.workload),
        max_ttl=args.max_ttl,
    )
    try:
        json_log(setup(client, layout, args.out))
    except (hvac.exceptions.VaultError, requests.RequestException) as exc:
        errors = getattr(exc, "errors", None)
        raise ConfigError(
            f"Vault at {args.addr}: {'; '.join(map(str, errors)) if errors else type(exc).__name__}"
        ) from None
    return 0


def _vault_issuer(args: argparse.Namespace, config: files.CAConfig) -> Issuer:
    from .vault_issuer import VaultIssuer, VaultSettings

    if not args.vault_addr:
        raise ConfigError("--backend vault needs --vault-addr")
    settings = VaultSettings(
        addr=args.vault_addr,
        role=args.vault_role or "",
        mount=args.vault_mount,
        token_file=args.vault_token_file,
        approle_role_id_file=args.vault_approle_role_id_file,
        approle_secret_id_file=args.vault_approle_secret_id_file,
        approle_mount=args.vault_approle_mount,
        ca_cert=args.vault_ca_cert,
    )
    vault = VaultIssuer(
        settings, config.trust_domain, config.max_ttl_seconds, config.bundle_version
    )
    vault.login()
    vault.refresh()
    return vault


def _serve(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)
    if not 1 <= args.workers <= 64:
        raise ConfigError("--workers must be between 1 and 64")
    if args.workers > 1 and args.backend != "builtin":
        raise ConfigError("--workers above 1 needs --backend builtin")
    paths, config = files.open_ca(args.dir)
    issuer: Issuer
    refresh: tuple[float, object] | None = None
    if args.backend == "vault":
        issuer = _vault_issuer(args, config)
        refresh = (float(parse_duration(args.vault_refresh)), issuer.refresh)  # type: ignore[attr-defined]
        vault_issuer = issuer
        tls = ServerTLS(paths, args.san, lambda: vault_issuer.bundle().pem)
    else:
        issuer = LiveIssuer(lambda: BuiltinIssuer.load(args.dir), paths.config)
        tls = ServerTLS(paths, args.san)
    k8s_verifier = load_k8s_verifier(args, issuer.trust_domain)
    tls.context()  # issue the API certificate now, so errors show before binding
    store = Store(paths.db)  # opens its connection on first use: after any fork below
    service = SignService(issuer, Authenticator(store, issuer, k8s_verifier), store)
    server = CAServer(service, tls.context)
    if not 0 <= args.drain_seconds <= 3600:
        raise ConfigError("--drain-seconds must be between 0 and 3600")
    if args.workers == 1:
        trio.run(_run, server, host, port, refresh, args.drain_seconds)
        return 0
    return _serve_workers(args, server, tls, host, port)


def _serve_workers(
    args: argparse.Namespace, server: CAServer, tls: ServerTLS, host: str, port: int
) -> int:
    """`serve --workers N` (builtin backend, so no refresh loop): fork, serve, wait for all."""
    refresh = None
    sock = _bind(host, port)
    workers: list[_Worker] = []
    ready_r, ready_w = os.pipe()  # each worker writes one byte once it accepts
    try:
        for n in range(1, args.workers):
            control_r, control_w = os.pipe()  # the parent's stop requests to this worker
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:  # a worker: serve the inherited socket; never return into main()
                code = 1
                try:
                    # signals are for the parent (a terminal's ^C or systemd's SIGTERM reach
                    # every process): a worker stops when the parent tells it, or is gone
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                    for fd in (ready_r, control_w, *(w.control for w in workers)):
                        os.close(fd)
                    tls.reissue = False  # worker 0 (this parent) re-issues the API certificate
                    trio.run(
                        _run,
                        server,
                        host,
                        port,
                        refresh,
                        args.drain_seconds,
                        sock,
                        n,
                        ready_w,
                        [],
                        control_r,
                    )
                    code = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    os._exit(code)
            os.close(control_r)
            workers.append(_Worker(pid, control_w))
        os.close(ready_w)
        name = trio.run(
            _run, server, host, port, refresh, args.drain_seconds, sock, 0, ready_r, workers
        )
        # pass a second signal on while the workers finish draining
        signal.signal(signal.SIGTERM, lambda signum, _: _signal_all(workers, signum))
        signal.signal(signal.SIGINT, lambda signum, _: _signal_all(workers, signum))
        while workers:
            pid, status = os.waitpid(workers[0].pid, 0)
            os.close(workers.pop(0).control)
            code = os.waitstatus_to_exitcode(status)
            json_log({"event": "ca.worker_exited", "pid": pid, "status": code})
        json_log({"event": "ca.stopped", "signal": name})
    finally:
        for w in workers:  # a failed start or an early exit: no worker outlives the parent
            try:
                os.kill(w.pid, signal.SIGKILL)
                os.waitpid(w.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    return 0


@dataclass(frozen=True)
class _Worker:
    pid: int
    control: int  # write end of its control pipe: one byte (a signal number) per stop request


def _bind(host: str, port: int) -> socket.socket:
    """The one listening socket the workers share (bound before forking: each accepts from it)."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = info[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(info[0][4])
            sock.listen(socket.SOMAXCONN)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(False)
    return sock


def _await_workers(ready_r: int, n: int) -> None:
    """Block until `n` workers said they accept (a byte each on the pipe); ConfigError if one
    died first (every write end closed before `n` bytes)."""
    got = 0
    while got < n:
        chunk = os.read(ready_r, n - got)
        if not chunk:
            raise ConfigError("a worker process exited before it was ready (see stderr)")
        got += len(chunk)


async def _listeners(host: str, port: int, sock: socket.socket | None) -> list[trio.SocketListener]:
    if sock is not None:  # bound before forking (--workers)
        return [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


async def _announce_ready(
    listen: str, worker: int, ready_fd: int | None, workers: list[_Worker]
) -> None:
    """A worker tells the parent (a byte on `ready_fd`); the parent, once every worker has,
    prints ca.ready."""
    if worker:
        assert ready_fd is not None
        os.write(ready_fd, b"r")
        os.close(ready_fd)
        return
    extra: dict[str, object] = {}
    if workers:
        assert ready_fd is not None
        await trio.to_thread.run_sync(_await_workers, ready_fd, len(workers))
        os.close(ready_fd)
        extra = {"workers": [w.pid for w in workers]}
    json_log({"event": "ca.ready", "listen": listen, **extra})


def _signal_all(workers: list[_Worker], signum: int) -> None:
    """Pass a stop request (the signal's number) on to every worker."""
    for w in workers:
        try:
            os.write(w.control, bytes([signum]))
        except OSError:  # it has exited
            pass


@asynccontextmanager
async def _stop_requests(control_fd: int | None) -> AsyncIterator[AsyncIterator[str]]:
    """The names of the stop requests: SIGINT/SIGTERM, or, in a worker, what the parent
    passes on through `control_fd` (its end, the parent gone, counts as one SIGTERM)."""
    if control_fd is None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def from_signals() -> AsyncIterator[str]:
                async for signum in signals:
                    yield signal.Signals(signum).name

            yield from_signals()
        return
    stream = trio.lowlevel.FdStream(control_fd)

    async def from_parent() -> AsyncIterator[str]:
        while data := await stream.receive_some(1):
            yield signal.Signals(data[0]).name
        yield "SIGTERM"

    try:
        yield from_parent()
    finally:
        await stream.aclose()


async def _refresh_loop(interval: float, refresh: object) -> None:
    while True:
        await trio.sleep(interval)
        try:
            await trio.to_thread.run_sync(refresh)  # type: ignore[arg-type]
        except CAError as exc:
            json_log({"event": "ca.backend_refresh_failed", "error": exc.message})


async def _drain(
    server: CAServer, grace: float, scope: trio.CancelScope, tag: dict[str, int] | None = None
) -> None:
    with trio.move_on_after(grace):
        await server.wait_idle()
    json_log({**(tag or {}), "event": "ca.drained", "cut_off": server.in_flight})
    scope.cancel()


async def _run(
    server: CAServer,
    host: str,
    port: int,
    refresh: tuple[float, object] | None = None,
    drain_seconds: float = 10.0,
    sock: socket.socket | None = None,
    worker: int = 0,
    ready_fd: int | None = None,
    workers: list[_Worker] | None = None,
    control_fd: int | None = None,
) -> str:
    """Serve until a signal: the first closes the listener and lets requests in flight finish
    (up to `drain_seconds`), a second stops at once (the same contract as meshcar/net/shell.py,
    which this package cannot import).

    With `--workers N`, `sock` is the listening socket bound before forking and every process
    runs this: the others write a byte to `ready_fd` once they accept and tag their drain lines
    with their number; worker 0 (the parent) reads those bytes from `ready_fd`, prints ca.ready
    with the workers' pids and passes each signal on to `workers` (through their control
    pipes; a worker reads its `control_fd` instead of handling signals). Returns the signal's
    name; the parent of workers prints ca.stopped itself, once they have exited."""
    listeners = await _listeners(host, port, sock)
    workers = workers or []
    tag = {"worker": worker} if worker else {}
    async with _stop_requests(control_fd) as requests, trio.open_nursery() as nursery:
        if refresh is not None:
            nursery.start_soon(_refresh_loop, *refresh)
        accepting = trio.CancelScope()
        name = ""

        async def serve(
            task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            with accepting:
                await server.serve_listeners(
                    listeners, handler_nursery=nursery, task_status=task_status
                )

        bound = await nursery.start(serve)
        addr = bound[0].socket.getsockname()
        shown = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        await _announce_ready(f"{shown}:{addr[1]}", worker, ready_fd, workers)
        async for name in requests:
            _signal_all(workers, signal.Signals[name])
            if not server.draining:
                server.draining = True
                json_log(
                    {
                        **tag,
                        "event": "ca.draining",
                        "signal": name,
                        "in_flight": server.in_flight,
                        "grace_seconds": drain_seconds,
                    }
                )
                accepting.cancel()
                nursery.start_soon(_drain, server, drain_seconds, nursery.cancel_scope, tag)
            else:
                json_log(
                    {
                        **tag,
                        "event": "ca.exiting",
                        "signal": name,
                        "in_flight": server.in_flight,
                    }
                )
                nursery.cancel_scope.cancel()
                break
    if not workers and not worker:  # a parent of workers prints it once they have exited
        json_log({"event": "ca.stopped", "signal": name})
    return name
