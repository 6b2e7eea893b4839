"""The gateway's server-sent event streams (docs/sse.md) over real HTTP on 127.0.0.1.

In process, all served by uvicorn in threads: two real workers sharing one memory store
and one fake provider (a job moves one step per poll; a ``sleep`` job runs until
cancelled), and a gateway in front of them, in dev mode or with an API key file. The
first worker can sit behind a TCP relay that the failover test cuts.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import jennah.sse
from database.memory import MemoryStore
from gateway.keyfile import ApiKey, editing, new_key, revoked
from gateway.ring import TenantRing
from providers.memory import FakeProvider
from tests.gateway.test_gateway_app import Gateway, settings_for
from tests.gateway.test_gateway_forward import tenant_homed_at
from tests.helpers import REPO, call, wait_until
from tests.worker.test_worker_sse import (
    ACME,
    BETA,
    QUICK,
    SLEEPER,
    Message,
    Sse,
    Worker,
    check_job_stream,
    listed_events,
    notification_id,
    sse_tasks,
    start_worker,
    submit,
    wait_terminal,
)

TOKEN = "tok"


class Relay:
    """A TCP relay to a port, which :meth:`cut` breaks: open connections are reset and new
    ones refused, as when a worker's host drops off the network."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accept() (a close alone does not)
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


@dataclass
class Stack:
    workers: list[Worker]
    relay: Relay
    gateway: Gateway
    stopping: list[Gateway] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.gateway.url

    def watched(self) -> int:
        """Job watches open on the workers (the gateway's upstream calls)."""
        return sum(w.rt.notifier.watched for w in self.workers)

    def gateway_with_keys(self, keys_file: Path) -> Gateway:
        urls = [self.relay.url, self.workers[1].url]
        gw = Gateway(settings_for(urls, worker_token=TOKEN, dev_mode=False,
                                  api_keys_file=str(keys_file)))
        self.stopping.append(gw)
        return gw


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    store, provider = MemoryStore(), FakeProvider(step_on_status=True)
    workers = [start_worker(tmp_path, worker_id=f"w{i}", dev=False, token=TOKEN, store=store,
                            provider=provider) for i in (1, 2)]  # fmt: skip
    relay = Relay(workers[0].server.port)
    gateway = Gateway(settings_for([relay.url, workers[1].url], worker_token=TOKEN))
    s = Stack(workers, relay, gateway)
    yield s
    for gw in [gateway, *s.stopping]:
        gw.stop()
    relay.cut()
    for w in workers:
        w.server.stop()


def test_a_job_streams_through_the_gateway_to_its_terminal_event(stack: Stack) -> None:
    job_id = submit(stack.url, SLEEPER)
    stream = Sse(stack.url, f"/v1/jobs/{job_id}/events", ACME)
    try:
        assert stream.status == 200
        assert stream.resp.getheader("content-type") == "text/event-stream; charset=utf-8"
        before = stream.until("running")
        assert call(stack.url, "CancelJob", {"job_id": job_id}, ACME)[0] == 200
        events = before + stream.events()
    finally:
        stream.close()
    check_job_stream(events, job_id)
    assert [m.event for m in events] == ["submitted", "scheduled", "running", "cancelled"]
    assert [m.json() for m in events] == listed_events(stack.url, job_id)


def test_resume_through_the_gateway(stack: Stack) -> None:
    job_id = submit(stack.url, QUICK)
    wait_terminal(stack.url, job_id)
    path = f"/v1/jobs/{job_id}/events"
    n = len(listed_events(stack.url, job_id))
    resumed = Sse(stack.url, path, {**ACME, "Last-Event-ID": "1"}).events()
    check_job_stream(resumed, job_id, after=1)
    assert len(resumed) == n - 1
    assert [m.id for m in Sse(stack.url, f"{path}?after_seq=3", ACME).events()] == [
        str(s) for s in range(4, n + 1)]
    assert Sse(stack.url, f"{path}?after_seq={n}", ACME).empty() == (204, b"")
    bad = Sse(stack.url, path, {**ACME, "Last-Event-ID": "1e3"})
    assert (bad.status, bad.error()["code"]) == (400, "invalid_argument")


def test_heartbeat_through_the_gateway(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jennah.sse, "HEARTBEAT_SECONDS", 0.2)
    job_id = submit(stack.url, SLEEPER)
    stream = Sse(stack.url, f"/v1/jobs/{job_id}/events", ACME)
    try:
        stream.until("running")
        assert [stream.next() for _ in range(2)] == [Message(comment="keep-alive")] * 2
    finally:
        stream.close()


def test_another_tenants_job_or_an_unknown_one_is_404(stack: Stack) -> None:
    job_id = submit(stack.url, QUICK)
    for path, headers in ((f"/v1/jobs/{job_id}/events", BETA), ("/v1/jobs/j-nope/events", ACME)):
        stream = Sse(stack.url, path, headers)
        body = stream.error()
        assert (stream.status, body) == (404, {"code": "not_found",
                                                "message": f"job {path.split('/')[3]} not found"})
    missing = Sse(stack.url, "/v1/notifications", {})
    assert (missing.status, missing.error()["code"]) == (400, "invalid_argument")


def _add_key(keys_file: Path, tenant: str) -> tuple[ApiKey, str]:
    with editing(keys_file) as contents:
        entry, key = new_key(tenant, "sse", frozenset(k.id for k in contents.keys))
        contents.keys.append(entry)
    return entry, key


