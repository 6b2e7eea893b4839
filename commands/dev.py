"""``jennah dev``: a gateway and N workers on SQLite and the local provider, for one machine.

All processes share ``$JENNAH_HOME`` (default ``~/.jennah``): one SQLite file, one local
batch directory, and per-worker WAL directories. Workers are ``dev-1``, ``dev-2``, ...
on ports 8081, 8082, ...; the gateway listens on ``--port`` (8080). Ctrl-C (or SIGTERM)
stops the workers gracefully, then the gateway.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from jennah.settings import jennah_home

STARTUP_TIMEOUT = 30.0


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=0.5) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def run_dev(workers: int = 2, port: int = 8080) -> int:
    home = jennah_home(os.environ)
    home.mkdir(parents=True, exist_ok=True)
    host = os.environ.get("HOST", "127.0.0.1")
    base = dict(os.environ)
    base.setdefault("JENNAH_DEV_MODE", "1")
    base.setdefault("DB_PROVIDER", "sqlite")
    base.setdefault("BATCH_PROVIDER", "local")
    base.setdefault("JENNAH_HOME", str(home))
    base.pop("PORT", None)
    jennah = [sys.executable, "-m", "jennah"]
    procs: list[tuple[str, subprocess.Popen[bytes], str]] = []
    endpoints = []
    for i in range(1, workers + 1):
        wport = port + i
        url = f"http://{host}:{wport}"
        env = dict(base, WORKER_ID=f"dev-{i}", WORKER_PORT=str(wport))
        procs.append((f"dev-{i}", subprocess.Popen([*jennah, "worker"], env=env), url))
        endpoints.append(url)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    deadline = time.monotonic() + STARTUP_TIMEOUT

    def all_healthy() -> bool:
        for name, proc, url in procs:
            if not _wait_healthy(url, proc, deadline):
                print(f"jennah dev: {name} did not start", file=sys.stderr)
                return False
        return True

    # The gateway starts only once every worker answers, so the first call it takes
    # never meets a worker that is still starting.
    gw_url = f"http://{host}:{port}"
    if all_healthy():
        gw_env = dict(base, GATEWAY_PORT=str(port), WORKER_ENDPOINTS=",".join(endpoints))
        procs.append(("gateway", subprocess.Popen([*jennah, "gateway"], env=gw_env), gw_url))
    if len(procs) <= workers or not all_healthy():
        stopping = True
    else:
        print(f"jennah dev: gateway on {gw_url} (workers: {', '.join(endpoints)}); "
              f"state in {home}. Ctrl-C stops.", flush=True)
        print(f"jennah dev: console on {gw_url}/ui/?tenant=acme", flush=True)
    code = 0
    while not stopping:
        for name, proc, _ in procs:
            if proc.poll() is not None:
                print(f"jennah dev: {name} exited with {proc.returncode}", file=sys.stderr)
                stopping, code = True, 1
        time.sleep(0.2)
    # Workers first (they release their leases), then the gateway.
    for _, proc, _ in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for name, proc, _ in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            print(f"jennah dev: {name} did not stop; killing it", file=sys.stderr)
            proc.kill()
    return code
