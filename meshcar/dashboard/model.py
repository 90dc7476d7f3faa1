"""The mesh as the dashboard shows it, computed from what the admin endpoints answered (pure).

Input: one `Snapshot` per target (a sidecar or the edge): its /certs, /ready, /metrics text,
/requests/recent entries and, for the edge, /routes. Output: `build_mesh`'s JSON-able dict:

- services: every target (role, readiness, identity and time to expiry, per-direction request
  count, success rate and p50/p99 from the `meshcar_request_duration_seconds` histogram) and
  every other node an edge names;
- edges: caller -> callee with requests, success rate and p50/p99 over the recent entries
  (the access log's ring buffer): a sidecar's inbound entries name the caller's SPIFFE ID
  (`peer`), its outbound entries the upstream, the edge's entries the route. Where the
  process counts `meshcar_peer_requests_total{direction,peer,code}`, an edge's requests and
  success rate are those counters (since the process started; `source: "metrics"`) and only
  its latency comes from the recent entries (there is no per-peer histogram);
- routes: the edge's routes grouped by mode, with their `meshcar_edge_requests` counts
  (passthrough routes: `meshcar_edge_connections`, connections that ended, `closed` counting
  as success);
- tail: the newest entries of every target, newest first.

Success is any answered status below 500 (a 4xx is the caller's problem, as Linkerd counts).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

TAIL_MAX = 60


@dataclass
class Snapshot:
    name: str
    url: str
    error: str | None = None
    ready: bool | None = None
    ready_reason: str = ""
    certs: dict = field(default_factory=dict)
    metrics: str = ""
    recent: list[dict] = field(default_factory=list)
    routes: list[dict] | None = None  # the edge's GET /routes; None: not an edge


Sample = tuple[str, dict[str, str], float]


def parse_metrics(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition: (sample name, labels, value)."""
    out: list[Sample] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.append((s.name, dict(s.labels), float(s.value)))
    return out


