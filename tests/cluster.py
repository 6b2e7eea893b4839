"""A real multi-process Jennah cluster for failover tests and ``bench/failover.py``.

One gateway and N workers, each a ``python -m jennah`` process, sharing one job store and
one local-provider directory (the "batch service" every worker on the host can see), with
short lease settings. Each worker keeps its own WAL directory, as separate hosts would.

Jobs are shell commands that append ``$JENNAH_JOB_ID`` to ``executions.log`` when they
start, so the number of times the provider ran each job is counted exactly (O_APPEND of
one short line is atomic).
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from database import create_store
from database.base import JobStore
from jennah.models import Job
from jennah.settings import StoreSettings
from tests.helpers import call, free_port, start_jennah, stop, wait_http

TERMINAL = {"JOB_STATUS_COMPLETED", "JOB_STATUS_FAILED", "JOB_STATUS_CANCELLED"}


@dataclass
class Node:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Submitted:
    tenant: str
    request_id: str
    job_id: str = ""
    attempts: int = 0


@dataclass
class Cluster:
    home: Path
    store_env: dict[str, str]
    store_settings: StoreSettings
    n_workers: int = 3
    lease_ttl: float = 3.0
    claim_interval: float = 1.0
    job_seconds: float = 2.0
    poll_interval: float = 1.0
    provider: str = "local"
    workers: list[Node] = field(default_factory=list)
    gateway: Node | None = None
    _store: JobStore | None = None

    @property
    def executions_log(self) -> Path:
        return self.home / "executions.log"

    @property
    def store(self) -> JobStore:
        if self._store is None:
            self._store = create_store(self.store_settings)
        return self._store

    def _env(self) -> dict[str, str]:
        return {
            "JENNAH_DEV_MODE": "1", "JENNAH_HOME": str(self.home), "BATCH_PROVIDER": self.provider,
            "LOCAL_BATCH_DIR": str(self.home / "local"),
            "WORKER_POLL_INTERVAL_SECONDS": str(self.poll_interval),
            "WORKER_LEASE_TTL_SECONDS": str(self.lease_ttl),
            "WORKER_CLAIM_INTERVAL_SECONDS": str(self.claim_interval),
            "GATEWAY_HEALTH_INTERVAL_SECONDS": "0.5",
            "SHUTDOWN_GRACE_SECONDS": "3",
            **self.store_env,
        }  # fmt: skip

    def start(self) -> Cluster:
        env = self._env()
        for i in range(1, self.n_workers + 1):
            port = free_port()
            name = f"w{i}"
            wenv = dict(env, WORKER_ID=name, WORKER_PORT=str(port),
                        WAL_DIR=str(self.home / name / "wal"),
                        ARCHIVE_DIR=str(self.home / name / "archive"))  # fmt: skip
            log = self.home / f"{name}.log"
            self.workers.append(Node(name, f"http://127.0.0.1:{port}",
                                     start_jennah("worker", wenv, log), log, wenv))  # fmt: skip
        for w in self.workers:
            wait_http(f"{w.url}/health", timeout=30, proc=w.proc)
        gport = free_port()
        glog = self.home / "gateway.log"
        gproc = start_jennah("gateway", dict(env, GATEWAY_PORT=str(gport),
                             WORKER_ENDPOINTS=",".join(w.url for w in self.workers)), glog)
        self.gateway = Node("gateway", f"http://127.0.0.1:{gport}", gproc, glog)
        wait_http(f"{self.gateway.url}/ready", timeout=30, proc=gproc)
        return self

    def restart(self, node: Node) -> None:
        """Start the (stopped) worker again: same id, port, WAL directory and settings."""
        assert node.proc.poll() is not None, "stop it first"
        node.proc = start_jennah("worker", node.env, node.log)
        wait_http(f"{node.url}/health", timeout=30, proc=node.proc)

    def close(self) -> None:
        for node in [*self.workers, *([self.gateway] if self.gateway else [])]:
            stop(node.proc, timeout=10)
        if self._store is not None:
            self._store.close()

    # --- jobs --------------------------------------------------------------------------

    def job_body(self, request_id: str) -> dict[str, Any]:
        script = f'echo "$JENNAH_JOB_ID" >> {self.executions_log}; sleep {self.job_seconds}'
        return {"image_uri": "busybox", "commands": ["sh", "-c", script],
                "request_id": request_id}  # fmt: skip

    def submit(self, item: Submitted, deadline: float) -> Submitted:
        """SubmitJob through the gateway, retrying ``unavailable`` and transport errors
        with the same request id (so a retry can never make a second job)."""
        assert self.gateway is not None
        while True:
            item.attempts += 1
            try:
                status, resp = call(self.gateway.url, "SubmitJob", self.job_body(item.request_id),
                                    {"X-Tenant-Id": item.tenant})  # fmt: skip
            except OSError:
                status, resp = 0, {}
            if status == 200:
                item.job_id = resp["jobId"]
                return item
            if status not in (0, 503, 502, 504) or time.monotonic() > deadline:
                raise AssertionError(f"submit {item} failed: {status} {resp}")
            time.sleep(0.1)

    def submit_many(self, n: int, tenants: int, *, threads: int = 8,
                    on_progress: Any = None) -> list[Submitted]:  # fmt: skip
        items = [Submitted(f"tenant-{i % tenants:02d}", f"fo-{uuid.uuid4().hex}")
                 for i in range(n)]  # fmt: skip
        deadline = time.monotonic() + 120
        done: list[Submitted] = []
        with ThreadPoolExecutor(threads) as pool:
            for item in pool.map(lambda it: self.submit(it, deadline), items):
                done.append(item)
                if on_progress is not None:
                    on_progress(len(done))
        return done

    def status_of(self, item: Submitted) -> str:
        assert self.gateway is not None
        status, resp = call(self.gateway.url, "GetJob", {"job_id": item.job_id},
                            {"X-Tenant-Id": item.tenant})  # fmt: skip
        return str(resp["job"]["status"]) if status == 200 else f"error {status}"

    def wait_terminal(self, items: list[Submitted], timeout: float) -> dict[str, str]:
        """Wait until every job is terminal; return job_id -> final status."""
        final: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while len(final) < len(items):
            for item in items:
                if item.job_id not in final:
                    st = self.status_of(item)
                    if st in TERMINAL:
                        final[item.job_id] = st
            if len(final) < len(items):
                if time.monotonic() > deadline:
                    pending = [i.job_id for i in items if i.job_id not in final]
                    raise AssertionError(f"{len(pending)} jobs not terminal: {pending[:5]}")
                time.sleep(0.2)
        return final

    def executions(self) -> Counter[str]:
        if not self.executions_log.exists():
            return Counter()
        return Counter(self.executions_log.read_text().split())

    # --- faults ------------------------------------------------------------------------

    def owned(self, worker: str) -> list[Job]:
        return self.store.list_owned_jobs(worker)

    def info(self, node: Node) -> dict[str, Any]:
        with urllib.request.urlopen(f"{node.url}/info", timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def kill(self, node: Node, sig: int) -> float:
        """Send ``sig``; return the monotonic time it was sent."""
        sent = time.monotonic()
        node.proc.send_signal(sig)
        return sent

    def time_to_claim(self, victim: Node, sent: float, timeout: float) -> tuple[int, float, float]:
        """After ``victim`` got a signal at ``sent``: wait until a peer owns every active job
        the victim owned. Return ``(orphans, seconds to first claim, seconds to all)``.

        Orphans are the victim's active jobs seen right after the signal; a job that
        finishes before it is claimed (possible only during a graceful drain) counts as
        handled."""
        orphans = {j.job_id: j.tenant_id for j in self.owned(victim.name)}
        first = 0.0
        deadline = sent + timeout
        while True:
            left = {j.job_id for j in self.owned(victim.name)} & orphans.keys()
            now = time.monotonic()
            if len(left) < len(orphans) and not first:
                first = now - sent
            if not left:
                return len(orphans), first or now - sent, now - sent
            if now > deadline:
                raise AssertionError(f"{len(left)} of {len(orphans)} orphans unclaimed")
            time.sleep(0.01)

    def submit_with_a_death(
        self, jobs: int, tenants: int, sig: int, kill_after: int
    ) -> tuple[list[Submitted], Node, dict[str, float]]:
        """Submit ``jobs``; once ``kill_after`` are acknowledged, send ``sig`` to the worker
        owning the most active jobs and time the takeover (``time_to_claim``) in a thread.
        Return the submissions, the victim and ``{orphans, first, all}``."""
        timing: dict[str, float] = {}
        victims: list[Node] = []
        watchers: list[threading.Thread] = []

        def on_progress(done: int) -> None:
            if done != kill_after:
                return
            victim = max(self.workers, key=lambda w: len(self.owned(w.name)))
            victims.append(victim)
            sent = self.kill(victim, sig)

            def watch() -> None:
                n, first, all_ = self.time_to_claim(victim, sent, timeout=30)
                timing.update(orphans=n, first=first, all=all_)

            watchers.append(threading.Thread(target=watch))
            watchers[0].start()

        items = self.submit_many(jobs, tenants, on_progress=on_progress)
        watchers[0].join(40)
        return items, victims[0], timing

    def wait_exit(self, node: Node, timeout: float = 15) -> int:
        try:
            return node.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(5)
            raise
