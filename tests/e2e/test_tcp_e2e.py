"""Opaque TCP acceptance (issue 13): Debian's PostgreSQL and MariaDB, started here on loopback,
reached through two real sidecar processes (`protocol: tcp` upstreams -> mTLS -> `inbound.tcp`)
with `psql`, psycopg and the `mariadb` client (MariaDB speaks first: its greeting must cross
before the client sends a byte); a third sidecar with a valid mesh identity that is not on the
allow list is refused at the authorization step, before the database is dialed.

The servers run as their own system users (`runuser`), with data and sockets in a temporary
directory; they are installed by `.ci/run` (postgresql, postgresql-client, mariadb-server,
mariadb-client).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import Procs, ca_init, ca_token, free_port, sidecar_identity

pytestmark = pytest.mark.e2e
TD = "meshcar.demo"
PG_PASSWORD = "mesh-secret"


def sid(n: str) -> str:
    return f"spiffe://{TD}/svc/{n}"


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else None


def _missing() -> str | None:
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        return "needs root and runuser to start PostgreSQL/MariaDB as their system users"
    for tool in ("psql", "mariadb", "mariadb-install-db", "mariadbd"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} not installed (apt-get install postgresql-client mariadb-server)"
    if _pg_bin("initdb") is None:
        return "PostgreSQL server not installed (apt-get install postgresql)"
    return None


def _wait(check, what: str, timeout: float = 60.0) -> None:
    """Poll an observable readiness check (not a sleep used as synchronisation)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        ok, last = check()
        if ok:
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not ready after {timeout}s: {last}")


def _run(*cmd: str, user: str | None = None, **kw) -> subprocess.CompletedProcess:
    full = ["runuser", "-u", user, "--", *cmd] if user else list(cmd)
    return subprocess.run(full, capture_output=True, text=True, timeout=120, **kw)


