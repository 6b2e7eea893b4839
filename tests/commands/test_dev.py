"""`jennah dev` (what `make run` runs): gateway + 2 workers, a job runs, Ctrl-C stops all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, call, wait_http, wait_until

pytestmark = pytest.mark.e2e


def _three_free_ports() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base: int = s.getsockname()[1]
        if base > 65000:
            continue
        try:
            for p in (base + 1, base + 2):
                with socket.socket() as t:
                    t.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no three consecutive free ports")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _logs(home: Path) -> str:
    return "\n".join(f"{p}: {p.read_text()[-2000:]}" for p in sorted(home.glob("*.log")))


def test_jennah_dev_runs_a_job_and_stops_cleanly(tmp_path: Path) -> None:
    port = _three_free_ports()
    env = {**os.environ, "JENNAH_HOME": str(tmp_path), "JENNAH_DEV_MODE": "1"}
    env.pop("PORT", None)
    with (tmp_path / "dev.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jennah", "dev", "--port", str(port)],
                                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        gateway = f"http://127.0.0.1:{port}"
        wait_http(f"{gateway}/health", timeout=30, proc=proc)
        children = _children(proc.pid)
        assert len(children) == 3
        status, resp = call(gateway, "SubmitJob", {"image_uri": "busybox",
                                                   "commands": ["sh", "-c", "echo hi"]},
                            {"X-Tenant-Id": "acme"})
        assert status == 200, (resp, _logs(tmp_path))
        assert resp["workerId"] in {"dev-1", "dev-2"}

        def completed() -> bool:
            _, got = call(gateway, "GetJob", {"job_id": resp["jobId"]}, {"X-Tenant-Id": "acme"})
            return bool(got["job"]["status"] == "JOB_STATUS_COMPLETED")

        wait_until(completed, 20)
        assert (tmp_path / "jennah.db").exists()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        for child in children:
            assert not Path(f"/proc/{child}").exists() or \
                Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
