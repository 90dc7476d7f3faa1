"""Sidecars issuing from a 3-node OpenBao raft cluster keep renewing when the leader dies.

The cluster is real and not in dev mode: three `bao server` processes with integrated
(raft) storage on loopback, each with its own API and cluster port, joined by `retry_join`
(deploy/vault/raft-node.hcl.example is the same layout, with TLS; plain HTTP on loopback
here), initialised with one key share, every node unsealed, and only used once autopilot
reports it can lose a node (failure tolerance 1). `meshcar ca vault-setup` then creates the
PKI mounts, the per-workload roles and AppRoles through the leader. Each node has a
declarative file audit device writing to its stdout, so its log shows what it signed.

A sidecar pair (web -> api, real processes) issues from the cluster with 20 s certificates
(30 s lifetime with the role's 10 s not_before backdating; renewal about every 10 s) and
lists all three nodes in `identity.vault.addr`, the leader first. Under continuous traffic
(a keep-alive client, a new connection per request, a fresh mTLS handshake per request;
tests/e2e/test_rotation_soak.py's Load), the leader is SIGKILLed; the test waits until each
sidecar has renewed twice after the kill (renewal counters on /metrics, new serials on
/certs), then checks: no failed request, /ready never false, each sidecar switched node
(`identity.vault_node`), and the new leader's audit log has the sign requests.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.e2e.procs import Procs, free_port, meshcar_cmd
from tests.e2e.test_rotation_soak import TD, Load, Mesh, sid, wait_until
from tests.e2e.test_vault_e2e import bao_binary

pytestmark = pytest.mark.e2e

HCL = """\
# one node of a 3-node raft cluster on loopback (deploy/vault/README.md)
ui = false
api_addr = "http://127.0.0.1:{api}"
cluster_addr = "https://127.0.0.1:{cluster}"

listener "tcp" {{
  address = "127.0.0.1:{api}"
  cluster_address = "127.0.0.1:{cluster}"
  tls_disable = true
}}

storage "raft" {{
  path = "{data}"
  node_id = "{name}"
  performance_multiplier = 1
{joins}
}}

