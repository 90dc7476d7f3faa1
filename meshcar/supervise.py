"""`meshcar run --config F -- CMD...`: a sidecar that supervises its app in one process.

The app is started only once the sidecar is ready (it holds a certificate and its
listeners are bound), so it never sees a mesh that is not there yet. SIGTERM and SIGINT are
forwarded to the app, and the sidecar keeps serving while the app shuts down (its last
outbound calls still work). SIGHUP is forwarded to the app too, and reloads the sidecar's
config (common/reload.py). When the app exits, for whatever reason, the sidecar drains the
requests in flight and exits with the app's exit code, so Kubernetes Jobs complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import trio

from meshcar.common.accesslog import setup_logging
from meshcar.errors import ConfigError
from meshcar.sidecar.config import SidecarConfig, load_config
from meshcar.sidecar.main import Sidecar, first_leaf

log = logging.getLogger("meshcar.run")


def exit_code(returncode: int) -> int:
    """A child's return code as a shell would report it (killed by signal N -> 128+N)."""
    return 128 - returncode if returncode < 0 else returncode


async def supervise(cfg: SidecarConfig, cmd: list[str], source: Path | None = None) -> int:
    sidecar = Sidecar(cfg, source=source)  # `source`: read again on SIGHUP (common/reload.py)
    code = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: sidecar.run(task_status, handle_signals=False))
        log.info(json.dumps({"event": "run.starting_app", "cmd": cmd[0]}))
        try:
            proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.DEVNULL)
        except OSError as exc:
            log.error(json.dumps({"event": "run.app_failed_to_start", "error": str(exc)}))
            code = 127
        else:
            nursery.start_soon(_forward_signals, proc, sidecar)
            code = exit_code(await proc.wait())
            log.info(json.dumps({"event": "run.app_exited", "exit_code": code}))
        await sidecar.drain(cfg.drain_seconds)
        nursery.cancel_scope.cancel()
    return code


async def _forward_signals(proc: trio.Process, sidecar: Sidecar) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for sig in signals:
            log.info(
                json.dumps({"event": "run.forwarding_signal", "signal": signal.Signals(sig).name})
            )
            if proc.returncode is None:
                proc.send_signal(sig)
            if sig == signal.SIGHUP:  # the app reloads, and so does the sidecar
                sidecar.shell.services.start_soon(sidecar.reloader.reload, "SIGHUP")
            else:
                # The app is stopping: do not hold idle keep-alive connections open to it
                # (many servers wait for those before they exit).
                await sidecar.inbound.pool.retire()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="meshcar run",
        description="Run an app under a sidecar: start it when ready, exit with it.",
        usage="meshcar run --config FILE -- CMD [ARGS...]",
    )
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("give the app's command after --")
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"meshcar run: {exc}", file=sys.stderr)
        return 2
    if cfg.workers != 1:  # the sidecar beside an app is one process (docs/CONFIG.md)
        print(f"meshcar run: {args.config}: workers: meshcar run runs one worker", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    try:
        return trio.run(supervise, cfg, cmd, args.config)
    except (OSError, BaseExceptionGroup) as exc:
        err = first_leaf(exc)
        if isinstance(err, OSError):
            print(f"meshcar run: {err}", file=sys.stderr)
            return 1
        raise
