"""Submit throughput: SubmitJob against a trivial RPC on the same server stack.

Everything runs as real processes on loopback, loaded by ``wrk`` (Connect JSON over
HTTP/1.1, like curl). In one run it measures:

* the **floor**: ``GetCurrentTenant`` on a worker, an RPC that only parses headers, so
  it costs what the server stack (uvicorn + connectrpc + our router) costs;
* ``SubmitJob`` straight to a worker, on SQLite and on PostgreSQL, with the ``dry``
  provider (accepts and completes instantly), reported as a ratio to the floor;
* ``SubmitJob`` through the gateway, as a ratio to the direct figure.

Run: ``.venv/bin/python -m bench.submit [--seconds 10] [--connections 32]``.
PostgreSQL figures need ``JENNAH_TEST_POSTGRES_URL`` or the PostgreSQL 15 binaries.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import free_port, start_jennah, stop, wait_http

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Tenant-Id"] = "bench"
wrk.body = [[{body}]]
"""
SUBMIT_BODY = '{"image_uri":"busybox","commands":["true"],"env_vars":{"A":"1"}}'


@dataclass(frozen=True)
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def run_wrk(name: str, url: str, body: str, seconds: float, connections: int) -> Result:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(LUA.replace("{body}", body))
        script = f.name
    duration = f"-d{max(1, round(seconds))}s"
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", duration, "--latency", "-s", script, url],
        capture_output=True, text=True, check=True,
    ).stdout
    Path(script).unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    return Result(name, rps, p50, p99, errors)


@contextlib.contextmanager
def stack(tmp: Path, db_env: dict[str, str], gateway: bool) -> Iterator[tuple[str, str]]:
    env = {"JENNAH_DEV_MODE": "1", "JENNAH_HOME": str(tmp), "BATCH_PROVIDER": "dry",
           "WORKER_ID": "bench-1",
           # Admission control off: the bench measures the server, not the rate limit.
           "TENANT_SUBMIT_RATE": "0", "TENANT_MAX_ACTIVE_JOBS": "0", **db_env}
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
                                      tmp / "gateway.log"))
            gw = f"http://127.0.0.1:{gport}"
            wait_http(f"{gw}/health", proc=procs[1])
        yield worker, gw
    finally:
        for proc in procs:
            stop(proc)


def measure(seconds: float, connections: int, postgres_url: str | None) -> list[Result]:
    path = "/jennah.v1.DeploymentService/"
    results: list[Result] = []
    stores: list[tuple[str, dict[str, str]]] = [("sqlite", {"DB_PROVIDER": "sqlite"})]
    if postgres_url:
        stores.append(("postgres", {"DB_PROVIDER": "postgres", "DATABASE_URL": postgres_url}))
    for store, db_env in stores:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            if store == "sqlite":
                db_env = dict(db_env, DB_PATH=str(tmp / "bench.db"))
            with stack(tmp, db_env, gateway=True) as (worker, gw):
                run_wrk("warm-up", worker + path + "SubmitJob", SUBMIT_BODY, 2, connections)
                results.append(run_wrk(f"floor: GetCurrentTenant ({store} worker)",
                                       worker + path + "GetCurrentTenant", "{}", seconds,
                                       connections))
                results.append(run_wrk(f"SubmitJob direct ({store})",
                                       worker + path + "SubmitJob", SUBMIT_BODY, seconds,
                                       connections))
                results.append(run_wrk(f"SubmitJob via gateway ({store})",
                                       gw + path + "SubmitJob", SUBMIT_BODY, seconds,
                                       connections))
    return results


def table(results: list[Result]) -> str:
    lines = ["| scenario | req/s | p50 ms | p99 ms | errors | ratio |",
             "|---|---:|---:|---:|---:|---|"]
    floor = direct = 0.0
    for r in results:
        if r.name.startswith("floor"):
            floor, ratio = r.rps, "1.00 (floor)"
        elif "direct" in r.name:
            direct, ratio = r.rps, f"{r.rps / floor:.2f} x floor"
        else:
            ratio = f"{r.rps / direct:.2f} x direct"
        lines.append(f"| {r.name} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
                     f"{r.errors} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--postgres-url", default="")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("bench.submit needs wrk (apt-get install wrk)")
    pg = args.postgres_url or None
    cluster = None
    if pg is None:
        from tests.fixtures.postgres import _bindir, _Cluster

        bindir = _bindir()
        if bindir is not None:
            # The private test cluster runs with fsync=off: PostgreSQL figures are an upper
            # bound on what a durable server does.
            cluster = _Cluster(bindir)
            pg = cluster.start()
    try:
        out = table(measure(args.seconds, args.connections, pg))
    finally:
        if cluster is not None:
            cluster.stop()
    print(out)
    return out


if __name__ == "__main__":
    main()
