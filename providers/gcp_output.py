"""A Batch job's stdout/stderr, read back from Cloud Logging (``GcpBatchProvider.read_output``).

**Where it is.** With ``logsPolicy.destination = CLOUD_LOGGING`` (``build_job`` always sets
it), Batch writes each line a task prints as one ``LogEntry`` of the log
``projects/P/logs/batch_task_logs``, labelled ``job_uid`` (and ``task_id``) — Google Cloud
Batch, "Analyze a job using logs" and the ``batch_job_logs`` sample. Stream: an entry of
severity ``ERROR`` (or above) is stderr, any other is stdout (Batch writes unstructured
stderr lines as ``ERROR`` and stdout lines as ``INFO``; a structured JSON line sets its own
severity and lands where that severity says).

**Offsets** are, per stream, the number of that stream's entries already returned, counted
in the order Cloud Logging lists them: by timestamp, then ``insertId`` (the ``LogEntry``
reference: ``insertId`` orders entries with the same timestamp). The same log content
gives the same offsets on every worker, which the WAL's dedup needs. Each entry is one
whole line; its text is returned with one trailing newline.

**Ingestion delay.** Cloud Logging may make an entry visible some seconds after its
timestamp, and not in timestamp order. An entry that became visible *after* entries later
than it were counted would shift the counts. So a running job is only read up to
``now - settle`` (entries older than the safety margin); a finished job is read to the end
only once ``settle`` seconds have passed since it ended (``GcpBatchProvider.status`` holds
the terminal state back until then). **Residual risk**: an entry ingested more than
``settle`` seconds late, or a VM clock ahead of the worker's by more than that, can still be
missed (or, for a worker starting from stored offsets, shift one line); a job cancelled by
Jennah is read up to the cancel minus ``settle``.

**Cost**, bounded per call: one ``entries.list`` page (``page_size`` entries, at most
``max_bytes`` of text returned) from a remembered position (``timestamp >=`` the last
entry returned). A worker that starts from stored offsets (a takeover) first counts its
way to them from the job's first entry: one extra page per ``page_size`` entries, once.
Cloud Logging allows 60 ``entries.list`` calls per minute per project (Cloud Logging,
"Quotas and limits"), so reads are rationed (``reads_per_minute``): a running job is read
when its turn comes (each job about once per ``jobs x 60 / reads_per_minute`` seconds) and
otherwise returns nothing new this cycle; a finished job's last reads wait for their
token.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from google.api_core import exceptions as gexc

LOGGING_ENDPOINT = "https://logging.googleapis.com"
LOG_ID = "batch_task_logs"
READ_SCOPE = "https://www.googleapis.com/auth/logging.read"
MAX_PAGE_SIZE = 1000  # entries.list's own maximum
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


K = TypeVar("K")
V = TypeVar("V")
REMEMBERED = 20_000  # jobs whose read position (or status) a provider keeps


def remember(cache: OrderedDict[K, V], key: K, value: V, limit: int = REMEMBERED) -> None:
    """Put ``key`` in a least-recently-used cache of at most ``limit`` items."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


class HttpResponse(Protocol):
    status_code: int

    def json(self) -> Any: ...


class HttpSession(Protocol):
    """What we use of ``requests.Session`` (``google.auth``'s ``AuthorizedSession``)."""

    def post(self, url: str, *, json: Any, timeout: float) -> HttpResponse: ...


def parse_timestamp(text: str) -> int:
    """An RFC 3339 UTC timestamp (``...Z``, 0 to 9 fractional digits) as nanoseconds."""
    main, _, frac = text.rstrip("Z").partition(".")
    seconds = int((datetime.fromisoformat(main).replace(tzinfo=UTC) - _EPOCH).total_seconds())
    return seconds * 1_000_000_000 + int((frac + "000000000")[:9])