@dataclass
class Servers:
    pg_port: int
    maria_port: int


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    why = _missing()
    if why:
        pytest.skip(why)
    # not under pytest's tmp_path: its parents are 0700 root, the servers run as other users
    root = Path(tempfile.mkdtemp(prefix="meshcar-tcp-db-"))
    root.chmod(0o755)
    procs: list[subprocess.Popen] = []
    try:
        pg_dir, pg_sock = root / "pg", root / "pg-sock"
        for d in (pg_dir, pg_sock):
            d.mkdir()
            shutil.chown(d, "postgres", "postgres")
        pwfile = root / "pg-pw"
        pwfile.write_text(PG_PASSWORD + "\n")
        shutil.chown(pwfile, "postgres", "postgres")
        r = _run(
            _pg_bin("initdb") or "initdb",
            "-D",
            str(pg_dir),
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            user="postgres",
        )
        assert r.returncode == 0, r.stdout + r.stderr
        pg_port = free_port()
        pg_log = open(root / "postgres.log", "wb")
        procs.append(
            subprocess.Popen(
                [
                    "runuser",
                    "-u",
                    "postgres",
                    "--",
                    _pg_bin("postgres") or "postgres",
                    "-D",
                    str(pg_dir),
                    "-p",
                    str(pg_port),
                    "-k",
                    str(pg_sock),
                    "-c",
                    "listen_addresses=127.0.0.1",
                ],
                stdout=pg_log,
                stderr=subprocess.STDOUT,
            )
        )
        pg_log.close()  # the child holds its own descriptor
        _wait(
            lambda: (
                (
                    r := _run("pg_isready", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres")
                ).returncode
                == 0,
                r.stdout + (root / "postgres.log").read_text(errors="replace")[-500:],
            ),
            "postgres",
        )

        maria_dir = root / "maria"
        maria_dir.mkdir()
        shutil.chown(maria_dir, "mysql", "mysql")
        r = _run(
            "mariadb-install-db",
            f"--datadir={maria_dir}",
            "--user=mysql",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        )
        assert r.returncode == 0, r.stdout + r.stderr
        maria_port = free_port()
        maria_log = open(root / "mariadb.log", "wb")
        mariadbd = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
        procs.append(
            subprocess.Popen(
                [
                    mariadbd,
                    "--no-defaults",
                    f"--datadir={maria_dir}",
                    "--user=mysql",
                    "--bind-address=127.0.0.1",
                    f"--port={maria_port}",
                    f"--socket={maria_dir}/mysqld.sock",
                    f"--pid-file={maria_dir}/mysqld.pid",
                    "--skip-name-resolve",
                    "--skip-log-bin",
                ],
                stdout=maria_log,
                stderr=subprocess.STDOUT,
            )
        )
        maria_log.close()
        # grant root over TCP from loopback (install-db makes only root@localhost)
        sock = f"--socket={maria_dir}/mysqld.sock"
        _wait(
            lambda: (
                (r := _run("mariadb-admin", sock, "-u", "root", "ping")).returncode == 0,
                r.stdout + r.stderr,
            ),
            "mariadb",
        )
        r = _run(
            "mariadb",
            sock,
            "-u",
            "root",
            "-e",
            "CREATE USER 'mesh'@'127.0.0.1' IDENTIFIED BY 'mesh-pw';"
            "GRANT ALL ON *.* TO 'mesh'@'127.0.0.1'; CREATE DATABASE meshtest;",
        )
        assert r.returncode == 0, r.stderr
        yield Servers(pg_port, maria_port)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Mesh:
    dir: Path
    procs: Procs
    ports: dict[str, int]


def _sidecar(d: Path, name: str, ports: dict[str, int], inbound: dict, upstreams: dict) -> Path:
    cfg = {
        "identity": sidecar_identity(d, name, sid(name), ports["ca"]),
        "app": {"port": ports[f"{name}_app"]},
        "inbound": {"listen": f"127.0.0.1:{ports[f'{name}_in']}", **inbound},
        "outbound": {"upstreams": upstreams},
        "admin": {"listen": f"127.0.0.1:{ports[f'{name}_admin']}"},
    }
    path = d / f"{name}.yaml"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def mesh(servers: Servers, tmp_path_factory) -> Iterator[Mesh]:
    d = tmp_path_factory.mktemp("tcp-mesh")
    names = ["ca", "pg_local", "maria_local", "evil_pg_local"] + [
        f"{n}_{k}" for n in ("db", "web", "evil") for k in ("app", "in", "admin")
    ]
    ports = {n: free_port() for n in names}
    ca_init(d / "ca", TD)
    for n in ("db", "web", "evil"):
        (d / f"{n}.token").write_text(ca_token(d / "ca", sid(n)))
    db_in = f"127.0.0.1:{ports['db_in']}"

    def tcp_up(local: str, target: int) -> dict:
        return {
            "protocol": "tcp",
            "endpoints": [db_in],
            "spiffe_id": sid("db"),
            "local_port": ports[local],
            "target_port": target,
        }

    db_cfg = _sidecar(
        d,
        "db",
        ports,
        {
            "allow": [sid("web")],
            "tcp": [{"port": servers.pg_port}, {"port": servers.maria_port}],
        },
        {},
    )
    web_cfg = _sidecar(
        d,
        "web",
        ports,
        {},
        {
            "pg": tcp_up("pg_local", servers.pg_port),
            "maria": tcp_up("maria_local", servers.maria_port),
        },
    )
    evil_cfg = _sidecar(d, "evil", ports, {}, {"pg": tcp_up("evil_pg_local", servers.pg_port)})
    procs = Procs(d)
    try:
        procs.start_ca(d / "ca", ports["ca"])
        for n, cfg in (("db", db_cfg), ("web", web_cfg), ("evil", evil_cfg)):
            procs.start(f"{n}-sidecar", "sidecar", "--config", str(cfg))
        for n in ("db", "web", "evil"):
            procs.wait_ready(ports[f"{n}_admin"], f"{n}-sidecar")
        yield Mesh(d, procs, ports)
    finally:
        procs.stop_all()


def _metrics(mesh: Mesh, name: str) -> str:
    return httpx.get(f"http://127.0.0.1:{mesh.ports[f'{name}_admin']}/metrics").text


def _sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = ",".join(sorted(line[len(name) + 1 : line.index("}")].split(",")))
            if got == want:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _psql(port: int, sql: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "psql",
            f"host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable",
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-c",
            sql,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PGPASSWORD": PG_PASSWORD, "PGCONNECT_TIMEOUT": "10"},
    )


def test_psql_through_the_mesh(mesh: Mesh, servers: Servers) -> None:
    port = mesh.ports["pg_local"]
    r = _psql(
        port,
        "CREATE TABLE IF NOT EXISTS t (id int, body text); INSERT INTO t VALUES (1, 'over mtls');"
        "SELECT body FROM t WHERE id = 1; SELECT inet_client_addr();",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert "over" in lines and "127.0.0.1" in lines, r.stdout  # the db sidecar dialed it
    text = _metrics(mesh, "db")
    assert (
        _sample(
            text,
            "meshcar_tcp_connections_total",
            direction="inbound",
            target=str(servers.pg_port),
            result="closed",
        )
        >= 1
    ), text


def test_python_driver_through_the_mesh(mesh: Mesh) -> None:
    psycopg = pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]' (test extra)")
    blob = os.urandom(3 * 1024 * 1024)
    with psycopg.connect(
        host="127.0.0.1",
        port=mesh.ports["pg_local"],
        user="postgres",
        password=PG_PASSWORD,
        dbname="postgres",
        sslmode="disable",
        connect_timeout=10,
    ) as conn:
        conn.execute("CREATE TEMP TABLE b (id int, data bytea)")
        with conn.cursor() as cur:
            with cur.copy("COPY b (id, data) FROM STDIN") as copy:
                for i in range(500):
                    copy.write_row((i, b"x" * 100))
            cur.execute("INSERT INTO b VALUES (-1, %s)", (blob,))
            cur.execute("SELECT count(*) FROM b WHERE id >= 0")
            assert cur.fetchone() == (500,)
            cur.execute("SELECT data FROM b WHERE id = -1")
            row = cur.fetchone()
            assert row is not None and bytes(row[0]) == blob
        # LISTEN/NOTIFY: the server sends on its own initiative over the open tunnel
        conn.commit()
        conn.autocommit = True
        conn.execute("LISTEN meshcar")
        conn.execute("NOTIFY meshcar, 'hello'")
        note = next(conn.notifies(timeout=10))
        assert note.payload == "hello"


def test_mariadb_speaks_first_through_the_mesh(mesh: Mesh) -> None:
    r = subprocess.run(
        [
            "mariadb",
            "--no-defaults",
            "--protocol=TCP",
            "-h",
            "127.0.0.1",
            "-P",
            str(mesh.ports["maria_local"]),
            "-u",
            "mesh",
            "-pmesh-pw",
            "--connect-timeout=10",
            "-N",
            "-e",
            "CREATE TABLE meshtest.k (v varchar(20)); INSERT INTO meshtest.k VALUES ('greeted');"
            "SELECT v, 6*7 FROM meshtest.k;",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["greeted", "42"], r.stdout


def test_caller_not_on_the_allow_list_is_refused(mesh: Mesh, servers: Servers) -> None:
    before = _sample(_metrics(mesh, "db"), "meshcar_authz_denials_total", peer=sid("evil"))
    r = _psql(mesh.ports["evil_pg_local"], "SELECT 1")
    assert r.returncode != 0
    assert "server closed the connection unexpectedly" in r.stderr, r.stderr
    text = _metrics(mesh, "db")
    assert _sample(text, "meshcar_authz_denials_total", peer=sid("evil")) == before + 1, text
    assert (
        _sample(
            text, "meshcar_tcp_connections_total", direction="inbound", target="-", result="denied"
        )
        >= 1
    )
    deadline = time.monotonic() + 10  # the access log is flushed every 0.2 s
    while time.monotonic() < deadline:
        log = mesh.procs.log("db-sidecar")
        denied = [
            json.loads(x)
            for x in log.splitlines()
            if x.startswith("{") and '"tcp"' in x and '"denied"' in x
        ]
        if denied:
            break
        time.sleep(0.1)
    assert denied and denied[-1]["peer"] == sid("evil"), log[-2000:]
    assert "is not allowed to call" in denied[-1]["error"]
    # the allowed caller still works
    assert _psql(mesh.ports["pg_local"], "SELECT 1").stdout.strip() == "1"
