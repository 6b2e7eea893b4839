"""Submit throughput and latency: SubmitJob against a trivial RPC on the same server stack.

Everything runs as real processes on loopback, loaded by ``wrk`` (Connect JSON over
HTTP/1.1, like curl), with the ``dry`` provider (accepts and completes instantly) and
admission control off (the bench measures the server, not the rate limit). Each figure
is the median of ``--runs`` runs of ``--seconds`` each, with the range beside it:

* the **floor**: ``GetCurrentTenant`` on a worker, an RPC that only parses headers, so
  it costs what the server stack (server + connectrpc + our router) costs;
* ``SubmitJob`` straight to a worker, on SQLite and on PostgreSQL, as a ratio to the
  floor (goals: ≥ 0.25× on SQLite, ≥ 0.15× on PostgreSQL), and from one connection:
  32 connections must do at least 4× what one does (they share commits);
* **fsyncs per submit** at ``-c32`` on SQLite: ``strace -c`` of every thread of the
  worker counts ``fsync``/``fdatasync`` over one run, divided by the submits it answered
  (goal ≤ 0.5; a run of its own, since strace slows the worker);
* ``SubmitJob`` through the gateway, as a ratio to the direct figure (goal ≥ 0.8×);
* the latency the gateway adds, from one connection at a time (so no queueing hides it):
  p50 through the gateway minus p50 direct (goal ≤ 1 ms);
* **server choice**: the floor and SubmitJob direct (SQLite) on every server that can
  run here (uvicorn, hypercorn, pyvoy), to pick the default by the data.

Run: ``.venv/bin/python -m bench.submit [--seconds 5] [--runs 3] [--connections 32]``.
PostgreSQL figures need ``--postgres-url`` or the PostgreSQL 15 binaries (a private
server, started with ``fsync=off``: its figures are an upper bound for a durable one).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench._postgres import private_postgres
from tests.helpers import free_port, start_jennah, stop, wait_http

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Tenant-Id"] = "bench"
wrk.body = [[{body}]]
"""
SUBMIT_BODY = '{"image_uri":"busybox","commands":["true"],"env_vars":{"A":"1"}}'
PATH = "/jennah.v1.DeploymentService/"
STACK_PIDS: list[int] = []  # the processes of the stack last started (worker first)
FSYNCS: dict[str, float] = {}  # store -> fsyncs per submit, from the strace run
CPU_US: dict[str, float] = {}  # scenario -> worker CPU µs per request (last run)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


@dataclass(frozen=True)
class Figure:
    """The median (and range) of several runs of one scenario."""

    name: str
    runs: list[Result]

    def med(self, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in self.runs))

    def span(self, attr: str, fmt: str = ",.0f") -> str:
        vals = [getattr(r, attr) for r in self.runs]
        return f"{self.med(attr):{fmt}} ({min(vals):{fmt}}–{max(vals):{fmt}})"

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)


def _ms(value: str) -> float:
    """wrk's latency text (``412.00us``, ``1.23ms``, ``2.01s``) in ms; NaN if unreadable."""
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if found is None:
        return math.nan
    number, unit = found.groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def settle(worker: str, timeout: float = 60.0) -> None:
    """Wait until the worker has no active job left from the previous scenario, so that
    one scenario's backlog (the poller still completing its jobs) does not load the next."""
    from tests.helpers import call

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        for status in ("JOB_STATUS_PENDING", "JOB_STATUS_SCHEDULED", "JOB_STATUS_RUNNING"):
            code, resp = call(worker, "ListJobs", {"status": status, "page_size": 1},
                              {"X-Tenant-Id": "bench"})  # fmt: skip
            busy = busy or code != 200 or bool(resp.get("jobs"))
        if not busy:
            return
        time.sleep(0.2)


