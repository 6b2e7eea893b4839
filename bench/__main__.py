"""``make bench``: run every benchmark and write their tables to docs/benchmarks-run.md.

docs/benchmarks.md is the curated report (figures plus what they mean); this file is the
raw output of the latest run, with the machine facts, so a reader can compare.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import platform
import sys
import time
from pathlib import Path

BENCHES = ("bench.ring", "bench.wal", "bench.submit", "bench.failover", "bench.providers_poll")


def main() -> int:
    out = [f"# Benchmark run {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", "",
           f"- machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
           f"- python: {sys.version.split()[0]}", ""]
    failed = 0
    for name in BENCHES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        print(f"== {name}", flush=True)
        buf = io.StringIO()
        started = time.monotonic()
        try:
            with contextlib.redirect_stdout(buf):
                module.main([]) if name == "bench.submit" else module.main()
        except SystemExit as exc:  # a bench may exit non-zero when a goal is missed
            failed += bool(exc.code)
        except Exception as exc:
            failed += 1
            buf.write(f"\nFAILED: {exc!r}\n")
        print(buf.getvalue(), flush=True)
        out += [f"## {name} ({time.monotonic() - started:.0f} s)", "", buf.getvalue(), ""]
    Path("docs").mkdir(exist_ok=True)
    Path("docs/benchmarks-run.md").write_text("\n".join(out))
    print("wrote docs/benchmarks-run.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
