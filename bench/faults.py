"""Soak and faults: a steady load, a store outage and a ``kill -9``, each bounded in time.

Real processes (``tests/cluster.py``): a gateway and 3 workers on PostgreSQL, every submit
through the gateway with a ``request_id``. Three scenarios, each one row of a markdown table
with PASS/FAIL and its fault counts:

1. **soak**: ``--soak-seconds`` (60) at ``--rate`` (500) submits/s with the ``dry``
   provider, then, if that rate is not held, at each lower rate of ``--fallback-rates``
   until one is (so the table says the highest rate held). Pass: no error, every job
   terminal within 10 s after the load, achieved rate within 5 % of the target, and
   flat memory: the
   VmRSS of the gateway and of every worker (``/proc/<pid>/status``, sampled each second)
   averaged over the last sixth of the run (the last 10 s of 60) may exceed its average
   over the second sixth (seconds 10-20, after warm-up) by at most 10 %.
2. **outage**: ``--outage-rate`` (100) submits/s with the ``dry`` provider; after a few
   seconds PostgreSQL is stopped for ``--outage-seconds`` (10), then started again; nothing
   else is restarted. Pass: every submit sent and answered while the store was down failed
   with ``unavailable`` (HTTP 503) in under 3 s; no failure anywhere was slow or of another
   kind; the last half of the post-outage phase saw only successes; each refused submit,
   retried afterwards with its own ``request_id``, yields a job; and the store then holds
   exactly one job per request id, as many per tenant as were acknowledged, every one
   terminal (none lost, none half-written).
3. **kill**: ``--kill-jobs`` (200) jobs at ``--kill-rate`` (40)/s with the local provider;
   each job is ``sh -c 'echo $JENNAH_JOB_ID >> executions.log; sleep 1'``. When half are
   acknowledged, the worker owning the most active jobs gets ``kill -9``. Leases are short
   (TTL 3 s, claims every 1 s). Submits retry transport errors and ``unavailable`` with
   their request id (a client's duty). Pass: every acknowledged job completed, the
   provider ran each exactly once, nothing else ran, and the victim did own active jobs
   (otherwise the fault proved nothing).

Load is **open loop**: submit *i* is due at ``t0 + i / rate`` and a pool of threads sends
each at its due time (keep-alive HTTP/1.1), whatever the latency of earlier ones, so a slow
server shows as latency and a lower achieved rate instead of a politely slower client.
Soak latency is measured from the due time (queueing in the client counts); the outage's
"fail fast" is measured from the moment the request was sent.

Admission control stays **on** with its defaults (50 submits/s and 1,000 active jobs per
tenant): load is spread over ``--tenants`` (20) tenants, 10/s each at 200/s, so the limits
are exercised but not reached while the workers keep up; a ``resource_exhausted`` answer
counts as an error.

Counts: *lost* is an acknowledged job missing from the store or not terminal when the audit
gives up (30 s after a soak, 20 s after the outage, 60 s after the kill; the measures split
the two); *duplicated* is a second job for one request id (kill: also a job the provider
ran twice); *half-written* is a stored job no acknowledged submit accounts for, or a tenant
whose job count differs from its acknowledged submits; *slow failures* are refusals that
took 3 s or more. Bounds: a submit still unsent 10 s after the last one was due is dropped
(an error, "not sent"), so an overloaded cluster cannot stretch the run; the default run
takes about 3-4 minutes.

The outage is a real ``pg_ctl stop -m immediate`` of the private PostgreSQL this bench
starts when no ``--postgres-url`` is given. With ``--postgres-url`` (a server shared with
others, as in the smoke test) the cluster reaches PostgreSQL through a TCP proxy in this
process instead, and the outage closes the proxy's listener and resets every connection
through it: to the workers, the same refused connections and dead sessions as a stopped
server. The bench's own audit always talks to PostgreSQL directly.

Run: ``.venv/bin/python -m bench.faults [--soak-seconds 60] [--rate 200]
[--outage-seconds 10] [--scenarios soak,outage,kill] [--postgres-url URL]``. Exits 1 after
printing the table when a scenario fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import select
import signal
import socket
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from bench._postgres import private_postgres
from jennah.models import Job, JobFilter
from jennah.settings import StoreSettings
from tests.cluster import Cluster, Node, Submitted
from tests.helpers import SERVICE, free_port

TTL = 3.0
CLAIM = 1.0
FAIL_FAST = 3.0  # seconds: the most a refused submit may take during the outage
RATE_TOLERANCE = 0.05
RSS_GROWTH_LIMIT = 0.10
SCENARIOS = ("soak", "outage", "kill")


# --- results ---------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    submitted: int = 0
    acknowledged: int = 0
    errors: int = 0
    lost: int = 0
    duplicated: int = 0
    half_written: int = 0
    slow_failures: int = 0
    checks: dict[str, bool] = field(default_factory=dict)
    measures: list[str] = field(default_factory=list)

    @property
    def faults(self) -> int:
        return self.errors + self.lost + self.duplicated + self.half_written + self.slow_failures

    @property
    def passed(self) -> bool:
        return self.faults == 0 and all(self.checks.values())

    def line(self) -> str:
        failed = [name for name, ok in self.checks.items() if not ok]
        verdict = "PASS" if self.passed else "FAIL" + (f" ({', '.join(failed)})" if failed else "")
        return (f"| {self.scenario} | {verdict} | {self.submitted} | {self.acknowledged} "
                f"| {self.errors} | {self.lost} | {self.duplicated} | {self.half_written} "
                f"| {self.slow_failures} | {'; '.join(self.measures)} |")  # fmt: skip


HEADER = [
    "| scenario | result | submitted | acknowledged | errors | lost | duplicated "
    "| half-written | slow failures | measures |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
]


def table(rows: list[Row], intro: str) -> str:
    return "\n".join([intro, "", *HEADER, *(r.line() for r in rows)])


# --- HTTP load -------------------------------------------------------------------------


@dataclass
class Shot:
    """One submit: when it was due, sent and answered, and how."""

    index: int
    tenant: str
    request_id: str
    due: float
    start: float = 0.0
    end: float = 0.0
    status: int = 0
    code: str = ""
    job_id: str = ""
    retry_job_id: str = ""  # the job a later retry with the same request id got

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.job_id)

    @property
    def took(self) -> float:
        return self.end - self.start

    @property
    def refused(self) -> bool:
        return self.status == 503 and self.code == "unavailable"


class Client:
    """A keep-alive Connect JSON client for one thread. A request on a reused connection
    that the server had already closed is sent once more (safe: submits are idempotent
    by request id); any other transport failure is reported as status 0."""

    def __init__(self, base: str, timeout: float = 10.0) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def call(self, method: str, body: dict[str, Any], tenant: str) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "X-Tenant-Id": tenant}
        for attempt in (0, 1):
            fresh = self.conn is None
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request("POST", f"{SERVICE}/{method}", body=data, headers=headers)
                resp = self.conn.getresponse()
                raw = resp.read()
                try:
                    parsed: dict[str, Any] = json.loads(raw or b"{}")
                except ValueError:
                    parsed = {}
                return resp.status, parsed
            except (OSError, http.client.HTTPException) as exc:
                self.conn.close()
                self.conn = None
                stale = isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError,
                                         BrokenPipeError))  # fmt: skip
                if attempt or fresh or not stale:
                    return 0, {"code": type(exc).__name__}
        return 0, {}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def make_shots(prefix: str, rate: float, seconds: float, tenants: int, t0: float) -> list[Shot]:
    n = max(1, round(rate * seconds))
    return [Shot(i, f"{prefix}-{i % tenants:02d}", f"{prefix}-{uuid.uuid4().hex}", t0 + i / rate)
            for i in range(n)]  # fmt: skip


def open_loop(
    shots: list[Shot],
    send: Callable[[Shot], None],
    threads: int,
    on_done: Callable[[Shot], None] | None = None,
    backlog: float = 10.0,
) -> None:
    """Send every shot at its due time from ``threads`` threads; return when all answered.

    To keep the run bounded when the server cannot keep up, a shot still unsent
    ``backlog`` seconds after the last one was due is not sent at all (status 0,
    code ``not sent``): an error, never a job."""
    stop_at = (max(s.due for s in shots) if shots else 0.0) + backlog
    it = iter(shots)
    lock = threading.Lock()

    def run() -> None:
        while True:
            with lock:
                shot = next(it, None)
            if shot is None:
                return
            delay = shot.due - time.monotonic()
            if time.monotonic() > stop_at:
                shot.status, shot.code = 0, "not sent"
                continue
            if delay > 0:
                time.sleep(delay)
            shot.start = time.monotonic()
            send(shot)
            shot.end = time.monotonic()
            if on_done is not None:
                on_done(shot)

    pool = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def submit_sender(cluster: Cluster) -> tuple[Callable[[Shot], None], Callable[[], None]]:
    """A ``send`` for ``open_loop`` making one SubmitJob attempt, and a closer."""
    assert cluster.gateway is not None
    base = cluster.gateway.url
    local = threading.local()
    clients: list[Client] = []

    def send(shot: Shot) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = Client(base)
            clients.append(client)
        shot.status, resp = client.call("SubmitJob", cluster.job_body(shot.request_id),
                                        shot.tenant)  # fmt: skip
        shot.code = str(resp.get("code", ""))
        shot.job_id = str(resp.get("jobId", "")) if shot.status == 200 else ""

    def close() -> None:
        for c in clients:
            c.close()

    return send, close


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# --- memory ----------------------------------------------------------------------------


def vm_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler:
    """VmRSS of some processes, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 1.0) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            row = {name: kib for name, pid in self.pids.items()
                   if (kib := vm_rss_kib(pid)) is not None}  # fmt: skip
            self.samples.append((now, row))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def mean(self, name: str, start: float, end: float) -> float | None:
        vals = [row[name] for t, row in self.samples if start <= t < end and name in row]
        return statistics.fmean(vals) if vals else None