def test_keys_outside_dev_mode_and_a_revoked_key_ends_a_live_stream(
    stack: Stack, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.json"
    entry, key = _add_key(keys_file, "acme")
    gw = stack.gateway_with_keys(keys_file)
    bearer = {"Authorization": f"Bearer {key}"}
    job_id = submit(gw.url, SLEEPER, bearer)
    for headers in ({}, ACME, {"Authorization": "Bearer jk_nope_nope"}):
        refused = Sse(gw.url, f"/v1/jobs/{job_id}/events", headers)
        assert (refused.status, refused.error()["code"]) == (401, "unauthenticated")
    stream = Sse(gw.url, f"/v1/jobs/{job_id}/events", bearer)
    try:
        assert [m.event for m in stream.until("running")] == ["submitted", "scheduled",
                                                               "running"]
        with editing(keys_file) as contents:
            contents.keys[:] = [revoked(k) if k.id == entry.id else k for k in contents.keys]
        started = time.monotonic()
        rest = stream.events()  # the job still runs: only the revocation ends the stream
        took = time.monotonic() - started
    finally:
        stream.close()
    assert [(m.event, m.json()) for m in rest] == [
        ("error", {"code": "unauthenticated", "message": "invalid or revoked API key"})]
    assert took < 3.5  # the key file is re-read within 1 s, the stream re-checked every 1 s
    refused = Sse(gw.url, f"/v1/jobs/{job_id}/events", bearer)
    assert refused.status == 401
    refused.close()


def test_notifications_through_the_gateway(stack: Stack) -> None:
    stream = Sse(stack.url, "/v1/notifications", ACME)
    try:
        assert stream.status == 200
        job_id = submit(stack.url, QUICK)
        started = time.monotonic()
        got = stream.next_event()
        took = time.monotonic() - started
    finally:
        stream.close()
    assert got is not None and got.event == "notification"
    note = got.json()
    assert (note["jobId"], note["finalStatus"]) == (job_id, "JOB_STATUS_COMPLETED")
    assert got.id == notification_id(note)
    assert took < 3  # polled every second
    # Another tenant's stream carries nothing of acme's.
    other = Sse(stack.url, "/v1/notifications?after=2000-01-01T00:00:00Z/x", BETA,
                timeout=1.5)
    with pytest.raises(TimeoutError):
        other.next_event()
    other.close()


def test_a_client_that_hangs_up_ends_the_upstream_watch(stack: Stack) -> None:
    job_id = submit(stack.url, SLEEPER)
    stream = Sse(stack.url, f"/v1/jobs/{job_id}/events", ACME)
    stream.until("running")
    wait_until(lambda: stack.watched() == 1, timeout=5)
    assert sse_tasks(stack.gateway.server)
    stream.close()
    started = time.monotonic()
    wait_until(lambda: stack.watched() == 0 and not sse_tasks(stack.gateway.server),
               timeout=3)
    assert time.monotonic() - started < 1.0  # promptly (about 50 ms here)
    for _ in range(10):  # gone for good, not between two polls of the watch
        time.sleep(0.05)
        assert stack.watched() == 0


def test_the_stream_resumes_on_another_worker_when_its_worker_is_lost(stack: Stack) -> None:
    """The worker serving the stream drops off the network mid-stream: the gateway opens
    the watch again after the last seq it sent, on the next worker of the ring, and the
    client sees one gapless stream."""
    tenant = tenant_homed_at(TenantRing([stack.relay.url, stack.workers[1].url]),
                             stack.relay.url)
    headers = {"X-Tenant-Id": tenant}
    job_id = submit(stack.url, SLEEPER, headers)
    stream = Sse(stack.url, f"/v1/jobs/{job_id}/events", headers)
    try:
        before = stream.until("running")
        wait_until(lambda: stack.workers[0].rt.notifier.watched == 1, timeout=5)
        stack.relay.cut()
        wait_until(lambda: stack.workers[1].rt.notifier.watched == 1, timeout=5)
        assert call(stack.url, "CancelJob", {"job_id": job_id}, headers)[0] == 200
        events = before + stream.events()
    finally:
        stream.close()
    check_job_stream(events, job_id)
    assert [m.event for m in events] == ["submitted", "scheduled", "running", "cancelled"]


README = (REPO / "README.md").read_text()
DOCS = (REPO / "docs" / "sse.md").read_text()


def run_sh(script: str, stack: Stack) -> str:
    script = script.replace("localhost:8080", stack.url.removeprefix("http://"))
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                          text=True, timeout=30, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def ids_and_events(out: str) -> list[tuple[str, str]]:
    return re.findall(r"^id: (\d+)\nevent: (\w+)\n", out, re.MULTILINE)


def test_the_curl_examples_of_the_readme_and_the_docs_work_as_written(stack: Stack) -> None:
    first = re.findall(r"```sh\n(.*?)```", DOCS, re.DOTALL)[0]
    out = run_sh(first, stack)  # submit, then follow to the end
    assert out.startswith(": stream open\n\n")
    seen = ids_and_events(out)
    assert [int(i) for i, _ in seen] == list(range(1, len(seen) + 1))
    assert seen[-1][1] == "completed"
    job_id = re.search(r'"jobId":"([^"]+)"', out).group(1)  # type: ignore[union-attr]
    [line] = [ln for ln in README.splitlines() if "/v1/jobs/<job id>/events" in ln]
    assert ids_and_events(run_sh(line.replace("<job id>", job_id), stack)) == seen
