"""`meshcar init-iptables`: the transparent-capture rules of one pod, as an init container runs
them (the only container of the pod with NET_ADMIN), the way `istio-init` / `linkerd-init` do.

In the pod's network namespace (nat table, chains of our own so that running it twice is
the same as once):

- `MESHCAR_OUTPUT` (jumped to from OUTPUT): TCP from the sidecar's uid (`--proxy-uid`) is
  left alone, so the sidecar's own connections (to peers, the CA, egress) leave the pod;
  so is TCP to loopback (the app talking to its sidecar or itself) and to `--exclude-port`
  destinations; everything else to `--capture-cidr` (default all of IPv4) is redirected to
  the sidecar's transparent listener `--redirect-port` (127.0.0.1 there: the kernel maps a
  local REDIRECT to loopback), which recovers the original destination with SO_ORIGINAL_DST.
- `MESHCAR_INBOUND` (from PREROUTING), only with `--app-port` and `--inbound-port`: TCP
  arriving for the app port goes to the sidecar's mesh listener, so the app port speaks
  only mTLS to other pods. Kubelet probes of that port then meet TLS too, hence opt-in.

`--dry-run` prints the iptables commands instead of running them. Exit 0 when every rule is
in place, 1 with iptables' message otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

OUT_CHAIN = "MESHCAR_OUTPUT"
IN_CHAIN = "MESHCAR_INBOUND"


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port in 1..65535")
    return int(text)


def _uid(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a uid")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshcar init-iptables",
        description="Install a pod's transparent-capture iptables rules (init container).",
    )
    p.add_argument("--proxy-uid", type=_uid, required=True, help="the sidecar's uid (excluded)")
    p.add_argument(
        "--redirect-port", type=_port, required=True, help="the sidecar's transparent_listen port"
    )
    p.add_argument(
        "--capture-cidr",
        action="append",
        default=None,
        help="destinations to capture (repeatable; default 0.0.0.0/0)",
    )
    p.add_argument(
        "--exclude-port",
        action="append",
        type=_port,
        default=[],
        help="destination port never captured (repeatable)",
    )
    p.add_argument("--app-port", type=_port, help="inbound capture: the app's port ...")
    p.add_argument("--inbound-port", type=_port, help="... redirected to this mesh listener")
    p.add_argument("--iptables", default="iptables", help="the iptables binary (default iptables)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


def rules(args: argparse.Namespace) -> list[list[str]]:
    """The iptables argument lists, in order (pure)."""
    ipt = [args.iptables, "-w", "-t", "nat"]
    out: list[list[str]] = []

    def chain(name: str, parent: str) -> None:
        # create (fails harmlessly when it exists: see run()), empty, and jump to it once
        out.append([*ipt, "-N", name])
        out.append([*ipt, "-F", name])
        out.append([*ipt, "-D", parent, "-p", "tcp", "-j", name])
        out.append([*ipt, "-A", parent, "-p", "tcp", "-j", name])

    chain(OUT_CHAIN, "OUTPUT")
    add = [*ipt, "-A", OUT_CHAIN, "-p", "tcp"]
    out.append([*add, "-m", "owner", "--uid-owner", str(args.proxy_uid), "-j", "RETURN"])
    out.append([*add, "-d", "127.0.0.0/8", "-j", "RETURN"])
    for port in args.exclude_port:
        out.append([*add, "--dport", str(port), "-j", "RETURN"])
    for cidr in args.capture_cidr or ["0.0.0.0/0"]:
        redirect = ["-j", "REDIRECT", "--to-ports", str(args.redirect_port)]
        out.append([*add, "-d", cidr, *redirect])
    if args.app_port is not None:
        chain(IN_CHAIN, "PREROUTING")
        out.append(
            [
                *ipt,
                "-A",
                IN_CHAIN,
                "-p",
                "tcp",
                "--dport",
                str(args.app_port),
                "-j",
                "REDIRECT",
                "--to-ports",
                str(args.inbound_port),
            ]
        )
    return out


def _may_fail(cmd: list[str]) -> bool:
    """`-N` of an existing chain and `-D` of a missing jump fail on a first or second run."""
    return "-N" in cmd or "-D" in cmd


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.app_port is None) != (args.inbound_port is None):
        parser.error("--app-port and --inbound-port go together")
    if args.proxy_uid == 0:
        parser.error("--proxy-uid 0 would exempt every root process from capture")
    for cmd in rules(args):
        if args.dry_run:
            print(shlex.join(cmd))
            continue
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"meshcar init-iptables: {shlex.join(cmd)}: {exc}", file=sys.stderr)
            return 1
        if r.returncode != 0 and not _may_fail(cmd):
            print(f"meshcar init-iptables: {shlex.join(cmd)}: {r.stderr.strip()}", file=sys.stderr)
            return 1
    if not args.dry_run:
        print(
            f"meshcar init-iptables: rules installed ({OUT_CHAIN}"
            + (f", {IN_CHAIN})" if args.app_port is not None else ")")
        )
    return 0
