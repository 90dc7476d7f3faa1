"""A raw TCP client for tests: send bytes (optionally in separate segments), read the answer."""

from __future__ import annotations

import trio


async def raw_exchange(
    port: int, data: bytes, *, pieces: int = 1, wait: float = 5.0, require_close: bool = True
) -> bytes:
    """Everything the server sent until it closed. With `require_close` the server must close
    within `wait` seconds (else the test fails); without, whatever came within `wait`."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        step = max(1, len(data) // pieces)
        for i in range(0, len(data), step):
            await stream.send_all(data[i : i + step])
            if pieces > 1:
                await trio.sleep(0.02)  # separate TCP segments on purpose
        out = b""
        with trio.fail_after(wait) if require_close else trio.move_on_after(wait):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                out += chunk
        return out
