"""admin/workers.py: several workers' /metrics merged into one exposition, every sample
labelled with its worker, families regrouped so the text stays valid Prometheus format."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshcar.admin.workers import merge


def _worker(requests: int) -> str:
    r = CollectorRegistry()
    Counter("meshcar_requests", "requests", ["direction"], registry=r).labels("out").inc(requests)
    Gauge("meshcar_up", "up", registry=r).set(1)
    Histogram("meshcar_seconds", "time", registry=r).observe(0.2)
    return generate_latest(r).decode()


def test_merge_labels_every_sample_and_keeps_families_together() -> None:
    text = merge({0: _worker(3), 1: _worker(5)}).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    reqs = {
        s.labels["worker"]: s.value
        for s in fams["meshcar_requests"].samples
        if s.name.endswith("_total")
    }
    assert reqs == {"0": 3.0, "1": 5.0}
    assert fams["meshcar_requests"].type == "counter"
    assert fams["meshcar_seconds"].type == "histogram"
    counts = [s for s in fams["meshcar_seconds"].samples if s.name == "meshcar_seconds_count"]
    assert sorted(s.labels["worker"] for s in counts) == ["0", "1"]
    # each family's HELP/TYPE once: the text is one exposition, not two pasted together
    assert text.count("# TYPE meshcar_requests_total counter") == 1
    assert text.count("# TYPE meshcar_seconds histogram") == 1