def run_python(name: str, url: str, body: str, seconds: float, connections: int) -> Result:
    """A small closed-loop load from threads (``--load python``): for the smoke test where
    wrk is not installed. Far weaker than wrk; its figures only show the path works."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
        headers = {"Content-Type": "application/json", "X-Tenant-Id": "bench"}
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                conn.request("POST", parts.path, body=body.encode(), headers=headers)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except OSError:
                ok = False
                conn.close()
            with lock:
                lat.append(time.perf_counter() - t0)
                errors[0] += not ok
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(connections)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    lat.sort()
    p50 = lat[len(lat) // 2] * 1000 if lat else 0.0
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else 0.0
    return Result(name, len(lat) / elapsed, p50, p99, errors[0])


def run_wrk(name: str, url: str, body: str, seconds: float, connections: int) -> Result:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(LUA.replace("{body}", body))
        script = f.name
    threads = min(2, connections)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
         "-s", script, url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    Path(script).unlink()
    return parse_wrk(name, out)


def parse_wrk(name: str, out: str) -> Result:
    """The figures of one ``wrk --latency`` report."""
    # The latency lines only: "82.50%" on the Req/Sec line also ends in "50%".
    found = {key: re.search(pattern, out, re.MULTILINE) for key, pattern in (
        ("rps", r"Requests/sec:\s+([\d.]+)"), ("p50", r"^\s+50%\s+(\S+)"),
        ("p99", r"^\s+99%\s+(\S+)"))}
    rps = float(found["rps"].group(1)) if found["rps"] else 0.0
    p50 = _ms(found["p50"].group(1)) if found["p50"] else math.nan
    p99 = _ms(found["p99"].group(1)) if found["p99"] else math.nan
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    return Result(name, rps, p50, p99, errors)


def count_fsyncs(pid: int, run: Callable[[], Result]) -> tuple[int, Result]:
    """``fsync`` + ``fdatasync`` calls made by every thread of ``pid`` while ``run``
    runs (``strace -c``), and ``run``'s result."""
    tids = [p.name for p in Path(f"/proc/{pid}/task").iterdir()]
    with tempfile.NamedTemporaryFile(suffix=".strace") as out:
        tracer = subprocess.Popen(
            ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", out.name,
             *(a for tid in tids for a in ("-p", tid))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(1.0)  # attached
        result = run()
        tracer.send_signal(2)  # SIGINT: detach and write the summary
        tracer.wait(30)
        text = Path(out.name).read_text()
    calls = 0
    for line in text.splitlines():
        cols = line.split()
        if cols and cols[-1] in ("fsync", "fdatasync"):
            calls += int(cols[3])
    return calls, result


@contextlib.contextmanager
def stack(tmp: Path, db_env: dict[str, str], gateway: bool,
          server: str = "uvicorn") -> Iterator[tuple[str, str]]:  # fmt: skip
    env = {"JENNAH_DEV_MODE": "1", "JENNAH_HOME": str(tmp), "BATCH_PROVIDER": "dry",
           "WORKER_ID": "bench-1", "JENNAH_SERVER": server,
           # Admission control off: the bench measures the server, not the rate limit.
           "TENANT_SUBMIT_RATE": "0", "TENANT_MAX_ACTIVE_JOBS": "0", **db_env}  # fmt: skip
    wport = free_port()
    procs = [start_jennah("worker", dict(env, WORKER_PORT=str(wport)), tmp / "worker.log")]
    worker = f"http://127.0.0.1:{wport}"
    gw = ""
    try:
        wait_http(f"{worker}/health", proc=procs[0])
        if gateway:
            gport = free_port()
            procs.append(start_jennah("gateway", dict(env, GATEWAY_PORT=str(gport),
                                                      WORKER_ENDPOINTS=worker),
                                      tmp / "gateway.log"))  # fmt: skip
            gw = f"http://127.0.0.1:{gport}"
            wait_http(f"{gw}/ready", proc=procs[1])
        STACK_PIDS[:] = [p.pid for p in procs]
        yield worker, gw
    finally:
        for proc in procs:
            stop(proc)


def available_servers() -> list[str]:
    """uvicorn always; hypercorn and pyvoy when installed and known to commands.serve."""
    from jennah.settings import SERVERS

    return [s for s in ("uvicorn", "hypercorn", "pyvoy")
            if s in SERVERS and (s == "uvicorn" or importlib.util.find_spec(s))]  # fmt: skip


def _db_env(store: str, tmp: Path, postgres_url: str | None) -> dict[str, str]:
    if store == "sqlite":
        return {"DB_PROVIDER": "sqlite", "DB_PATH": str(tmp / "bench.db")}
    assert postgres_url
    return {"DB_PROVIDER": "postgres", "DATABASE_URL": postgres_url}


def measure(seconds: float, runs: int, connections: int, postgres_url: str | None,
            servers: list[str], load: str = "wrk") -> dict[str, Figure]:  # fmt: skip
    """Every scenario ``runs`` times; keyed by scenario name."""
    got: dict[str, list[Result]] = {}
    run_load = run_wrk if load == "wrk" else run_python

    def rec(name: str, url: str, body: str, secs: float = seconds, conns: int = connections,
            n: int = runs, worker: str = "") -> None:  # fmt: skip
        for _ in range(n):
            pid = STACK_PIDS[0] if STACK_PIDS else 0
            before = cpu_seconds(pid) if pid else 0.0
            res = run_load(name, url, body, secs, conns)
            if pid and res.rps:
                CPU_US[name] = (cpu_seconds(pid) - before) / (res.rps * secs) * 1e6
            got.setdefault(name, []).append(res)
            if worker:
                settle(worker)

    stores = ["sqlite"] + (["postgres"] if postgres_url else [])
    for store in stores:
        with tempfile.TemporaryDirectory() as d, \
                stack(Path(d), _db_env(store, Path(d), postgres_url), True) as (worker, gw):
            run_load("warm-up", worker + PATH + "SubmitJob", SUBMIT_BODY, 1, connections)
            settle(worker)
            if store == "sqlite":  # latency added by the gateway, one request at a time
                rec("latency direct", worker + PATH + "SubmitJob", SUBMIT_BODY, conns=1,
                    worker=worker)
                rec("latency gateway", gw + PATH + "SubmitJob", SUBMIT_BODY, conns=1,
                    worker=worker)
            rec(f"floor ({store})", worker + PATH + "GetCurrentTenant", "{}")
            rec(f"direct ({store})", worker + PATH + "SubmitJob", SUBMIT_BODY, worker=worker)
            rec(f"direct c1 ({store})", worker + PATH + "SubmitJob", SUBMIT_BODY, conns=1,
                worker=worker)
            rec(f"gateway ({store})", gw + PATH + "SubmitJob", SUBMIT_BODY, worker=worker)
            if store == "sqlite" and shutil.which("strace"):
                calls, res = count_fsyncs(STACK_PIDS[0], lambda w=worker: run_load(
                    "fsyncs", w + PATH + "SubmitJob", SUBMIT_BODY, seconds, connections))
                FSYNCS[store] = calls / max(1.0, res.rps * max(1, round(seconds)))
                settle(worker)
    for server in servers:
        with tempfile.TemporaryDirectory() as d, \
                stack(Path(d), _db_env("sqlite", Path(d), None), False, server) as (worker, _):
            run_load("warm-up", worker + PATH + "SubmitJob", SUBMIT_BODY, 1, connections)
            settle(worker)
            rec(f"server {server} floor", worker + PATH + "GetCurrentTenant", "{}")
            rec(f"server {server} direct", worker + PATH + "SubmitJob", SUBMIT_BODY,
                worker=worker)
    return {name: Figure(name, rs) for name, rs in got.items()}


def _verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def report(figs: dict[str, Figure], runs: int, seconds: float, connections: int,
           load: str = "wrk") -> str:  # fmt: skip
    lines = [
        f"SubmitJob, `{load} -c{connections}`, {runs} runs × {seconds:g} s each; median "
        "(min–max). Ratios use medians measured in this run.", "",
        "| scenario | req/s | p50 ms | p99 ms | errors | ratio | goal |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    floor_goal = {"sqlite": 0.25, "postgres": 0.15}
    for store in ("sqlite", "postgres"):
        if f"floor ({store})" not in figs:
            continue
        fl, di, gw = (figs[f"{k} ({store})"] for k in ("floor", "direct", "gateway"))
        d_ratio = di.med("rps") / fl.med("rps")
        g_ratio = gw.med("rps") / di.med("rps")
        rows = [
            (fl, "1.00 (floor: GetCurrentTenant)", ""),
            (di, f"{d_ratio:.2f}× floor", f"≥ {floor_goal[store]}× "
                                          f"{_verdict(d_ratio >= floor_goal[store])}"),
        ]  # fmt: skip
        c1 = figs.get(f"direct c1 ({store})")
        if c1 is not None:
            share = di.med("rps") / c1.med("rps")
            rows.append((c1, f"-c{connections} does {share:.1f}× this",
                         f"≥ 4× {_verdict(share >= 4)}"))
        rows.append((gw, f"{g_ratio:.2f}× direct", f"≥ 0.8× {_verdict(g_ratio >= 0.8)}"))
        for fig, ratio, goal in rows:
            lines.append(f"| {fig.name} | {fig.span('rps')} | {fig.span('p50_ms', '.2f')} | "
                         f"{fig.span('p99_ms', '.1f')} | {fig.errors} | {ratio} | {goal} |")
    cpu = [f"{name}: {us:,.0f} µs" for name, us in CPU_US.items()
           if name.startswith(("floor (", "direct (", "direct c1 ("))]
    if cpu:
        lines += ["", "Worker CPU per request (utime + stime of the worker process over the "
                      "last run of each scenario; for SubmitJob it includes the poller "
                      "completing the job): " + "; ".join(cpu) + "."]
    for store, per in FSYNCS.items():
        lines += ["", f"fsyncs per submit, `-c{connections}`, {store} (strace -c over every "
                      f"thread of the worker, one run of its own): **{per:.3f}** "
                      f"(goal ≤ 0.5: {_verdict(per <= 0.5)})"]
    if "latency direct" in figs:
        ld, lg = figs["latency direct"], figs["latency gateway"]
        added = lg.med("p50_ms") - ld.med("p50_ms")
        lines += ["", "Latency, one connection (`wrk -c1`), SQLite:", "",
                  "| path | req/s | p50 ms | p99 ms | added by the gateway (p50) | goal |",
                  "|---|---:|---:|---:|---:|---|",
                  f"| direct | {ld.span('rps')} | {ld.span('p50_ms', '.2f')} | "
                  f"{ld.span('p99_ms', '.1f')} | | |",
                  f"| gateway | {lg.span('rps')} | {lg.span('p50_ms', '.2f')} | "
                  f"{lg.span('p99_ms', '.1f')} | {added:+.2f} ms | ≤ 1 ms "
                  f"{_verdict(added <= 1.0)} |"]  # fmt: skip
    servers = [k.split()[1] for k in figs if k.startswith("server ") and k.endswith("floor")]
    if servers:
        lines += ["", "Server choice (worker alone, SQLite):", "",
                  "| server | floor req/s | SubmitJob req/s | SubmitJob p99 ms | "
                  "SubmitJob / uvicorn's |", "|---|---:|---:|---:|---:|"]
        base = figs["server uvicorn direct"].med("rps") if "uvicorn" in servers else 0.0
        for s in servers:
            fl, di = figs[f"server {s} floor"], figs[f"server {s} direct"]
            rel = f"{di.med('rps') / base:.2f}×" if base else ""
            lines.append(f"| {s} | {fl.span('rps')} | {di.span('rps')} | "
                         f"{di.span('p99_ms', '.1f')} | {rel} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--postgres-url", default="")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--servers", default="", help="comma list; default: all available")
    parser.add_argument("--load", choices=("wrk", "python"), default="wrk",
                        help="load generator; python is a weak fallback for smoke tests")
    args = parser.parse_args(argv)
    if args.load == "wrk" and not shutil.which("wrk"):
        raise SystemExit("bench.submit needs wrk (apt-get install wrk), or --load python")
    servers = args.servers.split(",") if args.servers else available_servers()
    pg = args.postgres_url or None
    cluster = None
    if pg is None and not args.no_postgres:
        cluster = private_postgres("bench.submit", required=False)
        pg = cluster.url if cluster is not None else None
    try:
        figs = measure(args.seconds, args.runs, args.connections, pg, servers, args.load)
    finally:
        if cluster is not None:
            cluster.stop()
    out = report(figs, args.runs, args.seconds, args.connections, args.load)
    print(out)
    return out


if __name__ == "__main__":
    main()
