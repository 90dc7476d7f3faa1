"""tests/support/ports.py: each test process owns its port block (flock), ports handed out once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support import ports

ROOT = Path(__file__).resolve().parents[2]


def test_ports_are_unique_free_and_outside_the_ephemeral_range() -> None:
    got = ports.free_ports(150)  # more than one block
    assert len(set(got)) == 150
    assert all(ports.LOW <= p < ports.HIGH for p in got)
    assert all(ports._bindable(p, "127.0.0.1") for p in got)


def test_another_process_never_gets_a_block_this_one_holds() -> None:
    mine = ports.free_port() // ports.BLOCK * ports.BLOCK
    # The child tries our block first; the flock must make it take another one.
    child = textwrap.dedent(f"""
        import random
        from tests.support import ports
        random.shuffle = lambda blocks: blocks.sort(key=lambda b: b != {mine})
        print(ports.free_port())
    """)
    out = subprocess.run(
        [sys.executable, "-c", child],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    theirs = int(out.stdout)
    assert not (mine <= theirs < mine + ports.BLOCK)
