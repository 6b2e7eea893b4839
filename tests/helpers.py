"""Small helpers shared by tests: talking to real servers over HTTP, and a worker's
owner side (``JobService`` + ``Poller``) wired the way ``worker/app.py`` wires it."""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from database.base import JobStore
from providers.base import BatchProvider
from worker.commit import GroupCommitter
from worker.events import ExecutionLog
from worker.jobs import JobService, utcnow
from worker.output import OutputReader
from worker.poller import Poller
from worker.store_events import StoreExecutionLog

REPO = Path(__file__).resolve().parent.parent
SERVICE = "/jennah.v1.DeploymentService"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def call(
    base: str, method: str, body: Mapping[str, Any], headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, Any]]:
    """POST a Connect JSON unary call the way curl does; return (HTTP status, JSON body)."""
    req = urllib.request.Request(
        f"{base}{SERVICE}/{method}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read() or b"{}")


def start_jennah(role: str, env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``jennah <role>`` as a real process with ``env`` on top of ours."""
    full = {**os.environ, **env}
    full.pop("PORT", None)
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "jennah", role], env=full, stdout=out,
            stderr=subprocess.STDOUT, cwd=REPO,
        )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


class ThreadServer:
    """Serve an ASGI app with uvicorn in a background thread on a free 127.0.0.1 port."""

    def __init__(self, app: Any) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, lifespan="on",
                                log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_http(f"{self.url}/health")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@dataclass
class Owner:
    """One worker's owner side: its JobService and Poller, sharing one committer, one
    execution log and one output reader."""

    jobs: JobService
    poller: Poller
    events: ExecutionLog
    committer: GroupCommitter


def owner(
    store: JobStore, provider: BatchProvider, worker_id: str = "w1", *,
    lease_ttl: float = 30, clock: Callable[[], datetime] = utcnow,
    log: Callable[[GroupCommitter], ExecutionLog] = StoreExecutionLog,
    interval: float = 0.01, **service: Any,
) -> Owner:
    """Build a worker's JobService and Poller as ``worker/app.py`` does (the output reader
    first: the poller reads with it, and a cancel settles the output through it), without
    metrics, leases or a server. ``log`` makes the execution log from the committer;
    ``service`` goes to ``JobService`` (``new_id``, ``admission``, ...)."""
    committer = GroupCommitter(store)
    events = log(committer)
    output = OutputReader(store, provider, events, worker_id=worker_id, clock=clock)
    jobs = JobService(store, provider, worker_id=worker_id, lease_ttl=lease_ttl,
                      committer=committer, clock=clock, before_end=output.settle, **service)
    poller = Poller(store, provider, events, output, jobs, worker_id=worker_id, clock=clock,
                    interval=interval)
    return Owner(jobs, poller, events, committer)


class RegisteredContract:
    """Base of a contract suite over a backend registry (``providers.PROVIDERS``,
    ``database.STORES``). A ``Test…`` subclass must name a registered backend in ``kind``,
    or it fails at import; :meth:`runs` finds every such subclass, so that a test can
    fail for a registered backend that has none."""

    kind: ClassVar[str] = ""
    registry: ClassVar[Mapping[str, str]] = {}
    registry_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__name__.startswith("Test") and cls.kind not in cls.registry:
            raise TypeError(f"{cls.__name__}: kind {cls.kind!r} is not registered in "
                            f"{cls.registry_name}")

    @classmethod
    def runs(cls, package: str, pattern: str) -> dict[str, list[type[RegisteredContract]]]:
        """The ``Test…`` subclasses of ``cls`` in the modules of ``package`` whose file
        names match ``pattern``, by ``kind``."""
        folder = Path(importlib.import_module(package).__file__ or "").parent
        for path in sorted(folder.glob(pattern)):
            importlib.import_module(f"{package}.{path.stem}")
        found: dict[str, list[type[RegisteredContract]]] = {}
        classes = list(cls.__subclasses__())
        while classes:
            sub = classes.pop()
            classes += sub.__subclasses__()
            if sub.__name__.startswith("Test"):
                found.setdefault(sub.kind, []).append(sub)
        return found
