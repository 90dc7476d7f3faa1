"""Read a trio stream until the peer closes it (EOF or a broken stream), within a deadline."""

from __future__ import annotations

import trio


async def read_to_close(stream: trio.abc.ReceiveStream, timeout: float = 30) -> bytes:
    """Everything `stream` delivers until it ends; trio.TooSlowError after `timeout` s."""
    out = b""
    with trio.fail_after(timeout):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            out += data
    return out