audit "file" "stdout" {{
  options {{
    file_path = "stdout"
  }}
}}
"""


@dataclass
class Node:
    name: str
    api: int
    cluster: int
    dir: Path
    proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.api}"

    @property
    def log(self) -> Path:
        return self.dir / f"{self.name}.log"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Cluster:
    dir: Path
    nodes: list[Node]
    unseal_key: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    out: Path = Path()  # vault-setup output (AppRoles, vault-root.pem)

    def start(self, node: Node) -> None:
        log = open(node.log, "ab")
        node.proc = subprocess.Popen(
            [bao_binary(), "server", f"-config={node.dir / 'node.hcl'}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "HOME": str(node.dir)},
        )
        log.close()

    def kill(self, node: Node) -> None:
        assert node.proc is not None
        os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait()

    def stop_all(self) -> None:
        for n in self.nodes:
            if n.alive():
                assert n.proc is not None
                os.killpg(n.proc.pid, signal.SIGTERM)
        for n in self.nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(n.proc.pid, signal.SIGKILL)
                    n.proc.wait()

    def get(self, node: Node, path: str) -> httpx.Response:
        return httpx.get(f"{node.addr}/v1/{path}", headers={"X-Vault-Token": self.token}, timeout=5)

    def seal_status(self, node: Node) -> dict | None:
        if not node.alive():
            raise AssertionError(f"{node.name} exited: {node.log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{node.addr}/v1/sys/seal-status", timeout=2).json()
        except httpx.HTTPError:
            return None

    def unseal(self, node: Node) -> None:
        """Unseal once the node has joined the cluster (retry_join) and knows it is initialised."""

        def unsealed() -> bool:
            st = self.seal_status(node)
            if not st or not st.get("initialized"):
                return False
            if st["sealed"]:
                httpx.put(f"{node.addr}/v1/sys/unseal", json={"key": self.unseal_key}, timeout=5)
                return False
            return True

        wait_until(f"{node.name} to join and unseal", unsealed, timeout=60, interval=0.2)

    def leader(self) -> Node:
        """The active node, as every live node reports it."""

        def agreed() -> Node | None:
            seen = set()
            for n in self.nodes:
                if not n.alive():
                    continue
                try:
                    seen.add(self.get(n, "sys/leader").json().get("leader_address"))
                except (httpx.HTTPError, ValueError):
                    return None
            live = {n.addr: n for n in self.nodes if n.alive()}
            if len(seen) == 1 and (addr := seen.pop()) in live:
                return live[addr]
            return None

        found = wait_until(
            "the live nodes to agree on a live leader", agreed, timeout=60, interval=0.1
        )
        assert isinstance(found, Node)
        return found

    def healthy(self) -> None:
        """All three nodes voters and autopilot able to lose one (failure tolerance >= 1)."""
        last: list[object] = []

        def ok() -> bool:
            try:
                r = self.get(self.leader(), "sys/storage/raft/autopilot/state")
                last[:] = [r.status_code, r.text[:3000]]
                st = r.json()["data"]
            except (httpx.HTTPError, ValueError, KeyError):
                return False
            voters = [
                s
                for s in st["servers"].values()
                if s.get("status") in ("leader", "voter") and s.get("healthy")
            ]
            return bool(st["healthy"]) and st["failure_tolerance"] >= 1 and len(voters) == 3

        try:
            wait_until(
                "autopilot: 3 healthy voters, failure tolerance 1", ok, timeout=90, interval=0.5
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last answer: {last}") from None

    def ensure_all_up(self) -> None:
        for n in self.nodes:
            if not n.alive():
                self.start(n)
        for n in self.nodes:
            self.unseal(n)
        self.healthy()

    def restart_all(self) -> None:
        """Start the nodes that are down, unseal every node, wait for a leader."""
        for n in self.nodes:
            if not n.alive():
                self.start(n)
        for n in self.nodes:
            self.unseal(n)
        self.leader()

    def audited_signs(self, node: Node, role: str) -> int:
        """Certificates `node` issued for `role`, from its audit log. A standby audits the
        errors it answers itself (during an election, "cannot write to readonly storage");
        a request it forwards is audited, and signed, by the active node."""
        count = 0
        for line in node.log.read_text(errors="replace").splitlines():
            if not (line.startswith("{") and f'"path":"pki_int/sign/{role}"' in line):
                continue
            entry = json.loads(line)
            data = entry.get("response", {}).get("data") or {}
            if entry.get("type") == "response" and not entry.get("error") and "certificate" in data:
                count += 1
        return count


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    d = tmp_path_factory.mktemp("bao-raft")
    nodes = [Node(f"bao{i}", free_port(), free_port(), d / f"bao{i}") for i in range(3)]
    joins = "\n".join(f'  retry_join {{\n    leader_api_addr = "{n.addr}"\n  }}' for n in nodes)
    for n in nodes:
        (n.dir / "data").mkdir(parents=True)
        (n.dir / "node.hcl").write_text(
            HCL.format(api=n.api, cluster=n.cluster, data=n.dir / "data", name=n.name, joins=joins)
        )
    c = Cluster(d, nodes)
    try:
        for n in nodes:
            c.start(n)
        first = nodes[0]
        wait_until(
            "bao0 to answer", lambda: c.seal_status(first) is not None, timeout=30, interval=0.1
        )
        r = httpx.put(
            f"{first.addr}/v1/sys/init",
            json={"secret_shares": 1, "secret_threshold": 1},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        init = r.json()
        c.unseal_key, c.token = init["keys_base64"][0], init["root_token"]
        for n in nodes:
            c.unseal(n)
        c.healthy()
        token_file = d / "root.token"
        token_file.write_text(c.token)
        token_file.chmod(0o600)
        c.out = d / "setup"
        r2 = subprocess.run(
            meshcar_cmd(
                "ca",
                "vault-setup",
                "--addr",
                c.leader().addr,
                "--token-file",
                str(token_file),
                "--trust-domain",
                TD,
                "--out",
                str(c.out),
                "--workload",
                "svc/web",
                "--workload",
                "svc/api",
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r2.returncode == 0, r2.stderr
        assert c.token not in r2.stdout + r2.stderr
        yield c
    finally:
        c.stop_all()


def start_pair(
    d: Path,
    c: Cluster,
    addrs: list[str],
    ttl: int,
    fraction: float = 2 / 3,
    pool_idle: float | None = None,
) -> Mesh:
    names = [f"{n}_{k}" for n in ("web", "api") for k in ("app", "in", "out", "admin")]
    ports = {n: free_port() for n in names}
    procs = Procs(d)
    mesh = Mesh(d, procs, ports, [])

    def config(name: str, allow: list[str], upstreams: dict) -> Path:
        role = f"meshcar-svc-{name}"
        cfg = {
            "identity": {
                "spiffe_id": sid(name),
                "state_dir": str(d / f"{name}-state"),
                "ttl_seconds": ttl,
                "renew_fraction": fraction,
                # out of the way: the renewals are what meets the dead node first
                "bundle_refresh_seconds": 300,
                "vault": {
                    "addr": addrs,
                    "role": role,
                    "connect_timeout_seconds": 1,
                    "approle_role_id_file": str(c.out / f"{role}.role-id"),
                    "approle_secret_id_file": str(c.out / f"{role}.secret-id"),
                },
            },
            "app": {"port": ports[f"{name}_app"]},
            "inbound": {"listen": f"127.0.0.1:{ports[f'{name}_in']}", "allow": allow},
            "outbound": {"listen": f"127.0.0.1:{ports[f'{name}_out']}", "upstreams": upstreams},
            "admin": {"listen": f"127.0.0.1:{ports[f'{name}_admin']}"},
        }
        if pool_idle is not None:
            cfg["outbound"]["pool_idle_seconds"] = pool_idle
        path = d / f"{name}.yaml"
        path.write_text(json.dumps(cfg))
        return path

    try:
        procs.start("api-app", "demo-app", "--name", "api", "--port", str(ports["api_app"]))
        procs.start("api-sidecar", "sidecar", "--config", str(config("api", [sid("web")], {})))
        procs.start(
            "web-sidecar",
            "sidecar",
            "--config",
            str(
                config(
                    "web",
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
            procs.wait_http(f"{mesh.admin(n)}/ready", name=f"{n}-sidecar", timeout=30)
    except BaseException:
        procs.stop_all()
        raise
    return mesh


def node_switches(mesh: Mesh, name: str) -> list[dict]:
    out = []
    for line in mesh.procs.log(f"{name}-sidecar").splitlines():
        m = re.search(r'\{"event": "identity\.vault_node".*\}', line)
        if m:
            out.append(json.loads(m.group(0)))
    return out


def test_leader_killed_while_sidecars_renew_zero_failed_requests(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.ensure_all_up()
    old = cluster.leader()
    addrs = [old.addr] + [n.addr for n in cluster.nodes if n is not old]
    mesh = start_pair(tmp_path, cluster, addrs, ttl=20)
    try:
        for n in ("web", "api"):
            issuer = mesh.chain(n)[0].issuer.rfc4514_string()
            assert issuer == f"CN=meshcar vault intermediate CA {TD}", issuer
        vault_root = x509.load_pem_x509_certificates((cluster.out / "vault-root.pem").read_bytes())
        with Load(mesh) as load:
            # renewals are going on (through the leader) before it dies
            wait_until(
                "a renewal by each sidecar before the kill",
                lambda: all(mesh.renewals(n) >= 1 for n in ("web", "api")),
                timeout=60,
            )
            # kill it just before web's next renewal is due (only picks the moment: the
            # checks below hold whenever it happens)
            wait_until(
                "web's renewal to be a second away",
                lambda: (
                    dt.datetime.fromisoformat(mesh.certs("web")["next_renewal"])
                    - dt.datetime.now(dt.UTC)
                    < dt.timedelta(seconds=1)
                ),
                timeout=30,
                interval=0.05,
            )
            cluster.kill(old)
            killed_at = time.monotonic()
            # read after the kill: whatever is counted from here was signed after it
            at_kill = {n: mesh.renewals(n) for n in ("web", "api")}
            serials = {n: {mesh.certs(n)["serial"]} for n in ("web", "api")}
            audited_before = {
                (node.name, n): cluster.audited_signs(node, f"meshcar-svc-{n}")
                for node in cluster.nodes
                if node is not old
                for n in ("web", "api")
            }
            new = cluster.leader()
            assert new is not old
            standby = next(n for n in cluster.nodes if n is not old and n is not new)

            def renewed_twice() -> bool:
                done = all(mesh.renewals(n) >= at_kill[n] + 2 for n in ("web", "api"))
                for n in ("web", "api"):  # after the counters: a counted renewal is installed
                    serials[n].add(mesh.certs(n)["serial"])
                return done

            wait_until("two renewals by each sidecar after the kill", renewed_twice, timeout=90)
            took = time.monotonic() - killed_at
        load.assert_clean()
        failed_renewals = {n: mesh.renewals(n, "failure") for n in ("web", "api")}
        print(
            json.dumps(
                {
                    "vault_ha": {
                        **load.summary(),
                        "renewals_after_kill_s": round(took, 1),
                        "failed_renewal_attempts": failed_renewals,
                        "old_leader": old.name,
                        "new_leader": new.name,
                    }
                }
            )
        )
        for n in ("web", "api"):
            assert len(serials[n]) >= 3, serials[n]  # the one held at the kill and two new ones
            # every switch went away from the dead node, to one that answered
            switches = node_switches(mesh, n)
            assert (
                switches
                and switches[-1]["previous"] == old.addr
                and switches[-1]["addr"] != old.addr
            )
            assert all(s["addr"] != old.addr for s in switches)
            # ... met by a renewal (sign), not by a bundle refresh
            assert f"/v1/pki_int/sign/meshcar-svc-{n}" in switches[-1]["failed"][0]
            # the new leader signed the renewals (forwarded to it if a standby was asked)
            assert cluster.audited_signs(new, f"meshcar-svc-{n}") >= audited_before[new.name, n] + 2
            assert (
                cluster.audited_signs(standby, f"meshcar-svc-{n}")
                == audited_before[standby.name, n]
            )
            assert (
                mesh.chain(n)[0].issuer.rfc4514_string() == f"CN=meshcar vault intermediate CA {TD}"
            )
            bundle = x509.load_pem_x509_certificates(
                (tmp_path / f"{n}-state" / "bundle.pem").read_bytes()
            )
            assert bundle == vault_root
        for name, p in mesh.procs.procs:
            assert p.poll() is None, f"{name} exited"
    finally:
        mesh.procs.stop_all()


def _offsets(entries: list[str]) -> list[float]:
    """The time offsets (seconds since the load started) of Load's failure records."""
    return [float(m.group(1)) for e in entries if (m := re.match(r"([\d.]+)s ", e))]


