"""Command line entry point: parse the command name and hand over to the module that owns it.

Each command's module exposes `main(argv) -> int`; imports are lazy so that `meshcar ca ...`
does not load the sidecar and vice versa.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str, str]] = {
    # name: (module, function, one-line help)
    "ca": ("meshcar_ca.cli", "main", "certificate authority: init, serve, token"),
    "sidecar": ("meshcar.sidecar.main", "main", "run a sidecar (mTLS inbound + outbound proxy)"),
    "edge": ("meshcar.edge.main", "main", "run the edge (terminate / bridge / passthrough)"),
    "demo": (
        "meshcar.demo.runner",
        "main",
        "run the demo scenario on loopback (--check verifies it)",
    ),
    "inject": ("meshcar.inject.cli", "main", "add the sidecar to Kubernetes manifests"),
    "webhook": ("meshcar.inject.webhook", "main", "mutating admission webhook for injection"),
    "install": (
        "meshcar.inject.install",
        "main",
        "print the control plane's manifests (CA, webhook, RBAC, NetworkPolicies)",
    ),
    "init-iptables": (
        "meshcar.inject.iptables",
        "main",
        "install a pod's transparent-capture rules (init container)",
    ),
    "run": (
        "meshcar.supervise",
        "main",
        "run an app under a sidecar: start when ready, exit with it",
    ),
    "cert": ("meshcar.admin.certcli", "main", "show or renew a sidecar's certificate"),
    "config": (
        "meshcar.configcli",
        "main",
        "config JSON Schema (schema sidecar|edge), validate FILE (CI)",
    ),
    "check": (
        "meshcar.checkcli",
        "main",
        "check a config and its files, CA, certificates, ports and peers",
    ),
    "dashboard": (
        "meshcar.dashboard.main",
        "main",
        "a web page of the mesh: services, calls, certificates, routes, live tail",
    ),
    "demo-app": ("meshcar.demo.app", "main", "the small JSON demo app of the scenario"),
}


def _usage() -> str:
    lines = ["usage: meshcar COMMAND [ARGS...]", "", "commands:"]
    for name, (_, _, text) in COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name == "--version":
        from meshcar import __version__

        print(__version__)
        return 0
    if name not in COMMANDS:
        print(f"meshcar: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            print(f"meshcar: command {name!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    try:
        result = getattr(mod, func)(rest)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (`meshcar config schema edge | head`): stop quietly, as
        # coreutils do; stdout is pointed at /dev/null so the exit flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
