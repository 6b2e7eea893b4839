"""The worker's Prometheus metrics and the provider-call instrumentation.

Served on the worker's ``/metrics`` beside the WAL metrics (``worker/wal/metrics.py``).
One set per registry (the process registry by default, as ``/metrics`` serves it), so
several workers in one process (tests) share the counters and each adds its own
``worker`` series to the scrape-time gauges.

* ``jennah_worker_requests_total{method,code}``: RPCs answered, by final Connect code
  (``ok`` for success);
* ``jennah_worker_request_duration_seconds{method}``: RPC latency (histogram), measured
  outside the error mapper;
* ``jennah_worker_jobs{worker,status}``: active jobs the worker owns, by status
  (PENDING, SCHEDULED, RUNNING), as of its last poll cycle;
* ``jennah_worker_job_events_total{kind}``: job events this worker's writes stored
  (SUBMITTED, SCHEDULED, RUNNING, COMPLETED, FAILED, CANCELLED, RETRY, LEASE_CLAIMED,
  OUTPUT, STATUS_DETAIL); a lost lease is not an event (``leases_lost`` below);
* ``jennah_worker_leases_held{worker}``: leases renewed at the last renewal round;
* ``jennah_worker_lease_claims_total{worker}``: expired leases claimed from peers;
* ``jennah_worker_leases_lost_total{worker}``: leases this worker lost (a renewal or a
  fenced write refused: a peer holds the job now);
* ``jennah_worker_poll_cycle_duration_seconds``: time of one poll cycle (histogram);
* ``jennah_worker_poll_cycle_failures_total``: poll cycles that failed (store or
  provider down);
* ``jennah_worker_provider_call_duration_seconds{op}``: provider ``submit``, ``status``
  and ``cancel`` call time (histogram);
* ``jennah_worker_provider_errors_total{op,error}``: failed provider calls by error
  class (``ProviderUnavailable``, ``ProviderQuotaExceeded``, ``ProviderRejected``, ...);
* ``jennah_worker_info{worker,store,provider}``: always 1, which backends a worker runs.

**Cost.** Nothing here touches the store at scrape time: job counts come from the list
the poller reads anyway each cycle, lease counts from the renewal round.

**Wiring** (``worker/app.py``): :func:`worker_metrics` gives the registry's one
:class:`WorkerMetrics`, whose pieces are built *before* the parts that use them and given
to their constructors, never installed afterwards:

* :meth:`WorkerMetrics.instrument_provider` wraps the worker's provider in an
  :class:`InstrumentedProvider`: each call is timed, counted when it fails, runs in a
  CLIENT span (``jennah.tracing``) and binds the job and tenant ids for the log lines it
  causes; ``JobService``, the poller and the output reader are given the wrapped one;
* :meth:`WorkerMetrics.count_events` is the event-counting hook of ``JobService``, the
  group committer and the lease keeper; :meth:`WorkerMetrics.observe_cycle` the poller's;
* :meth:`WorkerMetrics.add_worker` registers the live worker for the scrape-time gauges;
* :meth:`WorkerMetrics.rpc_interceptor` is the RPC interceptor.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jennah.logging import log_context
from jennah.models import EventKind, JobStatus
from jennah.rpc import RequestMetrics
from jennah.tracing import tracer
from providers.base import BatchProvider, ProviderStatus, ProviderTask
from worker.jobs import JobService
from worker.leases import LeaseKeeper
from worker.poller import Poller

REQ = TypeVar("REQ")
RES = TypeVar("RES")
T = TypeVar("T")

# Poll cycles and provider calls range from a few ms (local) to seconds (cloud APIs).
_SLOW_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class _Source:
    """What the scrape-time collector reads for one worker (weakly held)."""

    worker_id: str
    store: str
    provider: str
    leases: weakref.ref[LeaseKeeper]
    poller: weakref.ref[Poller]
    jobs: weakref.ref[JobService]


class WorkerStateCollector(Collector):
    """Scrape-time gauges and counters read from the live workers' own fields."""

    def __init__(self) -> None:
        self.sources: dict[str, _Source] = {}
        self._lock = threading.Lock()

    def add(self, source: _Source) -> None:
        with self._lock:
            self.sources[source.worker_id] = source

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("jennah_worker_jobs",
                                 "Active jobs owned by the worker, by status (last poll cycle)",
                                 labels=["worker", "status"])
        held = GaugeMetricFamily("jennah_worker_leases_held",
                                 "Leases renewed by the worker at its last renewal round",
                                 labels=["worker"])
        claims = CounterMetricFamily("jennah_worker_lease_claims",
                                     "Expired leases claimed from peers", labels=["worker"])
        lost = CounterMetricFamily("jennah_worker_leases_lost",
                                   "Leases this worker failed to renew (a peer took over)",
                                   labels=["worker"])
        info = GaugeMetricFamily("jennah_worker_info", "Always 1: the worker's backends",
                                 labels=["worker", "store", "provider"])
        with self._lock:
            sources = list(self.sources.values())
        for src in sources:
            leases, poller, service = src.leases(), src.poller(), src.jobs()
            if leases is None or poller is None or service is None:
                continue
            by_status = poller.owned_by_status
            for status in (JobStatus.PENDING, JobStatus.SCHEDULED, JobStatus.RUNNING):
                jobs.add_metric([src.worker_id, status.value], by_status.get(status.value, 0))
            held.add_metric([src.worker_id], float(leases.held))
            claims.add_metric([src.worker_id], float(leases.claimed_total))
            lost.add_metric([src.worker_id], float(leases.lost_total + service.leases_lost))
            info.add_metric([src.worker_id, src.store, src.provider], 1.0)
        yield from (jobs, held, claims, lost, info)


