"""Hot reload of a role's config file: SIGHUP (net/shell.py) or a file watch -> load and
validate the whole new file -> build the role's new decision objects -> swap them in.

Theory of operation: `Reloader.reload(trigger)` reads the file the process was started with
and parses it with the role's own loader in a worker thread (the event loop keeps serving).
Any error (unreadable file, bad YAML, any key of any section: the loader reports all at once,
with file and key) rejects the reload: nothing was swapped, the running config keeps serving,
and the reason goes to the log (`<role>.config.reload_failed reason=...`), the metrics
(`meshcar_config_reloads_total{result="failure"}`) and `GET /config/status`. A valid file is
handed to the role's `prepare(new)`, which builds every new object (route tables, policies,
allow lists, the edge's SSLContexts from the certificate files read again) and may still
refuse (ConfigError, OSError, ValueError: an unreadable certificate); it returns a
`Prepared`: `commit`, a synchronous function that assigns the new objects (no checkpoint in
it, so no request sees half of a swap); `after`, optional, awaited once the swap is done
and before the success is reported (closing the idle pooled connections of removed
upstreams, opening new listeners; it may add to `restart_required`); and
`restart_required`, the keys that changed but cannot change in a running process (listen
addresses, workers, identity: those keep their running values until a restart, and the log
line and /config/status name them). A request already in flight keeps the objects it
started with.

`watch_loop(seconds)`: every `seconds`, the file's (mtime_ns, size, inode) are compared with
the last seen; a change triggers a reload (a rename-into-place, as Kubernetes ConfigMaps do,
changes the inode). Extra files (the edge's certificates) can be watched the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from meshcar.errors import ConfigError

Cfg = TypeVar("Cfg")


@dataclass
class Prepared:
    commit: Callable[[], None]
    restart_required: list[str] = field(default_factory=list)
    after: Callable[[], Awaitable[None]] | None = None  # once committed (e.g. close old pools)


def restart_keys(old: Any, new: Any, keys: Iterable[str]) -> list[str]:
    """The keys among `keys` whose value differs between two config dataclasses."""
    return [k for k in keys if getattr(old, k) != getattr(new, k)]


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class Reloader(Generic[Cfg]):
    def __init__(
        self,
        role: str,
        source: Path | None,
        load: Callable[[Path], Cfg],
        prepare: Callable[[Cfg], Prepared],
        registry: CollectorRegistry,
        *,
        watch_files: Callable[[], Iterable[Path]] = tuple,
    ) -> None:
        """`source`: the config file (None: the config came from elsewhere, e.g. an
        environment variable, and cannot be read again). `watch_files`: more files whose
        change triggers a reload when watching (the edge's certificates)."""
        self.role = role
        self.source = source
        self.load = load
        self.prepare = prepare
        self.watch_files = watch_files
        self.log = logging.getLogger(f"meshcar.{role}")
        self.reloads = Counter(
            "meshcar_config_reloads",
            "config reloads by result (success, failure)",
            ["result"],
            registry=registry,
        )
        self.last_success = Gauge(
            "meshcar_config_last_reload_success_timestamp_seconds",
            "when the running config was last loaded successfully (the start counts)",
            registry=registry,
        )
        for result in ("success", "failure"):
            self.reloads.labels(result)
        self.last_success.set_to_current_time()
        self.hash = self._read_hash()
        self.loaded_at = time.time()
        self.last: dict[str, Any] | None = None  # the last reload attempt
        self.restart_required: list[str] = []
        self._lock = trio.Lock()

    def _read_hash(self) -> str | None:
        if self.source is None:
            return None
        try:
            return _digest(self.source.read_bytes())
        except OSError:
            return None

    def event(self, name: str, level: int = logging.INFO, **fields: object) -> None:
        self.log.log(
            level, json.dumps({"event": f"{self.role}.config.{name}", **fields}, default=str)
        )

    def status(self) -> dict[str, Any]:
        """GET /config/status (loopback only)."""
        return {
            "source": str(self.source) if self.source else None,
            "hash": self.hash,
            "loaded_at": self.loaded_at,
            "restart_required": self.restart_required,
            "last_reload": self.last,
        }

    async def reload(self, trigger: str = "SIGHUP") -> bool:
        """Load, validate, prepare and swap; True if the new config now serves."""
        async with self._lock:
            try:
                data, prepared = await self._load_and_prepare()
            except (ConfigError, OSError, ValueError) as exc:
                self._failed(trigger, str(exc))
                return False
            except Exception as exc:  # noqa: BLE001 - a bug in a reload never stops the process
                self.log.error(
                    json.dumps(
                        {
                            "event": f"{self.role}.config.reload_bug",
                            "traceback": "".join(traceback.format_exception(exc)),
                        }
                    )
                )
                self._failed(trigger, f"internal error: {type(exc).__name__}: {exc}")
                return False
            prepared.commit()
            if prepared.after is not None:  # the swap is done: close and open what it changed
                try:
                    await prepared.after()
                except Exception as exc:  # noqa: BLE001 - the new config serves already
                    self.event("cleanup_failed", logging.WARNING, error=repr(exc))
            self.hash, self.loaded_at = _digest(data), time.time()
            self.restart_required = prepared.restart_required
            self.reloads.labels("success").inc()
            self.last_success.set_to_current_time()
            self.last = {
                "result": "success",
                "trigger": trigger,
                "at": self.loaded_at,
                "hash": self.hash,
            }
            self.event(
                "reloaded",
                trigger=trigger,
                hash=self.hash,
                restart_required=prepared.restart_required,
            )
            return True

    async def _load_and_prepare(self) -> tuple[bytes, Prepared]:
        if self.source is None:
            raise ConfigError(["the config did not come from a file: nothing to read again"])
        source = self.source

        def read() -> tuple[bytes, Cfg]:
            data = source.read_bytes()
            return data, self.load(source)

        data, new = await trio.to_thread.run_sync(read)
        return data, self.prepare(new)

    def _failed(self, trigger: str, reason: str) -> None:
        self.reloads.labels("failure").inc()
        self.last = {"result": "failure", "trigger": trigger, "at": time.time(), "error": reason}
        self.event(
            "reload_failed",
            logging.ERROR,
            trigger=trigger,
            reason=reason,
            running_hash=self.hash,
        )

    async def watch_loop(self, seconds: float) -> None:
        """Reload when the config file (or a watched file) changes; polled every `seconds`."""
        if self.source is None:
            return
        seen = self._fingerprints()
        while True:
            await trio.sleep(seconds)
            now = self._fingerprints()
            if now != seen:
                seen = now
                await self.reload("file_changed")

    def _fingerprints(self) -> list[tuple[int, int, int] | None]:
        paths = [p for p in (self.source, *self.watch_files()) if p is not None]
        return [_fingerprint(p) for p in paths]
