"""Admission control for SubmitJob: refuse early, cheaply, with a retry hint.

First, **the job store's saturation**: a store with a connection pool (PostgreSQL) says
when its pool is saturated (``PostgresStore.busy_for``: connections all in use with a
queue of ``QUEUE_PER_CONNECTION`` callers per connection behind them, or a recent long
wait for one). A submit then fails at once with ``StoreBusy`` (``resource_exhausted``, retry
after about a second) instead of waiting up to the pool timeout for a connection: busy is
back-pressure, not an outage (docs/design.md §11). It comes before everything else, the
active-jobs count included (a store query), and before a known request id's retry
(which needs the store as well). One call and a few attribute reads per submit.

Then three limits are checked, in this order, before anything is stored:

1. **Active jobs and tasks per tenant** (``TENANT_MAX_ACTIVE_JOBS``, default 1,000, and
   ``TENANT_MAX_ACTIVE_TASKS``, default 100,000; 0 disables either): a tenant may have at
   most that many non-terminal (PENDING, SCHEDULED, RUNNING) jobs, and their tasks (a job
   of N tasks counts N; docs/design.md §16) may not add up to more than the task cap.
2. **Submit rate per tenant** (``TENANT_SUBMIT_RATE`` per second, default 50, with a burst
   of ``TENANT_SUBMIT_BURST``, default 200; a rate of 0 disables): a token bucket per tenant.
3. **Submit rate per provider** (the provider's default, below; ``PROVIDER_SUBMIT_RATE``
   overrides it): a token bucket shared by every tenant of this worker, so that the cloud
   API's own throttling is not what a tenant hits first. It counts provider *calls*: a
   job costs ``providers.base.submit_calls`` of them (1, or for Azure one per 100 tasks
   plus the job's own). A submit needs one token in the bucket and then takes all its
   calls, which may leave the bucket in debt: the next submits wait for it to refill, so
   a job bigger than the bucket is never refused for ever.

A refusal raises ``ResourceExhausted`` carrying ``retry_after_seconds``; the RPC layer
(``jennah/rpc.py``) turns that into ``resource_exhausted`` whose message ends with
"retry after N s", a ``google.rpc.RetryInfo`` error detail and a ``retry-after`` header.
Nothing is stored and no token is spent for a refused submit: every check is made before
any bucket is debited, and the buckets are debited without an ``await`` in between, so
concurrent submits cannot overdraw them.

**Provider defaults**: each provider declares the submits per second its cloud account
takes, ``Capabilities.submit_rate`` (``providers/base.py``), sized from the service's
published limits; its module says where the number comes from (None: unlimited;
``PROVIDER_SUBMIT_RATE`` overrides it). The limit is per account or project,
so the rate is divided by the number of live workers, refreshed by the worker's
membership heartbeat (:meth:`Admission.set_worker_count`).

The provider bucket holds one second's worth of tokens (at least 1): a short burst at the
provider's rate, no more.

**Active-jobs count without a scan per submit.** The count lives in a per-tenant cache:
the last exact count plus the submits admitted since (jobs that finished since are not
subtracted, so the estimate only errs upwards). The store is asked only

* the first time this worker sees the tenant, and
* when the estimate is within 10 % of the cap (or at it) and the last count is at least
  ``recount_interval`` (1 s) old,

so a tenant far from its cap costs no query at all, and a tenant at its cap costs at most
one count a second. A count pages ``list_jobs`` with a status filter (one status at a
time, 500 rows a page) and stops as soon as it reaches the cap, so it is bounded by the
cap, not by the tenant's history. Nothing was added to the ``JobStore`` Protocol. Submits
in flight on this worker (admitted, not yet stored) are added to the count. Submits of the
same tenant on *other* workers are seen at the next count only; the gateway routes a
tenant to one worker, so that is rare, and the cap can then be exceeded by at most the
number of submits admitted elsewhere in one ``recount_interval``.

**Idempotent retries are not refused** (except by a busy store, which would have to
answer them). A ``(tenant, request_id)`` that this worker has stored or found already
(the last 10,000 of them) skips every limit: the store will return the existing job and
nothing new is created or submitted. A retry that reaches a
*different* worker (after a failover) is not in that worker's memory and goes through the
limits; if refused, the client retries after the hint and then gets its existing job.
Asking the store first would cost a query per submit, which is what this module avoids.
If a "retry" does create a job (its first job was deleted meanwhile), the job is charged
to the buckets and the count afterwards, so delete-and-resubmit cannot dodge the limits.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from database.base import MAX_PAGE_SIZE, JobStore
from jennah.blocking import blocking
from jennah.errors import ResourceExhausted, StoreBusy
from jennah.models import JobFilter, JobStatus
from jennah.settings import AdmissionSettings

ACTIVE_STATUSES = (JobStatus.PENDING, JobStatus.SCHEDULED, JobStatus.RUNNING)
NO_LIMIT = 1 << 62
# When a tenant is at its active cap we cannot know when a job will finish; this is how
# long a client should wait before asking again (jobs are polled about once a second).
ACTIVE_CAP_RETRY_SECONDS = 5.0
RECENT_REQUEST_IDS = 10_000
PRUNE_ABOVE = 10_000
PRUNE_EVERY_SECONDS = 10.0

Clock = Callable[[], float]
# (tenant_id, limit) -> the tenant's active jobs and their tasks, counted until the jobs
# reach ``limit`` (a plain ``int`` is read as that many jobs of one task each).
ActiveCounter = Callable[[str, int], "tuple[int, int] | int"]
# Seconds a new job should wait because the job store is saturated; 0 when it is not.
StorePressure = Callable[[], float]


def provider_submit_rate(default: float | None, override: float | None) -> float | None:
    """The account-wide submit rate: the override if set (0 = none), else the provider's
    own (``Capabilities.submit_rate``)."""
    if override is not None:
        return override or None
    return default


def store_active_counter(store: JobStore) -> ActiveCounter:
    """Count a tenant's non-terminal jobs and their tasks with ``list_jobs``, stopping
    once the jobs reach ``limit``."""

    def count(tenant_id: str, limit: int) -> tuple[int, int]:
        total = tasks = 0
        for status in ACTIVE_STATUSES:
            token = ""
            while total < limit:
                page = store.list_jobs(tenant_id, JobFilter(status=status), MAX_PAGE_SIZE, token)
                total += len(page.jobs)
                tasks += sum(j.spec.task_count for j in page.jobs)
                token = page.next_page_token
                if not token:
                    break
            if total >= limit:
                break
        return total, tasks

    return count


def store_pressure(store: JobStore) -> StorePressure | None:
    """The store's saturation signal (``busy_for``), if it has one: pooled stores do."""
    busy_for = getattr(store, "busy_for", None)
    return cast(StorePressure, busy_for) if callable(busy_for) else None


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``; starts full."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait(self, now: float) -> float:
        """Seconds until a token is available (0 if one is available now)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self, now: float, n: int = 1) -> None:
        self._refill(now)
        self.tokens -= n

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst

    def reshape(self, rate: float, burst: float, now: float) -> None:
        self._refill(now)
        self.rate, self.burst = rate, burst
        self.tokens = min(self.tokens, burst)


@dataclass
class _Active:
    count: int  # the last exact count plus the submits admitted since
    counted_at: float
    inflight: int = 0  # admitted on this worker, not yet stored
    tasks: int = 0  # the same, in tasks
    inflight_tasks: int = 0


class Ticket:
    """An admitted submit. Call :meth:`stored` once the store answered, or
    :meth:`abandon` if the store call failed.

    A *retry* ticket (a known request id, let through without checks) that turns out to
    have created a job after all (the earlier job was deleted since) is charged then:
    its tokens are taken even if that leaves a bucket in debt, so deleting and
    resubmitting under one request id cannot bypass the limits.
    """

    def __init__(
        self, admission: Admission, tenant_id: str, request_id: str, *, retry: bool = False,
        tasks: int = 1, calls: int = 1,
    ) -> None:
        self._admission = admission
        self._tenant = tenant_id
        self._request_id = request_id
        self._retry = retry
        self._open = not retry
        self._tasks = tasks
        self._calls = calls

    def stored(self, created: bool) -> None:
        if self._request_id:
            self._admission.remember(self._tenant, self._request_id)
        if self._retry and created:
            self._admission.charge(self._tenant, self._tasks, self._calls)
        self._close(created)

    def abandon(self) -> None:
        self._close(False)

    def _close(self, created: bool) -> None:
        if self._open:
            self._open = False
            self._admission.settle(self._tenant, created, self._tasks)


class Admission:
    """Per-tenant and per-provider limits on SubmitJob for one worker."""

    def __init__(
        self,
        settings: AdmissionSettings,
        *,
        provider: str,
        provider_rate: float | None = None,
        counter: ActiveCounter | None = None,
        clock: Clock = time.monotonic,
        recount_interval: float = 1.0,
        pressure: StorePressure | None = None,
    ) -> None:
        self.tenant_rate = settings.tenant_submit_rate
        self.tenant_burst = max(1.0, float(settings.tenant_submit_burst))
        self.max_active = settings.tenant_max_active_jobs if counter is not None else 0
        self.max_tasks = settings.tenant_max_active_tasks if counter is not None else 0
        self.provider = provider
        self.provider_rate = provider_submit_rate(provider_rate, settings.provider_submit_rate)
        self.counter = counter
        self.pressure = pressure
        self.clock = clock
        self.recount_interval = recount_interval
        self.counts = 0  # store counts made (for tests and /info)
        self.workers = 1
        self._tenants: dict[str, TokenBucket] = {}
        self._active: dict[str, _Active] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._recent: OrderedDict[tuple[str, str], None] = OrderedDict()
        now = clock()
        self._pruned_at = now
        self._provider_bucket: TokenBucket | None = None
        if self.provider_rate:
            self._provider_bucket = TokenBucket(self.provider_rate, max(1.0, self.provider_rate),
                                                now)

    @classmethod
    def unlimited(cls) -> Admission:
        return cls(AdmissionSettings(tenant_submit_rate=0, tenant_max_active_jobs=0,
                                     provider_submit_rate=0), provider="")

    # --- configuration at run time -----------------------------------------------------

    def set_worker_count(self, workers: int) -> None:
        """Share the account-wide provider rate among ``workers`` live workers."""
        self.workers = max(1, workers)
        if self._provider_bucket is not None and self.provider_rate:
            share = self.provider_rate / self.workers
            self._provider_bucket.reshape(share, max(1.0, share), self.clock())

    # --- the check ---------------------------------------------------------------------

    @property
    def _counts_active(self) -> bool:
        return self.max_active > 0 or self.max_tasks > 0

    async def admit(
        self, tenant_id: str, request_id: str, *, tasks: int = 1, calls: int = 1
    ) -> Ticket:
        """A ticket for one submit of a job of ``tasks`` tasks that takes ``calls``
        provider calls, or ``ResourceExhausted`` with a retry hint."""
        self._check_store()
        if request_id and (tenant_id, request_id) in self._recent:
            self._recent.move_to_end((tenant_id, request_id))
            return Ticket(self, tenant_id, request_id, retry=True, tasks=tasks, calls=calls)
        self._prune(self.clock())
        if self._counts_active:
            await self._check_active(tenant_id, tasks)
        try:
            self._take_tokens(tenant_id, calls)
        except ResourceExhausted:
            if self._counts_active:
                self.settle(tenant_id, False, tasks)
            raise
        return Ticket(self, tenant_id, request_id, tasks=tasks, calls=calls)

    async def _check_active(self, tenant_id: str, tasks: int) -> None:
        lock = self._locks.get(tenant_id)
        if lock is None:
            lock = self._locks[tenant_id] = asyncio.Lock()
        max_jobs = self.max_active or NO_LIMIT
        max_tasks = self.max_tasks or NO_LIMIT
        async with lock:
            entry = self._active.get(tenant_id)
            now = self.clock()
            near = entry is not None and (
                entry.count + entry.inflight >= max_jobs - max(1, max_jobs // 10)
                or entry.tasks + entry.inflight_tasks + tasks
                > max_tasks - max(1, max_tasks // 10))
            if entry is None or (near and now - entry.counted_at >= self.recount_interval):
                assert self.counter is not None
                self._check_store()  # again: it may have waited for the tenant's lock
                counted = await blocking(self.counter, tenant_id, max_jobs)
                jobs, active_tasks = counted if isinstance(counted, tuple) else (counted,
                                                                                 counted)
                self.counts += 1
                if entry is None:
                    entry = self._active[tenant_id] = _Active(jobs, now, tasks=active_tasks)
                else:
                    entry.count, entry.tasks, entry.counted_at = jobs, active_tasks, now
            active = entry.count + entry.inflight
            if active >= max_jobs:
                raise ResourceExhausted(
                    f"tenant {tenant_id} has {active} active jobs, the most allowed is "
                    f"{self.max_active}; wait for some to finish",
                    retry_after_seconds=ACTIVE_CAP_RETRY_SECONDS,
                )
            active_tasks = entry.tasks + entry.inflight_tasks
            if active_tasks + tasks > max_tasks:
                raise ResourceExhausted(
                    f"tenant {tenant_id} has {active_tasks} active tasks and this job has "
                    f"{tasks}; the most allowed is {self.max_tasks} "
                    "(TENANT_MAX_ACTIVE_TASKS); wait for some to finish",
                    retry_after_seconds=ACTIVE_CAP_RETRY_SECONDS,
                )
            entry.inflight += 1
            entry.inflight_tasks += tasks

    def _check_store(self) -> None:
        if self.pressure is not None:
            wait = self.pressure()
            if wait > 0:
                raise StoreBusy("the job store is busy (every connection of this worker is "
                                "in use); nothing was stored", retry_after_seconds=_hint(wait))

    def _take_tokens(self, tenant_id: str, calls: int) -> None:
        now = self.clock()
        bucket: TokenBucket | None = None
        if self.tenant_rate > 0:
            bucket = self._tenants.get(tenant_id)
            if bucket is None:
                bucket = self._tenants[tenant_id] = TokenBucket(
                    self.tenant_rate, self.tenant_burst, now
                )
            wait = bucket.wait(now)
            if wait > 0:
                raise ResourceExhausted(
                    f"tenant {tenant_id} is over its submit rate ({self.tenant_rate:g}/s, "
                    f"burst {self.tenant_burst:g})",
                    retry_after_seconds=_hint(wait),
                )
        if self._provider_bucket is not None:
            wait = self._provider_bucket.wait(now)
            if wait > 0:
                raise ResourceExhausted(
                    f"this worker is at its {self.provider} submit rate "
                    f"({self._provider_bucket.rate:g}/s)",
                    retry_after_seconds=_hint(wait),
                )
            self._provider_bucket.take(now, calls)
        if bucket is not None:
            bucket.take(now)

    # --- bookkeeping -------------------------------------------------------------------

    def charge(self, tenant_id: str, tasks: int = 1, calls: int = 1) -> None:
        """Account for a job created without a check (see :class:`Ticket`)."""
        now = self.clock()
        bucket = self._tenants.get(tenant_id)
        if bucket is not None:
            bucket.take(now)
        if self._provider_bucket is not None:
            self._provider_bucket.take(now, calls)
        entry = self._active.get(tenant_id)
        if entry is not None:
            entry.count += 1
            entry.tasks += tasks

    def settle(self, tenant_id: str, created: bool, tasks: int = 1) -> None:
        entry = self._active.get(tenant_id)
        if entry is None:
            return
        entry.inflight = max(0, entry.inflight - 1)
        entry.inflight_tasks = max(0, entry.inflight_tasks - tasks)
        if created:
            entry.count += 1
            entry.tasks += tasks

    def remember(self, tenant_id: str, request_id: str) -> None:
        self._recent[(tenant_id, request_id)] = None
        self._recent.move_to_end((tenant_id, request_id))
        while len(self._recent) > RECENT_REQUEST_IDS:
            self._recent.popitem(last=False)

    def _prune(self, now: float) -> None:
        """Forget idle tenants: a full bucket is the same as no bucket, and a stale count
        is simply taken again. At most every ``PRUNE_EVERY_SECONDS``."""
        if now - self._pruned_at < PRUNE_EVERY_SECONDS:
            return
        self._pruned_at = now
        if len(self._tenants) > PRUNE_ABOVE:
            for tenant in [t for t, b in self._tenants.items() if b.full(now)]:
                del self._tenants[tenant]
        if len(self._active) > PRUNE_ABOVE:
            for tenant in [t for t, a in self._active.items()
                           if a.inflight == 0 and now - a.counted_at > 60]:
                del self._active[tenant]
                lock = self._locks.get(tenant)
                if lock is not None and not lock.locked():
                    del self._locks[tenant]


def _hint(seconds: float) -> float:
    """Round a wait up to the next tenth of a second (never 0)."""
    return max(0.1, math.ceil(seconds * 10) / 10)