def is_success(status: object) -> bool:
    try:
        code = int(status)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False
    return 0 < code < 500


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over (upper bound, cumulative count) buckets: linear
    interpolation inside the bucket the rank falls in; None without observations."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le  # the rank is past the highest finite bound
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def sample_quantile(q: float, values: list[float]) -> float | None:
    """Nearest-rank quantile of raw samples; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def direction_stats(samples: list[Sample]) -> dict[str, dict]:
    """Per direction (inbound, outbound, edge-terminate, ...): requests, success rate, p50/p99
    in milliseconds, from `meshcar_requests_total` and the duration histogram."""
    counts: dict[str, list[float]] = {}  # direction -> [total, ok]
    buckets: dict[str, list[tuple[float, float]]] = {}
    for name, labels, value in samples:
        d = labels.get("direction", "")
        if name == "meshcar_requests_total":
            c = counts.setdefault(d, [0.0, 0.0])
            c[0] += value
            if is_success(labels.get("status")):
                c[1] += value
        elif name == "meshcar_request_duration_seconds_bucket":
            buckets.setdefault(d, []).append((float(labels["le"]), value))
    out: dict[str, dict] = {}
    for d in sorted(set(counts) | set(buckets)):
        total, ok = counts.get(d, [0.0, 0.0])
        p50 = histogram_quantile(0.5, buckets.get(d, []))
        p99 = histogram_quantile(0.99, buckets.get(d, []))
        out[d] = {
            "requests": int(total),
            "success_rate": round(ok / total, 4) if total else None,
            "p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "p99_ms": None if p99 is None else round(p99 * 1000, 3),
        }
    return out


def _short_name(spiffe_id: str) -> str:
    """The last path segment of a SPIFFE ID (spiffe://td/svc/api -> api)."""
    return spiffe_id.rstrip("/").rsplit("/", 1)[-1] or spiffe_id


@dataclass
class _Edge:
    durations: list[float] = field(default_factory=list)
    total: int = 0
    ok: int = 0


def _edge_of(snap: Snapshot, entry: dict, names: dict[str, str]) -> tuple[str, str] | None:
    """(caller, callee) of one access-log entry seen by `snap`, or None if it names none."""
    if entry.get("type") != "request":
        return None
    direction = entry.get("direction")
    if direction == "inbound":
        peer = entry.get("peer")
        caller = names.get(peer, _short_name(peer)) if isinstance(peer, str) else "(no identity)"
        return caller, snap.name
    if direction == "outbound":
        upstream = entry.get("upstream")
        if not isinstance(upstream, str) or not upstream:
            return None
        if upstream in names.values():
            return None  # that sidecar's inbound entries count this edge (once)
        return snap.name, upstream
    if entry.get("mode"):  # the edge: one line per terminate/bridge request
        host = entry.get("host")
        return snap.name, str(host) if host else "(no route)"
    return None


def _counted_edges(
    snaps: list[Snapshot], samples: dict[str, list[Sample]], names: dict[str, str]
) -> dict[tuple[str, str], list[float]]:
    """(caller, callee) -> [requests, successes] from `meshcar_peer_requests_total`."""
    out: dict[tuple[str, str], list[float]] = {}
    for snap in snaps:
        for name, labels, value in samples.get(snap.name, []):
            if name != "meshcar_peer_requests_total":
                continue
            peer, direction = labels.get("peer", ""), labels.get("direction")
            if direction == "inbound":
                key = (names.get(peer, _short_name(peer)), snap.name)
            elif direction == "outbound" and peer not in names.values():
                key = (snap.name, peer)
            else:
                continue  # outbound to a target: its inbound counters count this edge
            c = out.setdefault(key, [0.0, 0.0])
            c[0] += value
            c[1] += value if labels.get("code", "") in ("1xx", "2xx", "3xx", "4xx") else 0.0
    return out


def compute_edges(
    snaps: list[Snapshot], samples: dict[str, list[Sample]] | None = None
) -> list[dict]:
    """caller -> callee over every target's recent entries and per-peer counters, sorted by
    caller, callee."""
    names = {s.certs["spiffe_id"]: s.name for s in snaps if s.certs.get("spiffe_id")}
    counted = _counted_edges(snaps, samples or {}, names)
    edges: dict[tuple[str, str], _Edge] = {key: _Edge() for key in counted}
    for snap in snaps:
        for entry in snap.recent:
            key = _edge_of(snap, entry, names)
            if key is None:
                continue
            e = edges.setdefault(key, _Edge())
            e.total += 1
            e.ok += is_success(entry.get("status"))
            if isinstance(entry.get("duration_ms"), int | float):
                e.durations.append(float(entry["duration_ms"]))
    out = []
    for (caller, callee), e in sorted(edges.items()):
        total, ok = counted.get((caller, callee), (e.total, e.ok))
        out.append(
            {
                "caller": caller,
                "callee": callee,
                "requests": int(total),
                "success_rate": round(ok / total, 4) if total else None,
                "p50_ms": sample_quantile(0.5, e.durations),
                "p99_ms": sample_quantile(0.99, e.durations),
                "source": "metrics" if (caller, callee) in counted else "recent",
            }
        )
    return out


def identity_of(certs: dict, now: dt.datetime) -> dict | None:
    """The SPIFFE ID, expiry and seconds left of one /certs answer (sidecar's or edge's)."""
    spiffe_id = certs.get("spiffe_id")
    if not spiffe_id:
        return None
    not_after = certs.get("not_after")
    left = None
    if isinstance(not_after, str):
        try:
            left = round((dt.datetime.fromisoformat(not_after) - now).total_seconds())
        except ValueError:
            left = None
    return {
        "spiffe_id": spiffe_id,
        "serial": certs.get("serial"),
        "not_after": not_after,
        "expires_in_seconds": left,
        "state": certs.get("state"),
    }


def routes_by_mode(snaps: list[Snapshot], samples: dict[str, list[Sample]]) -> dict[str, list]:
    """Each edge's routes grouped by mode, with their request (connection) counts."""
    out: dict[str, list] = {}
    for snap in snaps:
        if snap.routes is None:
            continue
        per_route: dict[str, list[float]] = {}
        for name, labels, value in samples.get(snap.name, []):
            if name == "meshcar_edge_requests_total":
                success = is_success(labels.get("status"))
            elif name == "meshcar_edge_connections_total":  # passthrough: no status
                success = labels.get("result") == "closed"
            else:
                continue
            c = per_route.setdefault(labels.get("route", ""), [0.0, 0.0])
            c[0] += value
            c[1] += value if success else 0.0
        for r in snap.routes:
            total, ok = per_route.get(r.get("host", ""), [0.0, 0.0])
            out.setdefault(str(r.get("mode")), []).append(
                {
                    **r,
                    "edge": snap.name,
                    "requests": int(total),
                    "success_rate": round(ok / total, 4) if total else None,
                }
            )
    return dict(sorted(out.items()))


def tail(snaps: list[Snapshot], limit: int = TAIL_MAX) -> list[dict]:
    """The newest entries of every target, newest first, each naming its target."""
    merged = [{"target": s.name, **e} for s in snaps for e in s.recent]
    merged.sort(key=lambda e: (str(e.get("ts", "")), e.get("seq", 0)), reverse=True)
    return merged[:limit]


def build_mesh(snaps: list[Snapshot], now: dt.datetime | None = None) -> dict:
    """The dashboard's JSON (GET /api/mesh)."""
    now = now or dt.datetime.now(dt.UTC)
    samples = {s.name: parse_metrics(s.metrics) if s.metrics else [] for s in snaps}
    edges = compute_edges(snaps, samples)
    services = [
        {
            "name": s.name,
            "url": s.url,
            "role": "edge" if s.routes is not None else "sidecar",
            "error": s.error,
            "ready": s.ready,
            "ready_reason": s.ready_reason,
            "identity": identity_of(s.certs, now),
            "traffic": direction_stats(samples[s.name]),
        }
        for s in snaps
    ]
    known = {s.name for s in snaps}
    others = sorted({n for e in edges for n in (e["caller"], e["callee"])} - known)
    services += [{"name": n, "role": "external", "traffic": {}} for n in others]
    return {
        "generated_at": now.isoformat(),
        "services": services,
        "edges": edges,
        "routes": routes_by_mode(snaps, samples),
        "tail": tail(snaps),
    }