@dataclass
class WorkerMetrics:
    requests: Counter
    request_seconds: Histogram
    job_events: Counter
    poll_seconds: Histogram
    poll_failures: Counter
    provider_seconds: Histogram
    provider_errors: Counter
    state: WorkerStateCollector = field(default_factory=WorkerStateCollector)

    @classmethod
    def create(cls, reg: CollectorRegistry) -> WorkerMetrics:
        state = WorkerStateCollector()
        reg.register(state)
        return cls(
            requests=Counter("jennah_worker_requests", "RPCs answered by the worker",
                             ["method", "code"], registry=reg),
            request_seconds=Histogram("jennah_worker_request_duration_seconds",
                                      "RPC duration at the worker", ["method"], registry=reg),
            job_events=Counter("jennah_worker_job_events", "Job events emitted, by kind",
                               ["kind"], registry=reg),
            poll_seconds=Histogram("jennah_worker_poll_cycle_duration_seconds",
                                   "Time of one poll cycle", buckets=_SLOW_BUCKETS,
                                   registry=reg),
            poll_failures=Counter("jennah_worker_poll_cycle_failures",
                                  "Poll cycles that failed", registry=reg),
            provider_seconds=Histogram("jennah_worker_provider_call_duration_seconds",
                                       "Provider call duration", ["op"],
                                       buckets=_SLOW_BUCKETS, registry=reg),
            provider_errors=Counter("jennah_worker_provider_errors",
                                    "Failed provider calls, by error class",
                                    ["op", "error"], registry=reg),
            state=state,
        )

    def observe_cycle(self, seconds: float, ok: bool) -> None:
        """The poller's ``on_cycle`` hook."""
        self.poll_seconds.observe(seconds)
        if not ok:
            self.poll_failures.inc()

    def count_events(self, kind: EventKind, n: int) -> None:
        """The ``on_events`` hook: ``n`` events of ``kind`` stored by this worker's writes."""
        self.job_events.labels(kind=kind.value).inc(n)

    def instrument_provider(self, provider: BatchProvider) -> BatchProvider:
        """``provider``, timed, counted and traced (an :class:`InstrumentedProvider`)."""
        if isinstance(provider, InstrumentedProvider):
            return provider
        return InstrumentedProvider(provider, self)

    def add_worker(
        self, worker_id: str, *, store: str, provider: str, jobs: JobService,
        leases: LeaseKeeper, poller: Poller,
    ) -> None:
        """Report a live worker's state at scrape time (held weakly: a worker that is gone
        drops out)."""
        self.state.add(_Source(worker_id, store, provider, weakref.ref(leases),
                               weakref.ref(poller), weakref.ref(jobs)))

    def rpc_interceptor(self) -> RequestMetrics:
        """The interceptor that counts and times the worker's RPCs."""
        return RequestMetrics(self.requests, self.request_seconds)


_lock = threading.Lock()
_by_registry: dict[int, tuple[CollectorRegistry, WorkerMetrics]] = {}


def worker_metrics(registry: CollectorRegistry | None = None) -> WorkerMetrics:
    """The worker metrics registered in ``registry`` (default: the process registry)."""
    reg = REGISTRY if registry is None else registry
    with _lock:
        found = _by_registry.get(id(reg))
        if found is not None and found[0] is reg:
            return found[1]
        metrics = WorkerMetrics.create(reg)
        _by_registry[id(reg)] = (reg, metrics)
        return metrics


class InstrumentedProvider:
    """A ``BatchProvider`` that times, counts, traces and log-binds the calls of another."""

    def __init__(self, inner: BatchProvider, metrics: WorkerMetrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self.name = inner.name
        self.capabilities = inner.capabilities

    def __getattr__(self, name: str) -> Any:
        # Optional provider methods (``read_output``) pass straight through.
        return getattr(self.inner, name)

    @contextlib.contextmanager
    def _call(self, op: str, attributes: dict[str, str | int],
              job_id: str | None = None, tenant_id: str | None = None) -> Iterator[None]:
        started = time.perf_counter()
        attrs: dict[str, str | int] = {"jennah.provider": self.name, **attributes}
        with log_context(job_id=job_id, tenant_id=tenant_id), tracer().start_as_current_span(
            f"provider.{op}", kind=SpanKind.CLIENT, attributes=attrs,
            record_exception=False, set_status_on_exception=False,
        ) as span:
            try:
                yield
            except Exception as exc:
                error = type(exc).__name__
                self.metrics.provider_errors.labels(op=op, error=error).inc()
                span.set_status(Status(StatusCode.ERROR, error))
                span.set_attribute("jennah.provider.retryable", bool(getattr(exc, "retryable",
                                                                            False)))
                raise
            finally:
                self.metrics.provider_seconds.labels(op=op).observe(
                    time.perf_counter() - started)

    def submit(self, task: ProviderTask) -> str:
        with self._call("submit", {"jennah.job_id": task.job_id, "jennah.attempt": task.attempt,
                                   "jennah.provider_job_id": task.provider_job_id},
                        job_id=task.job_id, tenant_id=task.tenant_id):
            return self.inner.submit(task)

    def status(self, resource_paths: Sequence[str]) -> dict[str, ProviderStatus]:
        with self._call("status", {"jennah.batch_size": len(resource_paths)}):
            return self.inner.status(resource_paths)

    def cancel(self, resource_path: str) -> None:
        with self._call("cancel", {"jennah.resource_path": resource_path}):
            self.inner.cancel(resource_path)

    def close(self) -> None:
        self.inner.close()