# --- PostgreSQL ------------------------------------------------------------------------


class Outage(Protocol):
    def halt(self) -> None: ...
    def resume(self) -> None: ...


class TcpProxy:
    """A TCP relay to PostgreSQL that can play dead: ``halt`` closes the listener (new
    connections are refused) and resets every relayed connection; ``resume`` listens again
    on the same port. One thread per connection pair, which owns both sockets."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._pairs: set[socket.socket] = set()

    def start(self) -> TcpProxy:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(256)
        with self._lock:
            self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()
        return self

    def resume(self) -> None:
        self.start()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not ls:
                    client.close()
                    upstream.close()
                    continue
                self._pairs.update((client, upstream))
            threading.Thread(target=self._relay, args=(client, upstream), daemon=True).start()

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [])
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._pairs.difference_update((a, b))
            a.close()
            b.close()

    def halt(self) -> None:
        with self._lock:
            ls, self._listener = self._listener, None
            socks = list(self._pairs)
        if ls is not None:
            with suppress(OSError):
                ls.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
            ls.close()
        for s in socks:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.halt()


def with_database(url: str, dbname: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + dbname))


def fresh_database(pg_url: str, dbname: str) -> str:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{dbname}"')
    return with_database(pg_url, dbname)


def drop_database(pg_url: str, dbname: str) -> None:
    import psycopg

    with suppress(OSError), psycopg.connect(pg_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@contextmanager
def running_cluster(
    home: Path,
    db_direct: str,
    *,
    db_for_cluster: str = "",
    provider: str = "dry",
    job_seconds: float = 2.0,
    notes: list[str] | None = None,
) -> Iterator[Cluster]:
    """A started ``tests.cluster.Cluster`` whose processes use ``db_for_cluster`` (default
    ``db_direct``) while the bench's own store handle uses ``db_direct``.

    A start that fails (a process exits or never answers) is retried once in a fresh
    directory with fresh ports, and the reason is added to ``notes``: on a shared machine
    a port picked free can be taken before the process binds it. A second failure raises,
    with the last line of every process log."""
    for attempt in (1, 2):
        sub = home / f"start{attempt}"
        sub.mkdir()
        cluster = Cluster(sub, {"DB_PROVIDER": "postgres",
                                "DATABASE_URL": db_for_cluster or db_direct},
                          StoreSettings(kind="postgres", env={"DATABASE_URL": db_direct}),
                          lease_ttl=TTL, claim_interval=CLAIM, job_seconds=job_seconds,
                          provider=provider)  # fmt: skip
        try:
            cluster.start()
            break
        except (RuntimeError, TimeoutError) as exc:
            reason = f"{exc}: {last_words(sub)}".replace("|", "/")
            cluster.close()
            if attempt == 2:
                raise RuntimeError(reason) from exc
            if notes is not None:
                notes.append(f"cluster start retried after: {reason[:300]}")
    try:
        yield cluster
    finally:
        cluster.close()


def last_words(home: Path) -> str:
    """The last line of each process log under ``home`` (to explain a failed start)."""
    words = []
    for log in sorted(home.glob("*.log")):
        lines = log.read_text(errors="replace").strip().splitlines()
        if lines:
            words.append(f"{log.stem}: {lines[-1][-200:]}")
    return "; ".join(words)


def nodes(cluster: Cluster) -> list[Node]:
    return [*([cluster.gateway] if cluster.gateway else []), *cluster.workers]


# --- the store audit -------------------------------------------------------------------


def tenant_jobs(cluster: Cluster, tenant: str) -> list[Job]:
    jobs: list[Job] = []
    token = ""
    while True:
        page = cluster.store.list_jobs(tenant, JobFilter(), 500, token)
        jobs += page.jobs
        token = page.next_page_token
        if not token:
            return jobs


@dataclass
class Audit:
    missing: int = 0  # acknowledged, but not in the store
    unfinished: int = 0  # acknowledged and stored, but not terminal by the deadline
    duplicated: int = 0  # more than one job for a request id
    stray: int = 0  # a job whose request id was never acknowledged
    per_tenant_mismatch: int = 0  # tenants whose job count differs from their successes
    stored: int = 0
    waited: float = 0.0

    @property
    def lost(self) -> int:
        return self.missing + self.unfinished

    def describe(self) -> str:
        return (
            f"{self.stored} jobs stored; of the acknowledged, {self.missing} missing and "
            f"{self.unfinished} not terminal {self.waited:.0f} s after the load"
        )


def audit(cluster: Cluster, acked: dict[str, tuple[str, str]], tenants: set[str],
          timeout: float) -> Audit:  # fmt: skip
    """Compare the store with ``acked`` (request id -> (tenant, job id)); wait up to
    ``timeout`` for every acknowledged job to be terminal."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        jobs = [j for t in sorted(tenants) for j in tenant_jobs(cluster, t)]
        by_id = {j.job_id: j for j in jobs}
        missing = [jid for _, jid in acked.values()
                   if jid not in by_id or not by_id[jid].status.terminal]  # fmt: skip
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    per_rid = Counter(j.request_id for j in jobs)
    per_tenant = Counter(j.tenant_id for j in jobs)
    want_tenant = Counter(t for t, _ in acked.values())
    return Audit(
        missing=sum(1 for _, jid in acked.values() if jid not in by_id),
        unfinished=sum(1 for _, jid in acked.values()
                       if jid in by_id and not by_id[jid].status.terminal),
        duplicated=sum(n - 1 for n in per_rid.values() if n > 1),
        stray=sum(1 for j in jobs if j.request_id not in acked),
        per_tenant_mismatch=sum(1 for t in tenants | set(per_tenant)
                                if per_tenant[t] != want_tenant[t]),
        stored=len(jobs),
        waited=time.monotonic() - started,
    )  # fmt: skip


