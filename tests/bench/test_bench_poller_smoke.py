"""bench/poller.py at tiny sizes: every figure is there, positive, and the poller asks the
provider exactly ceil(active jobs / max_status_batch) times per cycle."""

from __future__ import annotations

import math

import pytest

from bench import poller
from providers.memory import FakeProvider

pytestmark = pytest.mark.timeout(60)

JOBS, CYCLES = 200, 2
CONFIGS = ("floor", "sqlite + store events", "sqlite + WAL events")


def test_measure_figures_and_call_counts() -> None:
    results = poller.measure(JOBS, CYCLES, churn=0.02)  # about 1-4 s
    batch = FakeProvider().capabilities.max_status_batch
    assert [(r.name, r.mode) for r in results] == [
        (name, mode) for name in CONFIGS for mode in ("steady", "churn 2%")
    ] + [("provider.status() only", "steady")]
    for r in results:
        assert len(r.cycles) == CYCLES, r.name
        for c in r.cycles:
            assert c.cpu > 0 and c.wall > 0, (r.name, r.mode, c)
            assert c.status_calls == math.ceil(c.active / batch), (r.name, r.mode, c)
            assert c.active <= JOBS
        if r.name == "provider.status() only":
            continue
        if r.mode == "steady":
            assert all(c.active == JOBS for c in r.cycles)
            # A steady cycle reads the owned jobs once and writes nothing.
            assert all(c.store_calls == 1 for c in r.cycles), (r.name, r.cycles)
        else:  # 4 jobs move per cycle (2 complete): 4 writes, grouped in 1 to 4 commits
            assert all(2 <= c.store_calls <= 1 + 4 for c in r.cycles), (r.name, r.cycles)
            assert r.cycles[-1].active == JOBS - 2 * (CYCLES - 1)  # counted as each cycle starts


def test_main_prints_and_returns_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    out = poller.main(["--jobs", "120", "--cycles", "1"])
    assert out.strip() == capsys.readouterr().out.strip()
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| configuration | mode |")
    assert len(rows) == 1 + 2 * len(CONFIGS) + 1
    floor_steady = rows[1].split("|")
    assert floor_steady[1].strip() == "floor" and floor_steady[-3].strip() == "1.0"
    assert "ceil(jobs / batch) = 2 status calls" in out
