"""/metrics of every worker of `workers: N` in one exposition, each sample labelled `worker`.

Theory of operation: worker 0 serves the admin listener (net/workers.py). The other workers
each serve their own admin server on an ephemeral loopback port they publish on the board;
worker 0's /metrics fetches theirs (plain HTTP on loopback, at most `FETCH_SECONDS` each)
and merges them with its own: every sample gains a `worker="i"` label and the families are
regrouped by name, so `sum without (worker) (...)` gives the role's totals. A worker that does
not answer (restarting) is left out of that scrape; its counters start again at 0 after a
restart, which Prometheus' rate() treats as a counter reset.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

FETCH_SECONDS = 2.0
MAX_BYTES = 16 << 20


def merge(texts: dict[int, str]) -> bytes:
    """One exposition of several workers' expositions, each sample labelled `worker`."""
    families: dict[str, Metric] = {}
    for worker, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            into = families.get(fam.name)
            if into is None:
                into = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            into.samples.extend(
                s._replace(labels={**s.labels, "worker": str(worker)}) for s in fam.samples
            )

    class _Merged:
        def collect(self) -> list[Metric]:
            return list(families.values())

    return generate_latest(_Merged())  # type: ignore[arg-type]


async def fetch_metrics(port: int) -> str | None:
    """GET /metrics from a worker's loopback admin port; None if it does not answer."""
    with trio.move_on_after(FETCH_SECONDS):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return None
        async with stream:
            await stream.send_all(
                b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
            data = bytearray()
            while len(data) < MAX_BYTES:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return None
                if not chunk:
                    break
                data += chunk
        head, _, body = bytes(data).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return None
        return body.decode("utf-8", "replace")
    return None


def merged_metrics(
    own: Callable[[], bytes], ports: Callable[[], dict[int, int]], index: int = 0
) -> Callable[[], Awaitable[bytes]]:
    """The /metrics hook of worker `index`: its own registry and every other worker's."""

    async def render() -> bytes:
        texts = {index: own().decode()}
        for worker, port in sorted(ports().items()):
            text = await fetch_metrics(port)
            if text is not None:
                texts[worker] = text
        return merge(texts)

    return render
