"""`meshcar` commands whose reader goes away (`| head`) stop quietly, without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_closed_stdout_pipe_is_exit_141_without_a_traceback() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the first write gets EPIPE
    try:
        r = subprocess.run(
            [sys.executable, "-m", "meshcar.cli", "config", "schema", "edge"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert r.returncode == 141, r.stderr.decode()
    assert b"Traceback" not in r.stderr and b"BrokenPipeError" not in r.stderr
