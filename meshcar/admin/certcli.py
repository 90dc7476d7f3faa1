"""`meshcar cert show|renew --admin HOST:PORT`: a sidecar's certificate, via its admin API."""

from __future__ import annotations

import argparse
import json
import sys

import httpx


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="meshcar cert", description="Show or renew a sidecar's SVID."
    )
    parser.add_argument("action", choices=["show", "renew"])
    parser.add_argument(
        "--admin",
        default="127.0.0.1:7201",
        help="the sidecar's admin listener HOST:PORT (default %(default)s)",
    )
    args = parser.parse_args(argv)
    url = f"http://{args.admin}/certs" if args.action == "show" else f"http://{args.admin}/renew"
    try:
        resp = httpx.request("GET" if args.action == "show" else "POST", url, timeout=30)
    except httpx.HTTPError as exc:
        print(f"meshcar cert: cannot reach the admin API at {args.admin}: {exc}", file=sys.stderr)
        return 1
    try:
        data = resp.json()
    except ValueError:
        print(
            f"meshcar cert: unexpected answer {resp.status_code}: {resp.text[:200]}",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(data, indent=2))
    if args.action == "renew" and not data.get("renewed"):
        return 1
    return 0 if resp.status_code == 200 else 1