def acked_map(shots: list[Shot]) -> dict[str, tuple[str, str]]:
    return {s.request_id: (s.tenant, s.job_id or s.retry_job_id) for s in shots
            if s.ok or s.retry_job_id}  # fmt: skip


# --- scenarios -------------------------------------------------------------------------


@dataclass
class Env:
    pg_url: str  # superuser URL of the server, any database
    outage: Callable[[str], tuple[Outage, str, Callable[[], None]]]  # db URL -> (outage,
    # the URL the cluster should use, cleanup)
    tenants: int


def soak(env: Env, home: Path, rate: float, seconds: float) -> Row:
    row = Row("soak")
    dbname = f"bench_faults_soak_{uuid.uuid4().hex[:8]}"
    db = fresh_database(env.pg_url, dbname)
    try:
        with running_cluster(home, db, notes=row.measures) as cluster:
            send, close = submit_sender(cluster)
            pids = {n.name: n.proc.pid for n in nodes(cluster)}
            t0 = time.monotonic() + 0.5
            shots = make_shots("soak", rate, seconds, env.tenants, t0)
            threads = max(8, min(128, math.ceil(rate / 2)))
            with RssSampler(pids, interval=min(1.0, seconds / 12)) as rss:
                open_loop(shots, send, threads)
            close()
            acked = acked_map(shots)
            found = audit(cluster, acked, {s.tenant for s in shots}, timeout=10)
    finally:
        drop_database(env.pg_url, dbname)
    row.scenario = f"soak {rate:g}/s"
    row.submitted, row.acknowledged = len(shots), len(acked)
    row.errors = sum(1 for s in shots if not s.ok)
    row.lost, row.duplicated, row.half_written = found.lost, found.duplicated, found.stray
    last_end = max(s.end for s in shots)
    achieved = len(acked) / max(1e-9, last_end - t0)
    lat = [(s.end - s.due) * 1000 for s in shots if s.ok]
    row.checks["rate"] = abs(achieved - rate) <= RATE_TOLERANCE * rate
    row.measures.append(f"rate {achieved:.1f}/s of {rate:g} ({achieved / rate:.3f}×)")
    row.measures.append(f"latency p50 {percentile(lat, 0.5):.0f} ms, "
                        f"p99 {percentile(lat, 0.99):.0f} ms")  # fmt: skip
    sixth = seconds / 6
    growths: list[str] = []
    flat = True
    for name in pids:
        warm = rss.mean(name, t0 + sixth, t0 + 2 * sixth)
        tail = rss.mean(name, t0 + seconds - sixth, t0 + seconds + 1)
        first = next((r[name] for _, r in rss.samples if name in r), None)
        last = next((r[name] for _, r in reversed(rss.samples) if name in r), None)
        if warm is None or tail is None or first is None or last is None:
            flat = False
            growths.append(f"{name} no samples")
            continue
        growth = tail / warm - 1
        flat = flat and growth <= RSS_GROWTH_LIMIT
        growths.append(f"{name} {first / 1024:.0f}→{last / 1024:.0f} MiB ({growth:+.1%})")
    row.checks["memory"] = flat
    row.measures.append("RSS start→end (growth last vs 2nd sixth): " + ", ".join(growths))
    row.measures.append(found.describe())
    by_code = Counter(f"{s.status} {s.code}".strip() for s in shots if not s.ok)
    if by_code:
        row.measures.append("errors: " + ", ".join(f"{k} ×{v}" for k, v in by_code.items()))
    return row


