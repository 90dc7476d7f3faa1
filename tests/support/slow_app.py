"""A test app for `meshcar run`: records the sidecar's readiness at start, serves /slow
(takes 1.5 s, to be in flight during a drain), and on SIGTERM finishes what is in flight
before exiting 0. Usage: slow_app.py PORT READY_URL STATE_FILE [EXIT_CODE]"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, ready_url, state_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
exit_after_start = int(sys.argv[4]) if len(sys.argv) > 4 else None

try:
    with urllib.request.urlopen(ready_url, timeout=5) as r:
        ready = r.status
except Exception as exc:  # noqa: BLE001 - recorded for the test to see
    ready = repr(exc)
with open(state_file, "a") as f:
    f.write(json.dumps({"event": "started", "sidecar_ready": ready}) + "\n")
if exit_after_start is not None:
    sys.exit(exit_after_start)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/slow":
            with open(state_file, "a") as f:
                f.write(json.dumps({"event": "slow_started"}) + "\n")
            time.sleep(1.5)
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
server.daemon_threads = False
server.block_on_close = True
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
server.serve_forever()
server.server_close()  # joins the handler threads: in-flight requests finish
with open(state_file, "a") as f:
    f.write(json.dumps({"event": "stopped"}) + "\n")
