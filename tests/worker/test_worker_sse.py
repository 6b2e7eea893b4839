"""A worker's server-sent event streams (docs/sse.md) over real HTTP on 127.0.0.1.

In process: a worker (memory store, the fake provider stepping at each poll) served by
uvicorn in a thread, read the way ``curl -N`` reads it. As real processes: the same
streams under each server ``jennah worker`` can run (uvicorn, hypercorn, pyvoy), and the
stop signal ending a stream that would otherwise hold the graceful drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import jennah.sse
from database.memory import MemoryStore
from jennah.settings import load_worker_settings
from providers.memory import FakeProvider
from tests.gateway.test_gateway_forward import ServerThread
from tests.helpers import call, free_port, start_jennah, stop, wait_http, wait_until
from worker.app import WorkerRuntime, build_runtime, create_app

ACME = {"X-Tenant-Id": "acme"}
BETA = {"X-Tenant-Id": "beta"}
SLEEPER = {"image_uri": "busybox", "commands": ["sleep", "600"]}  # RUNNING until cancelled
QUICK = {"image_uri": "busybox", "commands": ["echo", "hi"]}


# --- an SSE client ---------------------------------------------------------------------


@dataclass
class Message:
    """One event (``event`` set) or one comment line (``comment`` set)."""

    id: str | None = None
    event: str | None = None
    data: str | None = None
    comment: str | None = None

    def json(self) -> dict[str, Any]:
        assert self.data is not None, self
        value: dict[str, Any] = json.loads(self.data)
        return value


class Sse:
    """``GET`` an event stream and read it one message at a time, as it arrives."""

    def __init__(self, base: str, path: str, headers: Mapping[str, str] | None = None,
                 timeout: float = 10.0) -> None:
        url = urllib.parse.urlsplit(base)
        self.conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)
        self.conn.request("GET", path, headers={"Accept": "text/event-stream", **(headers or {})})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status

    def error(self) -> dict[str, Any]:
        """The JSON body of a refused stream."""
        assert self.status != 200
        body: dict[str, Any] = json.loads(self.resp.read())
        self.close()
        return body

    def empty(self) -> tuple[int, bytes]:
        """The status and body of an answer that is not a stream."""
        answer = self.status, self.resp.read()
        self.close()
        return answer

    def next(self) -> Message | None:
        """The next event or comment; None once the server has ended the stream."""
        message = Message()
        while True:
            raw = self.resp.readline()
            if not raw:
                assert message == Message(), f"stream cut mid-event: {message}"
                return None
            line = raw.decode().rstrip("\r\n")
            if not line:
                if message != Message():
                    return message
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if not name:
                message.comment = value
            else:
                assert name in ("id", "event", "data"), line
                setattr(message, name, value)

    def next_event(self) -> Message | None:
        """The next event, comments skipped; None at the end of the stream."""
        while (message := self.next()) is not None and message.comment is not None:
            pass
        return message

    def events(self) -> list[Message]:
        """Every event (comments left out) up to the end of the stream."""
        found: list[Message] = []
        while (message := self.next()) is not None:
            if message.comment is None:
                found.append(message)
        self.close()
        return found

    def until(self, event: str) -> list[Message]:
        """Events up to and including the first ``event``."""
        found: list[Message] = []
        while True:
            message = self.next()
            assert message is not None, f"the stream ended before {event!r}: {found}"
            if message.comment is None:
                found.append(message)
                if message.event == event:
                    return found

    def close(self) -> None:
        """Hang up, as a client pressing Ctrl-C does."""
        if self.conn.sock is not None:
            with contextlib.suppress(OSError):
                self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.resp.close()
        self.conn.close()


def submit(base: str, body: Mapping[str, Any], headers: Mapping[str, str] = ACME) -> str:
    status, resp = call(base, "SubmitJob", body, headers)
    assert status == 200, resp
    job_id: str = resp["jobId"]
    return job_id


def listed_events(base: str, job_id: str, headers: Mapping[str, str] = ACME) -> list[Any]:
    status, resp = call(base, "ListJobEvents", {"job_id": job_id}, headers)
    assert status == 200, resp
    events: list[Any] = resp["events"]
    return events


def wait_terminal(base: str, job_id: str, headers: Mapping[str, str] = ACME) -> None:
    def ended() -> bool:
        status = call(base, "GetJob", {"job_id": job_id}, headers)[1]["job"]["status"]
        return status in {"JOB_STATUS_COMPLETED", "JOB_STATUS_FAILED", "JOB_STATUS_CANCELLED"}

    wait_until(ended, timeout=10)


def check_job_stream(events: list[Message], job_id: str, after: int = 0) -> None:
    """Gapless seqs after ``after``, each ``id`` its seq, each ``event`` its kind in lower
    case without the prefix, and the terminal event last."""
    assert [int(m.id or "0") for m in events] == list(range(after + 1, after + len(events) + 1))
    for m in events:
        data = m.json()
        assert data["jobId"] == job_id and data["seq"] == m.id
        assert m.event == data["kind"].removeprefix("EVENT_KIND_").lower()
    assert events[-1].event in {"completed", "failed", "cancelled"}


def sse_tasks(server: ServerThread) -> list[asyncio.Task[Any]]:
    """The stream loop's tasks still alive in the server's event loop."""
    loop = server.server.servers[0].get_loop()
    return [t for t in asyncio.all_tasks(loop)
            if "serve_stream" in getattr(t.get_coro(), "__qualname__", "")]


# --- an in-process worker ---------------------------------------------------------------


@dataclass
class Worker:
    server: ServerThread
    rt: WorkerRuntime

    @property
    def url(self) -> str:
        return self.server.url


def start_worker(
    tmp: Path, *, worker_id: str = "w1", dev: bool = True, token: str = "",
    store: MemoryStore | None = None, provider: FakeProvider | None = None,
) -> Worker:
    env = {"JENNAH_HOME": str(tmp / worker_id), "JENNAH_DEV_MODE": "1" if dev else "0",
           "JENNAH_WORKER_TOKEN": token, "WORKER_ID": worker_id, "DB_PROVIDER": "memory",
           "BATCH_PROVIDER": "fake", "WORKER_POLL_INTERVAL_SECONDS": "0.05"}
    settings = load_worker_settings(env)
    registry = CollectorRegistry()
    rt = build_runtime(settings, store=store or MemoryStore(),
                       provider=provider or FakeProvider(step_on_status=True), registry=registry)
    return Worker(ServerThread(create_app(settings, rt, registry), lifespan="on").start(), rt)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    w = start_worker(tmp_path)
    yield w
    w.server.stop()


def test_a_job_streams_live_gapless_and_ends_with_its_terminal_event(worker: Worker) -> None:
    job_id = submit(worker.url, SLEEPER)
    stream = Sse(worker.url, f"/v1/jobs/{job_id}/events", ACME)
    try:
        assert stream.status == 200
        assert stream.resp.getheader("content-type") == "text/event-stream; charset=utf-8"
        assert stream.resp.getheader("cache-control") == "no-cache"
        assert stream.next() == Message(comment="stream open")  # sent with the headers
        before = stream.until("running")  # live: the job is still running
        assert call(worker.url, "CancelJob", {"job_id": job_id}, ACME)[0] == 200
        events = before + stream.events()  # ...and the stream ends by itself
    finally:
        stream.close()
    check_job_stream(events, job_id)
    assert [m.event for m in events] == ["submitted", "scheduled", "running", "cancelled"]
    # data: is the JobEvent exactly as Connect JSON gives it, one compact line each.
    assert [m.json() for m in events] == listed_events(worker.url, job_id)
    assert all(m.data == json.dumps(m.json(), separators=(",", ":"), ensure_ascii=False)
               for m in events)


def test_resume_after_last_event_id_or_after_seq(worker: Worker) -> None:
    job_id = submit(worker.url, QUICK)
    wait_terminal(worker.url, job_id)
    path = f"/v1/jobs/{job_id}/events"
    whole = Sse(worker.url, path, ACME).events()
    check_job_stream(whole, job_id)
    n = len(whole)
    assert n >= 4
    assert [m.id for m in Sse(worker.url, path, {**ACME, "Last-Event-ID": "2"}).events()] == [
        str(s) for s in range(3, n + 1)]
    assert [m.id for m in Sse(worker.url, f"{path}?after_seq=1", ACME).events()] == [
        str(s) for s in range(2, n + 1)]
    # A reconnecting EventSource keeps its URL and sends Last-Event-ID: the header wins.
    resumed = Sse(worker.url, f"{path}?after_seq=1", {**ACME, "Last-Event-ID": str(n - 1)})
    assert [m.id for m in resumed.events()] == [str(n)]
    # Nothing after the terminal event: 204, which tells an EventSource not to reconnect.
    done = Sse(worker.url, path, {**ACME, "Last-Event-ID": str(n)})
    assert done.empty() == (204, b"")


@pytest.mark.parametrize(("query", "last_event_id", "fragment"), [
    ("?after_seq=x", None, "not 'x'"),
    ("?after_seq=-1", None, "non-negative integer"),
    ("?after_seq=1.5", None, "non-negative integer"),
    ("?after_seq=", None, "non-negative integer"),
    ("?after_seq=99999999999999999999", None, "non-negative integer"),
    ("?after_seq=1&after_seq=2", None, "more than once"),
    ("?after=3", None, "unknown query parameter 'after'"),
    ("", "seven", "not 'seven'"),
])  # fmt: skip
def test_bad_cursors_are_invalid_argument_with_a_clear_message(
    worker: Worker, query: str, last_event_id: str | None, fragment: str
) -> None:
    job_id = submit(worker.url, QUICK)
    headers = {**ACME, **({"Last-Event-ID": last_event_id} if last_event_id else {})}
    stream = Sse(worker.url, f"/v1/jobs/{job_id}/events{query}", headers)
    assert stream.status == 400
    body = stream.error()
    assert body["code"] == "invalid_argument" and fragment in body["message"], body


def test_unknown_or_foreign_job_is_404_and_bad_requests_are_refused(worker: Worker) -> None:
    job_id = submit(worker.url, QUICK)
    for path, headers in ((f"/v1/jobs/{job_id}/events", BETA), ("/v1/jobs/nope/events", ACME)):
        stream = Sse(worker.url, path, headers)
        body = stream.error()
        assert (stream.status, body["code"]) == (404, "not_found")
        assert body["message"].endswith("not found") and "Traceback" not in body["message"]
    nul = Sse(worker.url, "/v1/jobs/a%00b/events", ACME)
    assert (nul.status, nul.error()["message"]) == (400, "job_id: must not contain a NUL byte")
    missing = Sse(worker.url, f"/v1/jobs/{job_id}/events", {})
    assert (missing.status, missing.error()["message"]) == (400, "missing X-Tenant-Id header")
    wrong = Sse(worker.url, "/v1/notifications", {**ACME, "Accept": "application/json"})
    assert (wrong.status, wrong.error()["code"]) == (406, "invalid_argument")
    conn = http.client.HTTPConnection("127.0.0.1", worker.server.port, timeout=5)
    conn.request("POST", "/v1/notifications", headers=ACME)
    posted = conn.getresponse()
    assert (posted.status, posted.getheader("allow")) == (405, "GET")
    conn.close()


def test_outside_dev_mode_the_worker_token_is_required(tmp_path: Path) -> None:
    w = start_worker(tmp_path, dev=False, token="tok")
    try:
        job_id = submit(w.url, QUICK, {**ACME, "X-Jennah-Worker-Token": "tok"})
        refused = Sse(w.url, f"/v1/jobs/{job_id}/events", ACME)
        assert (refused.status, refused.error()["code"]) == (401, "unauthenticated")
        assert refused.resp.getheader("www-authenticate") == "Bearer"
        allowed = Sse(w.url, f"/v1/jobs/{job_id}/events",
                      {**ACME, "X-Jennah-Worker-Token": "tok"})
        check_job_stream(allowed.events(), job_id)
    finally:
        w.server.stop()


def test_a_comment_keeps_an_idle_stream_alive(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jennah.sse, "HEARTBEAT_SECONDS", 0.2)
    job_id = submit(worker.url, SLEEPER)
    stream = Sse(worker.url, f"/v1/jobs/{job_id}/events", ACME)
    try:
        stream.until("running")
        started = time.monotonic()
        beats = [stream.next() for _ in range(3)]
        assert beats == [Message(comment="keep-alive")] * 3
        assert 0.3 < time.monotonic() - started < 3
    finally:
        stream.close()


def notification_id(note: Mapping[str, Any]) -> str:
    return f"{note['occurredAt']}/{note['id']}"


def test_notifications_stream_as_jobs_end_and_resume(worker: Worker) -> None:
    earlier = submit(worker.url, QUICK)
    wait_terminal(worker.url, earlier)
    stream = Sse(worker.url, "/v1/notifications", ACME)
    try:
        assert stream.status == 200
        job_id = submit(worker.url, QUICK)  # ends at once
        got = stream.next_event()
    finally:
        stream.close()
    assert got is not None and got.event == "notification"
    note = got.json()  # the new job's, not the one that ended before the stream began
    assert (note["jobId"], note["finalStatus"]) == (job_id, "JOB_STATUS_COMPLETED")
    assert got.id == notification_id(note)
    status, listed = call(worker.url, "ListNotifications", {}, ACME)
    assert status == 200 and listed["notifications"][0] == note
    first = next(n for n in listed["notifications"] if n["jobId"] == earlier)
    # Resume after the earlier one: the later one comes at once.
    resumed = Sse(worker.url, "/v1/notifications",
                  {**ACME, "Last-Event-ID": notification_id(first)})
    try:
        again = resumed.next_event()
    finally:
        resumed.close()
    assert again == got
    bad = Sse(worker.url, "/v1/notifications?after=yesterday", ACME)
    assert (bad.status, bad.error()["code"]) == (400, "invalid_argument")


def test_a_client_that_hangs_up_stops_the_stream_and_its_watch(worker: Worker) -> None:
    job_id = submit(worker.url, SLEEPER)
    stream = Sse(worker.url, f"/v1/jobs/{job_id}/events", ACME)
    stream.until("running")
    wait_until(lambda: worker.rt.notifier.watched == 1, timeout=5)
    assert sse_tasks(worker.server)
    stream.close()
    started = time.monotonic()
    wait_until(lambda: worker.rt.notifier.watched == 0 and not sse_tasks(worker.server),
               timeout=3)
    assert time.monotonic() - started < 1.0  # promptly (about 50 ms here)
    # And it stays so: the watch is gone, not between two of its polls (every 0.2 s).
    for _ in range(10):
        time.sleep(0.05)
        assert worker.rt.notifier.watched == 0


# --- real processes, under each server ----------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn", "pyvoy"])
def test_streams_under_each_server_and_the_stop_signal(tmp_path: Path, server: str) -> None:
    """The job stream and the notifications stream work under every server; on SIGTERM
    uvicorn and hypercorn run the stop hooks and the notifications stream, which never
    ends by itself, ends at once with ``unavailable`` instead of holding the drain for
    the grace period. (Under pyvoy the app lives in Envoy, which hears of the stop only
    after its drain: the stream ends when the grace is over; docs/sse.md.)"""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"JENNAH_SERVER": server, "JENNAH_HOME": str(tmp_path), "JENNAH_DEV_MODE": "1",
           "DB_PROVIDER": "memory", "BATCH_PROVIDER": "fake", "WORKER_ID": "w1",
           "WORKER_PORT": str(port), "WORKER_POLL_INTERVAL_SECONDS": "0.05",
           "SHUTDOWN_GRACE_SECONDS": "1"}
    proc = start_jennah("worker", env, tmp_path / "worker.log")
    try:
        wait_http(f"{url}/health", proc=proc)
        notes = Sse(url, "/v1/notifications", ACME)
        assert notes.status == 200
        job_id = submit(url, QUICK)
        check_job_stream(Sse(url, f"/v1/jobs/{job_id}/events", ACME).events(), job_id)
        got = notes.next_event()
        assert got is not None and got.json()["jobId"] == job_id
        os.kill(proc.pid, signal.SIGTERM)
        started = time.monotonic()
        rest = notes.events()
        took = time.monotonic() - started
        if server == "pyvoy":
            assert rest == [] and took < 1 + 2
        else:
            assert [(m.event, json.loads(m.data or "")["code"]) for m in rest] == [
                ("error", "unavailable")]
            assert took < 1.0
        proc.wait(timeout=15)  # and the drain did not wait for the stream
    finally:
        stop(proc)