@pytest.mark.soak
def test_whole_cluster_down_shorter_then_longer_than_the_lifetime(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Every node down (a whole-cluster outage), twice. Certificates: 30 s TTL, 40 s
    lifetime with the role's 10 s backdating, renewed at 0.3 of it (about every 2 s, so an
    attempt meets the outage at once and 28 s of validity are left). Shorter than what is
    left: no failed request at all. Longer than the lifetime: requests fail only while no
    valid certificate exists (from the first expiry until both sidecars hold a new one), and
    the sidecars recover by themselves with their AppRole once the cluster is back."""
    cluster.ensure_all_up()
    mesh = start_pair(tmp_path, cluster, [n.addr for n in cluster.nodes], ttl=30, fraction=0.3)
    names = ("web", "api")
    report: dict[str, object] = {}
    try:
        # 1. shorter than the lifetime
        with Load(mesh) as load:
            at = {n: mesh.renewals(n) for n in names}
            wait_until(
                "a renewal by each sidecar",
                lambda: all(mesh.renewals(n) > at[n] for n in names),
                30,
            )
            down_at = time.monotonic()
            for node in cluster.nodes:
                cluster.kill(node)
            failed = {n: mesh.renewals(n, "failure") for n in names}
            wait_until(
                "each sidecar's renewal to meet the outage",
                lambda: all(mesh.renewals(n, "failure") > failed[n] for n in names),
                30,
            )
            cluster.restart_all()
            up_at = time.monotonic()
            at = {n: mesh.renewals(n) for n in names}
            wait_until(
                "a renewal by each sidecar after the outage",
                lambda: all(mesh.renewals(n) > at[n] for n in names),
                30,
            )
        load.assert_clean()
        report["short"] = {**load.summary(), "outage_s": round(up_at - down_at, 1)}

        # 2. longer than the lifetime
        with Load(mesh) as load:
            for node in cluster.nodes:
                cluster.kill(node)
            # when the held certificates end, in the load's clock
            offset = time.monotonic() - load.started
            now = dt.datetime.now(dt.UTC)
            first_expiry = offset + min(
                (dt.datetime.fromisoformat(mesh.certs(n)["not_after"]) - now).total_seconds()
                for n in names
            )
            wait_until(
                "both sidecars to report an expired identity",
                lambda: all(mesh.metric(n, "meshcar_identity_expired") == 1 for n in names),
                60,
            )
            assert all(mesh.certs(n)["state"] == "expired" for n in names)
            assert all(
                httpx.get(f"{mesh.admin(n)}/ready", timeout=5).status_code == 503 for n in names
            )
            cluster.restart_all()
            back = time.monotonic() - load.started
            wait_until(
                "both sidecars valid again",
                lambda: all(
                    mesh.certs(n)["state"] == "valid"
                    and mesh.metric(n, "meshcar_identity_expired") == 0
                    for n in names
                ),
                90,
            )
            recovered = time.monotonic() - load.started
            # traffic is served again on every kind of connection
            ok_before = dict(load.ok)
            wait_until(
                "every stream to succeed again",
                lambda: all(
                    load.ok[s] > ok_before.get(s, 0) + 5 for s in ("pooled", "fresh", "mtls")
                ),
                30,
            )
        for n in names:
            log = mesh.procs.log(f"{n}-sidecar")
            assert '"how": "re-bootstrapped after expiry"' in log, log[-3000:]
        # failures only between the first expiry and the recovery (1 s for the second-granular
        # not_after and a request in flight at the edges)
        fail_at = _offsets(load.failures) + _offsets(load.not_ready)
        outside = [t for t in fail_at if not first_expiry - 1 <= t <= recovered + 1]
        assert not outside, (first_expiry, recovered, [f for f in load.failures if f][:5])
        report["long"] = {
            **load.summary(),
            "first_expiry_s": round(first_expiry, 1),
            "cluster_back_s": round(back, 1),
            "recovered_s": round(recovered, 1),
            "recovery_after_cluster_back_s": round(recovered - back, 1),
            "failed_requests_in_window": len(load.failures),
        }
        print(json.dumps({"vault_outage": report}))
        for name, p in mesh.procs.procs:
            assert p.poll() is None, f"{name} exited"
    finally:
        mesh.procs.stop_all()
