"""Prometheus metrics of the WAL (docs/design.md §6), one set per registry.

The default registry is what ``/metrics`` serves; tests and benchmarks may pass their own
``CollectorRegistry`` so that several instances never clash on registration.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

# fsync on SSDs takes 0.1-1 ms, so the default buckets (from 5 ms) would hide everything.
_APPEND_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
)


@dataclass(frozen=True)
class WalMetrics:
    appends: Counter
    append_seconds: Histogram
    pending: Gauge
    retries: Counter
    write_errors: Counter
    failures: Counter
    archive_bytes: Gauge


_lock = threading.Lock()
_by_registry: dict[int, tuple[CollectorRegistry, WalMetrics]] = {}


def wal_metrics(registry: CollectorRegistry | None = None) -> WalMetrics:
    """The WAL metrics registered in ``registry`` (default: the process registry)."""
    reg = REGISTRY if registry is None else registry
    with _lock:
        found = _by_registry.get(id(reg))
        if found is not None and found[0] is reg:
            return found[1]
        m = WalMetrics(
            appends=Counter("wal_appends", "Events appended durably to the WAL", registry=reg),
            append_seconds=Histogram(
                "wal_append_duration_seconds",
                "Time for one durable WAL append, fsync included",
                buckets=_APPEND_BUCKETS,
                registry=reg,
            ),
            pending=Gauge(
                "wal_pending_events", "WAL events not yet acknowledged by the sink", registry=reg
            ),
            retries=Counter(
                "wal_retries", "Deliveries retried after a sink failure", registry=reg
            ),
            write_errors=Counter(
                "wal_write_errors",
                "Appends that could not be made durable (full disk, I/O error): their events "
                "were not acknowledged to the producer, which reads them again",
                registry=reg,
            ),
            failures=Counter(
                "wal_failures", "Failed WAL operations, by op", ["op"], registry=reg
            ),
            archive_bytes=Gauge(
                "wal_archive_size_bytes", "Bytes of compressed WAL archives on disk", registry=reg
            ),
        )
        _by_registry[id(reg)] = (reg, m)
        return m
