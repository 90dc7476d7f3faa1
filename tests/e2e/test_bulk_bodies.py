"""A 1 GB body crosses a real sidecar pair each way, in bounded memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import Procs, free_port, meshcar_cmd
from tests.e2e.test_sidecar_e2e import TD, _sidecar_cfg, _token, sid

pytestmark = pytest.mark.e2e
GB = 1 << 30
SINK = str(Path(__file__).parent.parent / "support" / "sink_app.py")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_one_gigabyte_each_way(tmp_path: Path) -> None:
    ports = {
        n: free_port()
        for n in ["ca"]
        + [f"{s}_{k}" for s in ("web", "api") for k in ("app", "in", "out", "admin")]
    }
    subprocess.run(
        meshcar_cmd("ca", "init", "--dir", str(tmp_path / "ca"), "--trust-domain", TD),
        check=True,
        capture_output=True,
    )
    for n in ("api", "web"):
        (tmp_path / f"{n}.token").write_text(_token(tmp_path / "ca", n))
    procs = Procs(tmp_path)
    sink: subprocess.Popen | None = None
    try:
        procs.start(
            "ca",
            "ca",
            "serve",
            "--dir",
            str(tmp_path / "ca"),
            "--listen",
            f"127.0.0.1:{ports['ca']}",
        )
        procs.wait_http(
            f"https://127.0.0.1:{ports['ca']}/healthz", verify=str(tmp_path / "ca" / "root.pem")
        )
        sink = subprocess.Popen([sys.executable, SINK, str(ports["api_app"])])
        api = procs.start(
            "api",
            "sidecar",
            "--config",
            str(_sidecar_cfg(tmp_path, "api", ports, [sid("web")], {})),
        )
        web = procs.start(
            "web",
            "sidecar",
            "--config",
            str(
                _sidecar_cfg(
                    tmp_path,
                    "web",
                    ports,
                    [],
                    {
                        "api": {
                            "endpoints": [f"127.0.0.1:{ports['api_in']}"],
                            "spiffe_id": sid("api"),
                        }
                    },
                )
            ),
        )
        for n in ("api", "web"):
            procs.wait_http(f"http://127.0.0.1:{ports[f'{n}_admin']}/ready")
        block = b"\xa5" * (1 << 20)

        def upload():
            for _ in range(GB // len(block)):
                yield block

        with httpx.Client(proxy=f"http://127.0.0.1:{ports['web_out']}", timeout=120) as c:
            r = c.post("http://api/upload", content=upload(), headers={"Content-Length": str(GB)})
            assert r.status_code == 200 and r.json() == {"received": GB}
            got = 0
            with c.stream("GET", f"http://api/bytes/{GB}") as resp:
                assert resp.status_code == 200
                for chunk in resp.iter_raw(1 << 20):
                    got += len(chunk)
            assert got == GB
        for p in (api, web):
            assert peak_rss_mib(p.pid) < 200, f"sidecar peak RSS {peak_rss_mib(p.pid):.0f} MiB"
    finally:
        procs.stop_all()
        if sink is not None:
            sink.kill()
            sink.wait()
