"""The files an edge config names besides its identity's: each route's certificate, key and
client CA (`meshcar check` and the edge's start-up check them all at once)."""

from __future__ import annotations

from pathlib import Path

from meshcar.common.files import identity_files
from meshcar.edge.config import EdgeConfig


def route_files(cfg: EdgeConfig) -> list[tuple[str, Path]]:
    """(config key, path) of every file of the routes."""
    files = []
    for i, r in enumerate(cfg.routes):
        p = f"routes[{i}] ({r.host})"
        if r.cert_file is not None:
            files.append((f"{p}.tls.cert", r.cert_file))
        if r.key_file is not None:
            files.append((f"{p}.tls.key", r.key_file))
        if r.client_auth is not None:
            files.append((f"{p}.client_auth.ca", r.client_auth.ca_file))
    return files


def edge_files(cfg: EdgeConfig) -> list[tuple[str, Path]]:
    return identity_files(cfg.identity) + route_files(cfg)


def route_cert_problems(cfg: EdgeConfig) -> list[str]:
    """Each route certificate that does not load with its key, naming both files."""
    import ssl

    out = []
    for i, r in enumerate(cfg.routes):
        if r.cert_file is None or r.key_file is None:
            continue
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
                str(r.cert_file), str(r.key_file)
            )
        except (OSError, ssl.SSLError) as exc:
            out.append(
                f"routes[{i}] ({r.host}).tls: certificate {r.cert_file} with key "
                f"{r.key_file} does not load: {exc}"
            )
    return out


def edge_start_problems(cfg: EdgeConfig) -> list[str]:
    """What keeps the edge from starting, all at once: unreadable files, else certificates
    that do not load."""
    from meshcar.common.files import startup_problems

    return startup_problems(edge_files(cfg), cfg.identity) or route_cert_problems(cfg)
