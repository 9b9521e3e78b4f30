"""Service metrics: ranker replicas report snapshots (their HTTP counters included) to one small
deployment; /metrics, answered by any replica, renders them as Prometheus text (no dashboard
agent needed), with the answering replica's own snapshot fresh and the others' at most ~1 s old."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any


class MetricsHub:
    """Latest snapshot per ranker replica (replicas push every few batches)."""

    def __init__(self) -> None:
        self._snapshots: dict[str, dict[str, Any]] = {}

    def report(self, replica: str, snapshot: dict[str, Any]) -> None:
        self._snapshots[replica] = {**snapshot, "reported_at": time.time()}

    def snapshots(self) -> dict[str, dict[str, Any]]:
        return dict(self._snapshots)


class HttpCounters:
    """A replica's HTTP counters: responses by status and reason, and the requests it forwarded
    because their routing key did not name their user (serving/ingress.py)."""

    def __init__(self) -> None:
        self.responses: Counter[tuple[int, str]] = Counter()
        self.forwarded = 0

    def count(self, status: int, reason: str = "") -> None:
        self.responses[(status, reason)] += 1

    def total(self) -> int:
        return sum(self.responses.values()) + self.forwarded

    def as_dict(self) -> dict[str, Any]:
        """For a snapshot: ``responses`` as [status, reason, count] rows, ``forwarded``."""
        rows = [[status, reason, n] for (status, reason), n in sorted(self.responses.items())]
        return {"responses": rows, "forwarded": self.forwarded}


def _line(name: str, value: float, **labels: Any) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}} {value}" if inner else f"{name} {value}"


def render(snapshots: dict[str, dict[str, Any]]) -> str:
    """Prometheus text exposition format (version 0.0.4), one series per replica."""
    lines = ["# TYPE ultrarank_http_responses_total counter"]
    for replica, snap in sorted(snapshots.items()):
        for status, reason, n in snap.get("http", {}).get("responses", []):
            labels = {"replica": replica, "status": status, "reason": reason or "ok"}
            lines.append(_line("ultrarank_http_responses_total", n, **labels))
    lines.append("# TYPE ultrarank_forwarded_total counter")
    for replica, snap in sorted(snapshots.items()):
        lines.append(_line("ultrarank_forwarded_total", snap.get("http", {}).get("forwarded", 0), replica=replica))
    gauges = {
        "ultrarank_cache_hits_total": ("cache", "hits"),
        "ultrarank_cache_misses_total": ("cache", "misses"),
        "ultrarank_cache_evictions_total": ("cache", "evictions"),
        "ultrarank_cache_expirations_total": ("cache", "expirations"),
        "ultrarank_cache_invalidations_total": ("cache", "invalidations"),
        "ultrarank_cache_bytes": ("cache", "bytes"),
        "ultrarank_cache_entries": ("cache", "entries"),
        "ultrarank_requests_total": ("core", "requests"),
        "ultrarank_unknown_users_total": ("core", "unknown_users"),
        "ultrarank_unknown_items_total": ("core", "unknown_items"),
        "ultrarank_rare_users_total": ("core", "rare_users"),
        "ultrarank_rare_items_total": ("core", "rare_items"),
        "ultrarank_batches_total": ("core", "batches"),
        "ultrarank_compute_ms_total": ("core", "compute_ms"),
        "ultrarank_prewarmed_total": ("core", "prewarmed"),
        "ultrarank_scheduler_degraded_total": ("scheduler", "degraded"),
        "ultrarank_scheduler_chunks_total": ("scheduler", "chunks"),
        "ultrarank_scheduler_cancelled_total": ("scheduler", "cancelled"),
    }
    for name, (section, key) in gauges.items():
        lines.append(f"# TYPE {name} {'counter' if name.endswith('_total') else 'gauge'}")
        for replica, snap in sorted(snapshots.items()):
            lines.append(_line(name, snap[section][key], replica=replica))
    lines.append("# TYPE ultrarank_scheduler_rejected_total counter")
    for replica, snap in sorted(snapshots.items()):
        for reason, n in sorted(snap["scheduler"]["rejected"].items()):
            lines.append(_line("ultrarank_scheduler_rejected_total", n, replica=replica, reason=reason))
    lines.append("# TYPE ultrarank_queue_length gauge")
    for replica, snap in sorted(snapshots.items()):
        lines.append(_line("ultrarank_queue_length", snap["queue"], replica=replica))
    lines.append("# TYPE ultrarank_latency_model gauge")
    for replica, snap in sorted(snapshots.items()):
        for key, value in sorted(snap.get("latency_fit", {}).items()):
            lines.append(_line("ultrarank_latency_model", value, replica=replica, stat=key, on="profile"))
        for key, value in sorted(snap.get("latency_live", {}).items()):
            lines.append(_line("ultrarank_latency_model", value, replica=replica, stat=key, on="served"))
        lines.append(_line("ultrarank_latency_model", snap.get("latency_scale", 1.0), replica=replica, stat="scale"))
        lines.append(_line("ultrarank_latency_model", snap.get("latency_refits", 0), replica=replica, stat="refits"))
    return "\n".join(lines) + "\n"
