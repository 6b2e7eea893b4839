"""Jobs of several tasks through real processes (docs/design.md §16): a gateway, workers on a
shared SQLite store and the local provider.

* A job of 6 tasks, 2 at a time, where task 1 fails: every task runs exactly once, at
  most two at once; the job FAILED naming task 1; ListTasks and the task counts agree;
  each task's output arrives with its task index; the event stream is gapless, the
  task's failure comes before the terminal event; one notification.
* The owner is killed (-9) in the middle of a job of 8 tasks: a peer takes it over and
  every task still runs exactly once, and the job completes.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jennah.settings import StoreSettings
from tests.cluster import Cluster
from tests.helpers import call, wait_until

pytestmark = pytest.mark.e2e
ACME = {"X-Tenant-Id": "acme"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    db = str(tmp_path / "jennah.db")
    c = Cluster(tmp_path, {"DB_PROVIDER": "sqlite", "DB_PATH": db},
                StoreSettings(kind="sqlite", env={"DB_PATH": db}), n_workers=2,
                poll_interval=0.2)  # fmt: skip
    try:
        yield c.start()
    finally:
        c.close()


def rpc(c: Cluster, method: str, body: dict[str, Any]) -> dict[str, Any]:
    assert c.gateway is not None
    status, resp = call(c.gateway.url, method, body, ACME)
    assert status == 200, (method, status, resp)
    return resp


def runs(log: Path) -> Counter[str]:
    return Counter(log.read_text().split()) if log.exists() else Counter()


def test_a_job_of_six_tasks_runs_each_once_and_fails_naming_task_1(
    cluster: Cluster, tmp_path: Path
) -> None:
    log = tmp_path / "tasks.log"
    live = tmp_path / "live"
    live.mkdir()
    script = (f'echo $JENNAH_TASK_INDEX >> {log}; touch {live}/$JENNAH_TASK_INDEX; '
              f'ls {live} | wc -l >> {tmp_path}/concurrency; sleep 0.5; '
              f'rm {live}/$JENNAH_TASK_INDEX; '
              'echo "task $JENNAH_TASK_INDEX of $JENNAH_TASK_COUNT"; '
              '[ "$JENNAH_TASK_INDEX" != 1 ] || exit 4')
    job = rpc(cluster, "SubmitJob", {"image_uri": "busybox", "commands": ["sh", "-c", script],
                                     "task_count": 6, "parallelism": 2, "name": "sweep"})
    job_id = job["jobId"]

    def final() -> dict[str, Any] | None:
        got = rpc(cluster, "GetJob", {"job_id": job_id})["job"]
        return got if got["status"] in ("JOB_STATUS_COMPLETED", "JOB_STATUS_FAILED") else None

    done = wait_until(final, timeout=60)
    assert done["status"] == "JOB_STATUS_FAILED"
    assert done["errorMessage"] == "task 1 failed: exit code 4"
    assert done["exitCode"] == 4 and done["failureClass"] == "FAILURE_CLASS_USER_ERROR"
    assert (done["taskCount"], done["parallelism"]) == (6, 2)
    assert done["taskCounts"] == {"succeeded": 5, "failed": 1}  # zeros are not printed
    assert runs(log) == Counter({str(i): 1 for i in range(6)})  # each task exactly once
    seen = [int(n) for n in (tmp_path / "concurrency").read_text().split()]
    assert max(seen) <= 2, seen
    tasks = rpc(cluster, "ListTasks", {"job_id": job_id})["tasks"]
    assert [(t.get("index", 0), t["status"], t.get("exitCode", 0)) for t in tasks] == [
        (i, "TASK_STATUS_FAILED" if i == 1 else "TASK_STATUS_SUCCEEDED", 4 if i == 1 else 0)
        for i in range(6)]
    events = rpc(cluster, "ListJobEvents", {"job_id": job_id})["events"]
    assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["kind"] == "EVENT_KIND_FAILED"
    out = {(e.get("taskIndex", 0), e["output"]) for e in events
           if e["kind"] == "EVENT_KIND_OUTPUT"}
    assert out == {(i, f"task {i} of 6\n") for i in range(6)}
    details = [e for e in events if e["kind"] == "EVENT_KIND_STATUS_DETAIL"
               and e.get("taskIndex") == 1]
    assert [d["message"] for d in details] == ["task 1 failed: exit code 4 (user_error)"]
    notes = rpc(cluster, "ListNotifications", {})
    mine = [n for n in notes.get("notifications", []) if n["jobId"] == job_id]
    assert [(n["finalStatus"], n["jobName"]) for n in mine] == [("JOB_STATUS_FAILED", "sweep")]


def test_the_owner_dies_mid_job_and_every_task_still_runs_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    log = tmp_path / "tasks.log"
    script = f"echo $JENNAH_TASK_INDEX >> {log}; sleep 1"
    job = rpc(cluster, "SubmitJob", {"image_uri": "busybox", "commands": ["sh", "-c", script],
                                     "task_count": 8, "parallelism": 2})
    job_id, owner = job["jobId"], job["workerId"]
    wait_until(lambda: len(runs(log)) >= 3, timeout=30)  # mid-job
    victim = next(w for w in cluster.workers if w.name == owner)
    cluster.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 90

    def final() -> dict[str, Any] | None:
        got = rpc(cluster, "GetJob", {"job_id": job_id})["job"]
        assert time.monotonic() < deadline
        return got if got["status"].endswith(("COMPLETED", "FAILED", "CANCELLED")) else None

    done = wait_until(final, timeout=90)
    assert done["status"] == "JOB_STATUS_COMPLETED", done
    assert done["ownerWorkerId"] != owner
    assert done["taskCounts"] == {"succeeded": 8}
    assert runs(log) == Counter({str(i): 1 for i in range(8)})
    events = rpc(cluster, "ListJobEvents", {"job_id": job_id})["events"]
    assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1))
    assert [e["kind"] for e in events].count("EVENT_KIND_COMPLETED") == 1
