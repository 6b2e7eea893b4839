"""``bench/faults.py`` end to end at tiny sizes: a 5 s soak at 20/s, a 2 s store outage
(through the bench's TCP proxy, since the session's PostgreSQL is shared) and a ``kill -9``
among ~30 jobs.

Its timings are not asserted (the machine may be loaded; ``make bench`` judges them): only
that the table has a row per scenario, that the ratios and memory figures exist, and that
the fault counts are zero: nothing lost, duplicated or half-written, no slow failure.
"""

from __future__ import annotations

import re

import pytest

from bench import faults

pytestmark = pytest.mark.e2e

ARGV = ["--soak-seconds", "5", "--rate", "20", "--fallback-rates", "", "--outage-seconds", "2",
        "--outage-rate", "20", "--kill-jobs", "30", "--kill-rate", "15",
        "--tenants", "6"]  # fmt: skip
COLUMNS = ["scenario", "result", "submitted", "acknowledged", "errors", "lost", "duplicated",
           "half-written", "slow failures", "measures"]  # fmt: skip


def rows_of(out: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == COLUMNS
    rows = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        assert len(cells) == len(COLUMNS), ln
        rows[cells[0]] = dict(zip(COLUMNS, cells, strict=True))
    return rows


@pytest.mark.timeout(120)
def test_bench_faults_smoke(postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        returned: str | None = faults.main([*ARGV, "--postgres-url", postgres_url])
    except SystemExit as exc:  # a missed timing goal fails the bench, not this test
        assert exc.code == 1
        returned = None
    out = capsys.readouterr().out
    assert returned is None or returned in out
    rows = rows_of(out)
    assert set(rows) == {"soak 20/s", "outage", "kill"}
    for name, row in rows.items():
        assert "crashed" not in row["measures"], row
        assert re.fullmatch(r"PASS|FAIL.*", row["result"]), row
        assert int(row["submitted"]) > 0 and int(row["acknowledged"]) == int(row["submitted"]), row
        for count in ("lost", "duplicated", "half-written", "slow failures"):
            assert row[count] == "0", (name, count, row)
    soak, outage, kill = rows["soak 20/s"], rows["outage"], rows["kill"]
    assert re.search(r"rate [\d.]+/s of 20 \([\d.]+×\)", soak["measures"]), soak
    assert re.search(r"latency p50 \d+ ms, p99 \d+ ms", soak["measures"]), soak
    for proc in ("gateway", "w1", "w2", "w3"):
        assert re.search(rf"{proc} \d+→\d+ MiB \([+-][\d.]+%\)", soak["measures"]), soak
    # The outage happened (the proxy refused and reset connections) and each refused
    # submit was retried into exactly one job.
    m = re.search(r"(\d+) refused in all, (\d+) retried OK", outage["measures"])
    assert m is not None and int(m[1]) > 0 and m[1] == m[2], outage
    # The kill hit a worker that owned active jobs, and they were all taken over.
    assert re.search(r"owned [1-9]\d* active jobs", kill["measures"]), kill
    assert "first claim nan" not in kill["measures"], kill
