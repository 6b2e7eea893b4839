"""One smoke scenario per benchmark, so ``make bench`` stays runnable.

Tiny sizes; timings are never asserted, only that each figure and ratio exists, and that
the fault counts are zero. The WAL, poller and fault benchmarks have their own smoke
modules (``test_bench_wal_smoke``, ``test_bench_poller_smoke``,
``test_bench_faults_smoke``).
"""

from __future__ import annotations

import re

import pytest

from bench import __main__ as bench_main
from bench import failover, providers_poll, ring, submit


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def test_ring_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    ring.main(["--tenants", "500"])
    out = capsys.readouterr().out
    rows = table_rows(out, "3 → 4") + table_rows(out, "10 → 11")
    assert len(rows) == 2
    assert all(re.fullmatch(r"[\d.]+%", r[1]) for r in rows)  # remap fraction exists


def test_submit_smoke(postgres_url: str) -> None:
    out = submit.main(["--load", "python", "--seconds", "1", "--runs", "1", "--connections", "2",
                       "--servers", "uvicorn", "--postgres-url", postgres_url])  # fmt: skip
    for store in ("sqlite", "postgres"):
        [direct] = table_rows(out, f"direct ({store})")
        [gateway] = table_rows(out, f"gateway ({store})")
        assert re.fullmatch(r"[\d.]+× floor", direct[5]) and direct[4] == "0"
        assert re.fullmatch(r"[\d.]+× direct", gateway[5]) and gateway[4] == "0"
    [latency] = table_rows(out, "gateway")  # the one-connection latency row
    assert re.fullmatch(r"[+-][\d.]+ ms", latency[4])
    [server] = table_rows(out, "uvicorn")
    assert server[4] == "1.00×"


@pytest.mark.e2e
def test_failover_smoke(postgres_url: str) -> None:
    out = failover.main(["--runs", "1", "--jobs", "24", "--tenants", "6",
                         "--postgres-url", postgres_url])  # fmt: skip
    rows = table_rows(out, "kill -9") + table_rows(out, "SIGTERM")
    assert len(rows) == 2
    for row in rows:
        assert re.fullmatch(r"[\d.]+×", row[6])  # the ratio to the goal exists
        assert row[8] == "0"  # lost + duplicated + not completed


def test_providers_poll_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    providers_poll.main(["--jobs", "50"])
    out = capsys.readouterr().out
    assert out.count("|") > 20 and "calls" in out


def test_make_bench_writes_the_report(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """The collector writes machine facts and a section per benchmark (ring only here)."""
    from pathlib import Path

    out = Path(str(tmp_path)) / "b.md"
    assert bench_main.main(["--only", "ring", "--out", str(out)]) == 0
    text = out.read_text()
    assert "- machine:" in text and "## Ring balance and remap" in text and "| 3 → 4 |" in text


WRK_REPORT = """Running 3s test @ http://127.0.0.1:1/x
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.11ms    4.02ms  45.03ms   89.00%
    Req/Sec     3.60k   416.42     4.08k    82.50%
  Latency Distribution
     50%    4.25ms
     75%    6.00ms
     90%   10.00ms
     99%    1.20s
  21600 requests in 3.00s, 3.10MB read
  Non-2xx or 3xx responses: 7
Requests/sec:   7200.00
"""


def test_wrk_report_is_read_from_its_latency_lines() -> None:
    from bench.submit import parse_wrk

    r = parse_wrk("x", WRK_REPORT)
    assert (r.rps, r.p50_ms, r.p99_ms, r.errors) == (7200.0, 4.25, 1200.0, 7)


def test_tasks_smoke() -> None:
    from bench import tasks

    out = tasks.main(["--tasks", "300", "--runs", "1", "--local-tasks", "50"])
    for step in ("accept (SubmitJob answered)", "complete (GetJob: COMPLETED)"):
        [row] = table_rows(out, step)
        assert re.fullmatch(r"[\d,]+ ms \([\d,]+–[\d,]+\)", row[1]), row
        assert row[3].endswith("×") and row[4].startswith("<"), row
    [local] = table_rows(out, "Jennah, local provider")
    assert re.fullmatch(r"[\d.,]+", local[1]) and local[3].endswith("×"), local
