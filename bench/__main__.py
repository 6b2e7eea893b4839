"""``make bench``: run every benchmark and write ``docs/benchmarks.md``.

Each benchmark prints markdown (its tables, with figures as medians and ranges over
several runs, and ratios to a floor measured in the same run); this collects them under
the machine's facts, with each section's wall time. ``docs/performance.md`` holds the
reading of these figures (profiles, what was changed, why a goal is missed).

Run: ``make bench`` or ``.venv/bin/python -m bench [--only submit,wal] [--out FILE]``.
A benchmark that raises or exits non-zero (a goal it checks was missed, e.g. a fault
scenario failed) is reported in its section and makes the run exit 1, after the file is
written. Budget: under 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import io
import os
import platform
import sys
import time
from pathlib import Path

# (module, arguments, section title). Sizes are the defaults unless the budget says less.
BENCHES: tuple[tuple[str, list[str], str], ...] = (
    ("bench.ring", [], "Ring balance and remap"),
    ("bench.wal", [], "Event WAL"),
    ("bench.submit", ["--seconds", "3", "--runs", "3"], "Submit throughput, gateway overhead, server choice"),  # noqa: E501
    ("bench.failover", ["--runs", "3", "--jobs", "90", "--tenants", "9"], "Failover takeover"),
    ("bench.events", [], "Events: idle watchers, output throughput, per-tenant commit rate"),
    ("bench.poller", [], "Poller cost with 10k active jobs"),
    ("bench.providers_poll", ["--jobs", "2000"], "Cloud providers: polling cost (2,000 jobs)"),
    ("bench.tasks_local", [], "Local provider: task start rate (a job of 2,000 tasks)"),
    ("bench.tasks", [], "Jobs of 10,000 tasks: accept and complete"),
    ("bench.faults", [], "Soak and faults"),
)
PACKAGES = ("connectrpc", "uvicorn", "hypercorn", "pyvoy", "protobuf", "psycopg", "zstandard",
            "crcmod", "uhashring")


def machine_facts() -> list[str]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, IndexError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    versions = []
    for pkg in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"- machine: {platform.machine()}, {os.cpu_count()} cores ({cpu or 'unknown CPU'}), "
        f"{mem or 'unknown'} RAM; {platform.platform()}",
        f"- python {sys.version.split()[0]}; {', '.join(versions)}",
        f"- load average at start: {load} (figures from a busy machine are not comparable)",
        "- loopback only; every server is a real process started by the benchmark",
    ]


def run_one(module_name: str, args: list[str]) -> tuple[str, bool, float]:
    """Run one benchmark; return (its output, ok, seconds)."""
    module = importlib.import_module(module_name)
    buf = io.StringIO()
    ok = True
    started = time.monotonic()
    try:
        with contextlib.redirect_stdout(buf):
            result = module.main(args)
        if isinstance(result, int) and result != 0:
            ok = False
    except SystemExit as exc:  # a bench exits non-zero when a goal it checks is missed
        ok = not exc.code
        if isinstance(exc.code, str):
            buf.write(f"\n{exc.code}\n")
    except Exception as exc:  # report and go on with the others
        ok = False
        buf.write(f"\nFAILED: {exc!r}\n")
    return buf.getvalue().strip(), ok, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma list of bench names (e.g. ring,wal)")
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args(argv)
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    started = time.monotonic()
    out = ["# Benchmarks", "",
           f"Written by `make bench` on {time.strftime('%Y-%m-%d %H:%M %Z')}. Every figure is "
           "measured in this run; ratios are to a floor measured in the same run. What the "
           "figures mean, the profiles and the goals missed: `docs/performance.md`.", "",
           *machine_facts(), ""]  # fmt: skip
    failed: list[str] = []
    for module_name, bench_args, title in BENCHES:
        short = module_name.removeprefix("bench.")
        if wanted and short not in wanted:
            continue
        print(f"== {module_name} {' '.join(bench_args)}", flush=True)
        text, ok, seconds = run_one(module_name, bench_args)
        print(text, flush=True)
        if not ok:
            failed.append(short)
        status = "" if ok else " — **a goal or check FAILED, see below**"
        out += [f"## {title} (`python -m {module_name} {' '.join(bench_args)}`, "
                f"{seconds:.0f} s){status}", "", text, ""]
    out += [f"Total: {time.monotonic() - started:.0f} s."
            + (f" Failed: {', '.join(failed)}." if failed else ""), ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(out))
    print(f"wrote {args.out} ({time.monotonic() - started:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