def format_timestamp(nanos: int) -> str:
    """Nanoseconds as the RFC 3339 form Cloud Logging filters take (9 fractional digits)."""
    seconds, frac = divmod(nanos, 1_000_000_000)
    base = (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{frac:09d}Z"


def to_nanos(at: datetime) -> int:
    delta = at - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


@dataclass(frozen=True)
class Position:
    """Just after the entry ``(nanos, insert_id)``, with the per-stream entry counts up to
    and including it (``nanos=-1``: before the first entry)."""

    out: int = 0
    err: int = 0
    nanos: int = -1
    insert_id: str = ""


@dataclass(frozen=True)
class Page:
    stdout: str
    stderr: str
    offsets: tuple[int, int]


class RestLogReader:
    """Cloud Logging's ``entries.list`` (REST v2) through an HTTP session."""

    def __init__(self, session: HttpSession, *, project: str,
                 endpoint: str = LOGGING_ENDPOINT, timeout: float = 30.0) -> None:
        self.session = session
        self.project = project
        self.url = f"{endpoint.rstrip('/')}/v2/entries:list"
        self.timeout = timeout

    def list_entries(self, filter_: str, page_size: int, page_token: str = ""
                     ) -> tuple[list[Mapping[str, Any]], str]:
        body: dict[str, Any] = {"resourceNames": [f"projects/{self.project}"],
                                "filter": filter_, "orderBy": "timestamp asc",
                                "pageSize": page_size}
        if page_token:
            body["pageToken"] = page_token
        try:
            response = self.session.post(self.url, json=body, timeout=self.timeout)
        except OSError as exc:  # requests' errors are OSErrors: no answer, try again
            raise gexc.ServiceUnavailable(  # type: ignore[no-untyped-call]
                f"entries.list: {exc}") from exc
        try:
            payload = response.json()
        except ValueError:  # an error page that is not JSON
            payload = {}
        if response.status_code >= 400:
            error = payload.get("error", {}) if isinstance(payload, dict) else {}
            raise gexc.from_http_status(  # type: ignore[no-untyped-call]
                response.status_code, str(error.get("message", "entries.list failed")))
        return list(payload.get("entries", [])), str(payload.get("nextPageToken", ""))


class ReadRation:
    """Shares ``per_minute`` list calls among the jobs being read: a token bucket (a
    burst of 10 s worth), and a turn per job so that no job starves the others."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * 10)
        self.tokens = self.capacity
        self.clock, self.sleep = clock, sleep
        self.updated = clock()
        self.last_read: dict[str, float] = {}
        self.asked: dict[str, float] = {}
        self._lock = threading.Lock()

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def turn(self, key: str) -> bool:
        """Take a token now if it is ``key``'s turn and one is there; else False. A job's
        turn comes once per ``jobs asking / rate`` seconds (jobs that asked in the last
        ten minutes)."""
        with self._lock:
            now = self.clock()
            self._refill(now)
            self.asked[key] = now
            for k in [k for k, t in self.asked.items() if now - t > 600]:
                del self.asked[k]
                self.last_read.pop(k, None)
            spacing = len(self.asked) / self.rate
            if now - self.last_read.get(key, -spacing - 1) < spacing or self.tokens < 1 - 1e-9:
                return False
            self.tokens -= 1
            self.last_read[key] = now
            return True

    def wait(self, key: str) -> None:
        """Take a token, waiting for one if need be."""
        while True:
            with self._lock:
                now = self.clock()
                self._refill(now)
                if self.tokens >= 1 - 1e-9:
                    self.tokens -= 1
                    self.last_read[key] = now
                    return
                pause = max(0.01, (1 - self.tokens) / self.rate)
            self.sleep(pause)


def entry_text(entry: Mapping[str, Any]) -> str:
    """One entry as one line: its text payload, or a JSON payload's ``message``."""
    if "textPayload" in entry:
        text = str(entry["textPayload"])
    else:
        payload = entry.get("jsonPayload", {})
        text = str(payload.get("message", json.dumps(payload, sort_keys=True)))
    return text.removesuffix("\n") + "\n"


def is_stderr(entry: Mapping[str, Any]) -> bool:
    return entry.get("severity", "DEFAULT") in ("ERROR", "CRITICAL", "ALERT", "EMERGENCY")


class OutputReader:
    """Reads one job's entries after given offsets (see the module docstring)."""

    def __init__(self, logs: RestLogReader, *, page_size: int = MAX_PAGE_SIZE,
                 max_bytes: int = 1 << 20) -> None:
        self.logs = logs
        self.page_size = min(page_size, MAX_PAGE_SIZE)
        self.max_bytes = max_bytes
        self.log_name = f"projects/{logs.project}/logs/{LOG_ID}"
        # Per job uid: where the last read stopped. A hint only: the offsets decide.
        self._positions: OrderedDict[str, Position] = OrderedDict()
        self._lock = threading.Lock()

    def forget(self, uid: str) -> None:
        with self._lock:
            self._positions.pop(uid, None)

    def read(self, uid: str, offsets: tuple[int, int], cutoff: int | None,
             next_page: Callable[[], None]) -> Page:
        """Entries of job ``uid`` after ``offsets`` with a timestamp up to ``cutoff`` (ns;
        None: all), at most one page and ``max_bytes`` returned. ``next_page`` is called
        before each list call after the first (it may wait for quota)."""
        want_out, want_err = offsets
        with self._lock:
            pos = self._positions.get(uid, Position())
        if pos.out > want_out or pos.err > want_err:
            pos = Position()  # the hint is past these offsets: count from the start
        out: list[str] = []
        err: list[str] = []
        size = 0
        token = ""
        filter_ = self._filter(uid, pos, cutoff)
        first = True
        while True:
            if not first:
                next_page()
            first = False
            entries, token = self.logs.list_entries(filter_, self.page_size, token)
            for entry in entries:
                key = (parse_timestamp(str(entry["timestamp"])), str(entry.get("insertId", "")))
                if key <= (pos.nanos, pos.insert_id):
                    continue  # at or before the position (the filter's >= bound)
                stderr = is_stderr(entry)
                index = pos.err if stderr else pos.out
                if index >= (want_err if stderr else want_out):  # not returned yet
                    text = entry_text(entry)
                    if (out or err) and size + len(text.encode()) > self.max_bytes:
                        return self._done(uid, pos, out, err, offsets)
                    (err if stderr else out).append(text)
                    size += len(text.encode())
                pos = Position(pos.out + (not stderr), pos.err + stderr, *key)
            if not token or out or err:  # one page returned; more pages only to skip
                return self._done(uid, pos, out, err, offsets)

    def _done(self, uid: str, pos: Position, out: list[str], err: list[str],
              offsets: tuple[int, int]) -> Page:
        with self._lock:
            remember(self._positions, uid, pos)
        return Page("".join(out), "".join(err),
                    (max(offsets[0], pos.out), max(offsets[1], pos.err)))

    def _filter(self, uid: str, pos: Position, cutoff: int | None) -> str:
        parts = [f'logName="{self.log_name}"', f'labels.job_uid="{uid}"']
        if pos.nanos >= 0:
            parts.append(f'timestamp>="{format_timestamp(pos.nanos)}"')
        if cutoff is not None:
            parts.append(f'timestamp<="{format_timestamp(cutoff)}"')
        return " AND ".join(parts)