def outage(env: Env, home: Path, rate: float, seconds: float) -> Row:
    row = Row("outage")
    dbname = f"bench_faults_outage_{uuid.uuid4().hex[:8]}"
    db = fresh_database(env.pg_url, dbname)
    fault, cluster_db, cleanup = env.outage(db)
    pre, post = min(5.0, max(1.5, seconds / 2)), max(3.0, seconds)
    marks: dict[str, float] = {}
    try:
        with running_cluster(home, db, db_for_cluster=cluster_db, notes=row.measures) as cluster:
            send, close = submit_sender(cluster)
            t0 = time.monotonic() + 0.5
            # pg_ctl stop and start take a moment each; the proxy's halt and resume do not.
            slack = 0.5 if isinstance(fault, TcpProxy) else 2.0
            shots = make_shots("outage", rate, pre + seconds + post + slack, env.tenants, t0)
            threads = max(8, min(256, math.ceil(rate * FAIL_FAST)))

            def controller() -> None:
                time.sleep(max(0.0, t0 + pre - time.monotonic()))
                marks["halt_start"] = time.monotonic()
                try:
                    fault.halt()
                finally:
                    marks["halt_done"] = time.monotonic()
                    time.sleep(seconds)
                    marks["resume_start"] = time.monotonic()
                    fault.resume()
                    marks["resume_done"] = time.monotonic()

            ctl = threading.Thread(target=controller)
            ctl.start()
            open_loop(shots, send, threads)
            ctl.join()
            close()
            refused = [s for s in shots if not s.ok and s.code != "not sent"]
            retried = retry_refused(cluster, refused, timeout=30)
            acked = acked_map(shots)
            found = audit(cluster, acked, {s.tenant for s in shots}, timeout=20)
    finally:
        cleanup()
        drop_database(env.pg_url, dbname)
    during = [s for s in shots
              if s.start >= marks["halt_done"] and s.end <= marks["resume_start"]]  # fmt: skip
    row.submitted, row.acknowledged = len(shots), len(acked)
    # Errors: any answer other than success or a refusal with `unavailable`, a success while
    # the store was down, and a refused submit whose retry never succeeded.
    other = [s for s in shots if not s.ok and not s.refused]
    ok_during = [s for s in during if s.ok]
    row.errors = len(other) + len(ok_during) + (len(refused) - retried)
    row.slow_failures = len({s.index for s in shots if not s.ok and s.took >= FAIL_FAST}
                            | {s.index for s in during if s.took >= FAIL_FAST})  # fmt: skip
    row.lost, row.duplicated = found.lost, found.duplicated
    row.half_written = found.stray + found.per_tenant_mismatch
    after = [s for s in shots if s.start >= marks["resume_done"] + post / 2]
    row.checks["recovered"] = bool(after) and all(s.ok for s in after)
    last_fail = max((s.start for s in shots if not s.ok), default=marks["resume_done"])
    took = [s.took for s in during]
    row.measures += [
        f"store down {marks['resume_start'] - marks['halt_start']:.1f} s",
        f"{len(during)} sent while down: {sum(s.refused for s in during)} refused "
        f"(p50 {percentile(took, 0.5):.2f} s, p99 {percentile(took, 0.99):.2f} s, "
        f"max {max(took, default=0.0):.2f} s)",
        f"{len(refused)} refused in all, {retried} retried OK",
        f"last failure {max(0.0, last_fail - marks['resume_done']):.1f} s after restart",
        found.describe(),
    ]
    by_code = Counter(f"{s.status} {s.code}".strip() for s in other)
    if by_code:
        row.measures.append("other errors: " + ", ".join(f"{k} ×{v}" for k, v in by_code.items()))
    return row


