"""A worker's credential taken from worker 0's state dir instead of from the CA (`workers: N`).

Theory of operation: with N workers only worker 0 runs the `Rotator` (identity/rotate.py):
one bootstrap, one renewal per lifetime and one bundle refresh loop per sidecar or edge,
whatever N, so the CA sees the same load as from one process. Workers 1..N-1 run a
`Follower`: it waits until the leader's state dir holds a valid credential of the right
SPIFFE ID (`load_saved`, the check a restart uses), installs it into the worker's own store
(its own 0700 directory: the same key, never written to the leader's files), and then
checks the leader's files once a second (`stat`, no read while nothing changed): a renewal
or a refreshed bundle reaches every worker within about a second. A half-written pair (the
leader writes the key, then the chain) fails to load and is retried at the next check; the
worker keeps serving with the credential it holds.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import ssl
from pathlib import Path

import trio

from meshcar.identity.rotate import RotationMetrics, load_saved
from meshcar.tls.store import Credential, CredentialStore

log = logging.getLogger("meshcar.identity")
CHECK_SECONDS = 1.0


class Follower:
    def __init__(
        self,
        store: CredentialStore,
        leader_dir: Path,
        spiffe_id: str,
        *,
        metrics: RotationMetrics,
        check_seconds: float = CHECK_SECONDS,
    ) -> None:
        self.store = store
        self.leader = CredentialStore(leader_dir)  # read only: its paths, never installed into
        self.spiffe_id = spiffe_id
        self.metrics = metrics
        self.check_seconds = check_seconds
        self.state = "starting"
        self.reason = "waiting for worker 0's certificate"
        self.next_renewal: dt.datetime | None = None  # worker 0 renews
        self._seen: tuple[int, ...] | None = None

    def _stamp(self) -> tuple[int, ...] | None:
        try:
            files = (self.leader.key_file, self.leader.chain_file, self.leader.bundle_file)
            return tuple(os.stat(f).st_mtime_ns for f in files) + tuple(
                os.stat(f).st_size for f in files
            )
        except OSError:
            return None

    def check(self) -> bool:
        """Install the leader's credential if it changed and is valid; True if installed."""
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return False
        cred = load_saved(self.leader, self.spiffe_id)
        if cred is None or _same(cred, self.store.credential):
            self._seen = stamp if cred is not None else None
            return False
        try:
            self.store.install(cred)
        except (OSError, ValueError, ssl.SSLError):  # key and chain of two generations
            return False
        self._seen = stamp
        self.state, self.reason = "valid", "from worker 0"
        self.metrics.cert_not_after.set(cred.not_after.timestamp())
        self.metrics.bundle_version.set(cred.bundle_version)
        self.metrics.identity_expired.set(0)
        log.info(
            json.dumps(
                {
                    "event": "identity.installed",
                    "how": "from worker 0",
                    "spiffe_id": cred.spiffe_id,
                    "serial": cred.serial_hex,
                    "not_after": cred.not_after.isoformat(),
                }
            )
        )
        return True

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        while not self.check():
            await trio.sleep(self.check_seconds / 4)
        task_status.started()
        while True:
            await trio.sleep(self.check_seconds)
            self.check()
            if not self.store.is_valid_now():
                self.state, self.reason = "expired", "worker 0 has no valid certificate"
                self.metrics.identity_expired.set(1)


def _same(a: Credential, b: Credential | None) -> bool:
    return (
        b is not None
        and a.chain_pem == b.chain_pem
        and a.key_pem == b.key_pem
        and a.bundle_pem == b.bundle_pem
        and a.bundle_version == b.bundle_version
    )
