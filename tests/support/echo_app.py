"""An in-process HTTP/1.1 app for integration tests, on h11 (an independent parser).

It answers JSON describing what it received: method, target, headers, body length and a
sha256 of the body, so tests can check exactly what crossed the sidecars. Special paths:
`/status/N` answers with status N, `/bytes/N` streams N bytes (chunked), `/close` answers
with a body delimited by connection close.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial

import h11
import trio


async def _handle(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    continue
                break
            if isinstance(ev, h11.ConnectionClosed) or ev is h11.PAUSED:
                return
            assert isinstance(ev, h11.Request)
            req = ev
            h = hashlib.sha256()
            n = 0
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(ev, h11.Data):
                    h.update(ev.data)
                    n += len(ev.data)
                    continue
                break
            target = req.target.decode()
            info = {
                "method": req.method.decode(),
                "target": target,
                "headers": [[k.decode(), v.decode()] for k, v in req.headers],
                "body_length": n,
                "body_sha256": h.hexdigest(),
            }
            if target.startswith("/sleep/"):
                await trio.sleep(float(target.split("/")[2]))  # the app being slow, on purpose
            if target.startswith("/bytes/"):
                size = int(target.split("/")[2])
                await stream.send_all(
                    conn.send(
                        h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")])
                    )
                )
                block = b"x" * 65536
                left = size
                while left:
                    part = block[: min(left, len(block))]
                    await stream.send_all(conn.send(h11.Data(data=part)))
                    left -= len(part)
                await stream.send_all(conn.send(h11.EndOfMessage()))
            elif target == "/close":
                body = json.dumps(info).encode()
                await stream.send_all(
                    conn.send(h11.Response(status_code=200, headers=[("Connection", "close")]))
                )
                await stream.send_all(conn.send(h11.Data(data=body)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                return
            else:
                status = int(target.split("/")[2]) if target.startswith("/status/") else 200
                body = b"" if status in (204, 304) else json.dumps(info).encode()
                hdrs = [("Content-Type", "application/json")]
                if status not in (204, 304):
                    hdrs.append(("Content-Length", str(len(body))))
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=hdrs)))
                if req.method != b"HEAD" and body:
                    await stream.send_all(conn.send(h11.Data(data=body)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
        return
    finally:
        await trio.aclose_forcefully(stream)


async def serve_echo(nursery: trio.Nursery) -> int:
    """Start the echo app on 127.0.0.1, return its port."""
    listeners = await nursery.start(partial(trio.serve_tcp, _handle, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]
