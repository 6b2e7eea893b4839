"""bench/tasks_local.py at a tiny size: every figure is there and sane, and the table
carries both sides and their ratio."""

from __future__ import annotations

import math

import pytest

from bench import tasks_local
from providers.local import DEFAULT_TASK_PARALLELISM

pytestmark = pytest.mark.timeout(120)


def test_measure_times_both_sides_of_each_run() -> None:
    runs = tasks_local.measure(40, parallelism=0, runs=2)
    assert len(runs) == 2
    for run in runs:
        assert (run.tasks, run.at_a_time) == (40, DEFAULT_TASK_PARALLELISM)
        for side in (run.local, run.floor):
            assert 0 < side.start_span < side.seconds < 60
            assert 0 < side.rate(40) < math.inf
        # Nothing starts 40 processes faster than it can fork: well under a million a second.
        assert 0 < run.local.start_rate(40) < 1e6 and 0 < run.floor.start_rate(40) < 1e6
        assert math.isclose(run.ratio, run.local.rate(40) / run.floor.rate(40))


def test_main_prints_and_returns_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    out = tasks_local.main(["--tasks", "30", "--parallelism", "4", "--runs", "1"])
    assert out.strip() == capsys.readouterr().out.strip()
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows] == [
        "side", "floor: subprocess.Popen", "local provider", "ratio local / floor"]
    for row in rows[1:3]:
        assert [c.strip() for c in row[1:3]] == ["30", "4"]
        assert all(float(c.split()[0].replace(",", "")) > 0 for c in row[3:])
    assert float(rows[3][4].split()[0]) > 0