def retry_refused(cluster: Cluster, refused: list[Shot], timeout: float) -> int:
    """Resend each refused submit with its own request id until it succeeds (or
    ``timeout``); return how many succeeded. Sets ``retry_job_id`` on the shots."""
    assert cluster.gateway is not None
    base = cluster.gateway.url
    deadline = time.monotonic() + timeout

    def again(shot: Shot) -> bool:
        client = Client(base)
        try:
            while time.monotonic() < deadline:
                status, resp = client.call("SubmitJob", cluster.job_body(shot.request_id),
                                           shot.tenant)  # fmt: skip
                if status == 200:
                    shot.retry_job_id = str(resp.get("jobId", ""))
                    return bool(shot.retry_job_id)
                if status not in (0, 502, 503, 504):
                    return False
                time.sleep(0.2)
            return False
        finally:
            client.close()

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(again, refused))


def kill(env: Env, home: Path, jobs: int, rate: float) -> Row:
    row = Row("kill")
    dbname = f"bench_faults_kill_{uuid.uuid4().hex[:8]}"
    db = fresh_database(env.pg_url, dbname)
    timing: dict[str, float] = {}
    try:
        with running_cluster(
            home, db, provider="local", job_seconds=1.0, notes=row.measures
        ) as cluster:
            t0 = time.monotonic() + 0.5
            shots = make_shots("kill", rate, jobs / rate, env.tenants, t0)
            items = {s.index: Submitted(s.tenant, s.request_id) for s in shots}
            deadline = t0 + jobs / rate + 60
            lock = threading.Lock()
            done = [0]
            victims: list[Node] = []
            watchers: list[threading.Thread] = []

            def send(shot: Shot) -> None:
                try:
                    cluster.submit(items[shot.index], deadline)
                    shot.status, shot.job_id = 200, items[shot.index].job_id
                except AssertionError as exc:
                    shot.status, shot.code = 0, str(exc)[-80:].replace("|", "/")

            def on_done(shot: Shot) -> None:
                with lock:
                    done[0] += 1
                    if done[0] != max(1, len(shots) // 2):
                        return
                victim = max(cluster.workers, key=lambda w: len(cluster.owned(w.name)))
                victims.append(victim)
                sent = cluster.kill(victim, signal.SIGKILL)

                def watch() -> None:
                    try:
                        n, first, all_ = cluster.time_to_claim(victim, sent, timeout=30)
                        timing.update(orphans=n, first=first, all=all_)
                    except AssertionError:
                        timing["unclaimed"] = 1

                watchers.append(threading.Thread(target=watch))
                watchers[0].start()

            open_loop(shots, send, threads=32, on_done=on_done)
            for w in watchers:
                w.join(40)
            acked = [items[s.index] for s in shots if s.ok]
            try:
                final = cluster.wait_terminal(acked, timeout=60)
            except AssertionError:
                final = {}
                for it in acked:
                    final[it.job_id] = cluster.status_of(it)
            runs = cluster.executions()
            victim_exit = cluster.wait_exit(victims[0]) if victims else 0
    finally:
        drop_database(env.pg_url, dbname)
    ids = [it.job_id for it in acked]
    row.submitted, row.acknowledged = len(shots), len(acked)
    not_completed = sum(1 for st in final.values() if st != "JOB_STATUS_COMPLETED")
    row.errors = sum(1 for s in shots if not s.ok) + not_completed
    row.lost = sum(1 for jid in set(ids) if jid not in runs or not final.get(jid, "").endswith(
        ("COMPLETED", "FAILED", "CANCELLED")))  # fmt: skip
    row.duplicated = (len(ids) - len(set(ids))) + sum(1 for n in runs.values() if n > 1)
    row.half_written = len(set(runs) - set(ids))  # ran, but no submit was acknowledged for it
    row.checks["victim killed"] = victim_exit == -signal.SIGKILL
    row.checks["victim owned jobs"] = timing.get("orphans", 0) > 0
    row.checks["orphans claimed"] = "all" in timing
    retries = sum(max(0, it.attempts - 1) for it in items.values())
    row.measures += [
        f"victim {victims[0].name if victims else '-'} owned {int(timing.get('orphans', 0))} "
        f"active jobs",
        f"first claim {timing.get('first', math.nan):.2f} s, "
        f"all {timing.get('all', math.nan):.2f} s after the kill "
        f"(TTL {TTL:g} s + claim {CLAIM:g} s)",
        f"{retries} submit retries",
        f"{not_completed} not COMPLETED",
    ]
    by_code = Counter(s.code or str(s.status) for s in shots if not s.ok)
    if by_code:
        row.measures.append("errors: " + ", ".join(f"{k} ×{v}" for k, v in by_code.items()))
    return row


# --- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soak-seconds", type=float, default=60)
    parser.add_argument("--rate", type=float, default=500, help="soak submits per second")
    parser.add_argument("--fallback-rates", default="400,300",
                        help="lower soak rates to try, in order, while a soak fails")
    parser.add_argument("--outage-seconds", type=float, default=10)
    parser.add_argument("--outage-rate", type=float, default=100)
    parser.add_argument("--kill-jobs", type=int, default=200)
    parser.add_argument("--kill-rate", type=float, default=40)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--postgres-url", default="")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    private = None
    pg = args.postgres_url
    if not pg:
        private = private_postgres("bench.faults", required=True)
        assert private is not None
        pg = private.url

    def outage_for(db: str) -> tuple[Outage, str, Callable[[], None]]:
        if private is not None:
            return private, db, lambda: None
        parts = urlsplit(db)
        proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432)).start()
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{proxy.port}"
        via = urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2
                                        else host))  # fmt: skip
        return proxy, via, proxy.stop

    env = Env(pg, outage_for, args.tenants)
    rows: list[Row] = []
    try:
        for name in wanted:
            with tempfile.TemporaryDirectory(prefix=f"jennah-faults-{name}-") as d:
                try:
                    if name == "soak":
                        ladder = [args.rate] + [float(r) for r in args.fallback_rates.split(",")
                                                if r.strip() and float(r) < args.rate]
                        for rate in ladder:  # each rate in a fresh directory
                            rows.append(soak(env, Path(tempfile.mkdtemp(dir=d)), rate,
                                             args.soak_seconds))
                            if rows[-1].passed:
                                break
                    elif name == "outage":
                        rows.append(outage(env, Path(d), args.outage_rate, args.outage_seconds))
                    else:
                        rows.append(kill(env, Path(d), args.kill_jobs, args.kill_rate))
                except Exception as exc:  # a crashed scenario is a failed one, not a crash
                    failed = Row(name)
                    failed.checks["ran"] = False
                    failed.measures.append(f"crashed: {exc!r}"[:600].replace("|", "/"))
                    rows.append(failed)
    finally:
        if private is not None:
            private.stop()
    how = ("a private PostgreSQL stopped with pg_ctl" if private is not None
           else "a TCP proxy in front of the given PostgreSQL, closed")  # fmt: skip
    intro = (
        f"Soak and faults: gateway + 3 workers on PostgreSQL, {args.tenants} tenants, admission "
        f"control on (defaults). soak: {args.soak_seconds:g} s at {args.rate:g}/s, dry provider; "
        f"outage: {args.outage_rate:g}/s, store down {args.outage_seconds:g} s ({how}); kill: "
        f"{args.kill_jobs} jobs of 1 s at {args.kill_rate:g}/s, local provider, kill -9 of one "
        f"of 3 workers, TTL {TTL:g} s, claim {CLAIM:g} s. Latency from each submit's due time."
    )
    out = table(rows, intro)
    print(out, flush=True)
    # A failed soak at a rate above the one held is a figure, not a failure of the run.
    failed = [r for r in rows if not r.passed and not (r.scenario.startswith("soak") and any(
        o.passed and o.scenario.startswith("soak") for o in rows))]
    if failed:
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main()
