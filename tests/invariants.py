"""Invariants over whole event histories (docs/design.md §6), checked for every job after a run.

``check_jobs`` reads each job's events and transitions from the store and returns every
violation it finds (an empty list means all hold), so a fault test can report all of
them at once:

* ``seq`` is 1..n: no gap, no repeat;
* the first event is SUBMITTED;
* a terminal job has exactly one terminal event, and it is the last one; an active job
  has none;
* one lifecycle event per transition, in the same order (RETRY for a re-entry into
  PENDING), and LEASE_CLAIMED events only for claims;
* no OUTPUT of an attempt before that attempt's RUNNING;
* no output line twice within an attempt's stream, and, when the lines each job printed
  are known, every one of them present, in order;
* positions strictly increase along each job's stream and are unique in the tenant.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from database.base import JobStore
from jennah.errors import NotFound
from jennah.models import (
    EVENT_FOR_STATUS,
    TERMINAL_KINDS,
    EventKind,
    JobEvent,
    JobStatus,
)

LIFECYCLE = frozenset(EVENT_FOR_STATUS.values()) | {EventKind.RETRY}


def job_violations(
    events: list[JobEvent], transitions_to: list[JobStatus], terminal: bool,
    expected_lines: list[str] | None = None,
) -> list[str]:
    """What is wrong with one job's stream (empty if nothing)."""
    bad: list[str] = []
    seqs = [e.seq for e in events]
    if seqs != list(range(1, len(events) + 1)):
        bad.append(f"seq not 1..n: {seqs[:20]}")
    if not events or events[0].kind is not EventKind.SUBMITTED:
        bad.append(f"first event is {events[0].kind if events else 'missing'}, not SUBMITTED")
    ends = [i for i, e in enumerate(events) if e.kind in TERMINAL_KINDS]
    if terminal and (len(ends) != 1 or ends[0] != len(events) - 1):
        bad.append(f"terminal events at {ends} of {len(events)}")
    if not terminal and ends:
        bad.append(f"an active job has terminal events at {ends}")
    lifecycle = [e.kind for e in events if e.kind in LIFECYCLE]
    expected = [EventKind.SUBMITTED] + [
        EventKind.RETRY if s is JobStatus.PENDING else EVENT_FOR_STATUS[s]
        for s in transitions_to[1:]]
    if lifecycle != expected:
        bad.append(f"lifecycle events {[k.value for k in lifecycle]} != transitions "
                   f"{[k.value for k in expected]}")
    running: set[int] = set()
    lines: dict[tuple[int, str], list[str]] = defaultdict(list)
    for e in events:
        if e.kind is EventKind.RUNNING:
            running.add(e.attempt)
        elif e.kind is EventKind.OUTPUT:
            if e.attempt not in running:
                bad.append(f"output of attempt {e.attempt} at seq {e.seq} before its RUNNING")
            lines[(e.attempt, e.message)].extend(e.output.splitlines())
    for key, printed in lines.items():  # jobs under test print distinct lines
        twice = {line for line in printed if printed.count(line) > 1}
        if twice:
            bad.append(f"output lines repeated in attempt {key[0]} {key[1]}: {sorted(twice)[:5]}")
    if expected_lines is not None:
        got = [line for key in sorted(lines) if key[1] == "stdout" for line in lines[key]]
        if got != expected_lines:
            missing = [x for x in expected_lines if x not in got]
            bad.append(f"stdout lines: {len(got)} of {len(expected_lines)}, missing "
                       f"{missing[:5]}, order ok: {sorted(got) == sorted(expected_lines)}")
    positions = [e.position for e in events]
    if positions != sorted(set(positions)) or 0 in positions:
        bad.append(f"positions not strictly increasing: {positions[:20]}")
    return bad


def check_jobs(
    store: JobStore,
    jobs: Iterable[tuple[str, str]],
    expected_lines: Mapping[str, list[str]] | None = None,
) -> list[str]:
    """Violations over ``(tenant_id, job_id)`` pairs (deleted jobs are skipped), plus the
    tenant-wide position check. Each violation names its job."""
    problems: list[str] = []
    tenants: set[str] = set()
    for tenant, job_id in jobs:
        try:
            job = store.get_job(tenant, job_id)
            transitions = store.list_transitions(tenant, job_id)
        except NotFound:
            continue
        tenants.add(tenant)
        events = store.list_events(tenant, job_id, 0, 1_000_000)
        lines = None if expected_lines is None else expected_lines.get(job_id)
        for v in job_violations(events, [t.to_status for t in transitions],
                                job.status.terminal, lines):  # fmt: skip
            problems.append(f"job {job_id} ({job.status.value}): {v}")
    for tenant in sorted(tenants):
        positions = [e.position for e in store.list_tenant_events(tenant, 0, 10_000_000)]
        if positions != sorted(set(positions)):
            problems.append(f"tenant {tenant}: positions not unique and increasing")
    return problems
