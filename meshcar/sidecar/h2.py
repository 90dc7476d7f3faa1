"""HTTP/2 in the sidecar: the role-neutral proxy is `common/h2proxy.py` (h2c from the app,
h2 between sidecars); here, what the inbound speaks to its app (`app.protocol`)."""

from __future__ import annotations

from typing import Any

import trio

from meshcar.common.h2proxy import H2Proxy, MeshPicker
from meshcar.net.pipeline import Forward

__all__ = ["AppPicker", "H2Proxy", "MeshPicker"]


class AppPicker:
    """Inbound: `app.protocol: h2c` is HTTP/2 with prior knowledge to the local app; `http1`
    (None) sends each stream through the inbound's HTTP/1.1 app pool."""

    def __init__(self, cfg: Any, connect_timeout: float = 5.0) -> None:
        self.app = cfg.app
        self.h2c = cfg.app_protocol == "h2c"
        self.connect_timeout = connect_timeout

    def __call__(self, key: str, decision: Forward) -> tuple[Any, Any] | None:
        from meshcar.net.connect import open_tcp

        if not self.h2c:
            return None

        async def open_h2c() -> trio.abc.Stream:
            return await open_tcp(self.app.host, self.app.port, self.connect_timeout)

        return self.app, open_h2c
