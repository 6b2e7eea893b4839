"""The WAL benchmark runs end to end at tiny sizes (its figures exist and are positive;
their values are judged by ``make bench``, not here)."""

from __future__ import annotations

import pytest

from bench import wal


def test_bench_wal_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    figures = wal.main(["--seconds", "0.05", "--runs", "1", "--recovery-records", "300",
                        "--archive-outputs", "40"])
    expected = {
        "floor_fsync_ops", "floor_fdatasync_ops", "walfile_append_ops", "walfile_vs_floor",
        "single_append_ops", "single_vs_floor", "single_fsyncs_per_event", "group32_ops",
        "group32_vs_single", "group32_fsyncs_per_event", "group32_events_per_fsync",
        "recovery_scan_seconds", "recovery_open_seconds", "archive_reduction",
        "archive_original_bytes", "archive_compressed_bytes", "archive_segments",
    }
    assert expected <= figures.keys()
    assert all(figures[k] > 0 for k in expected), {k: figures[k] for k in expected}
    out = capsys.readouterr().out
    assert out.startswith("## WAL") and "| recovery scan, 300 records |" in out
