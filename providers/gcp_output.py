"""A Batch job's stdout/stderr, read back from Cloud Logging (``GcpBatchProvider.read_output``).

**Where it is.** With ``logsPolicy.destination = CLOUD_LOGGING`` (``build_job`` always sets
it), Batch writes each line a task prints as one ``LogEntry`` of the log
``projects/P/logs/batch_task_logs``, labelled ``job_uid`` and ``task_id`` — Google Cloud
Batch, "Analyze a job using logs" and the ``batch_job_logs`` sample; ``task_id`` is
``<job uid>-<task group>-<task index>``, for example ``…-group0-2``. Stream: an entry of
severity ``ERROR`` (or above) is stderr, any other is stdout (Batch writes unstructured
stderr lines as ``ERROR`` and stdout lines as ``INFO``; a structured JSON line sets its own
severity and lands where that severity says).

**One listing per job, shared by its tasks.** The reader lists the *job's* entries
(``labels.job_uid``) from a cursor, and hands each entry to its task by ``task_id``: a
task's lines wait in memory until that task is read. So a job of 10,000 tasks costs as
many ``entries.list`` pages as its output fills, not one call (and one quota token) per
task; a plain job is the same with one task.

**Offsets** are, per task and stream, the number of that task's entries of that stream
already returned, counted in the order Cloud Logging lists them: by timestamp, then
``insertId`` (the ``LogEntry`` reference: ``insertId`` orders entries with the same
timestamp). The same log content gives the same offsets on every worker, which the WAL's
dedup needs. Each entry is one whole line; its text is returned with one trailing
newline. A read from offsets before what this reader already returned (another worker's
stored offsets, or a retry after a failed append) lists the job again from its start.

**Ingestion delay.** Cloud Logging may make an entry visible some seconds after its
timestamp, and not in timestamp order. An entry that became visible *after* entries later
than it were counted would shift the counts. So a running task is only read up to
``now - settle`` (entries older than the safety margin); a task (or job) that ended is read
to its end only once ``settle`` seconds have passed since it ended (``GcpBatchProvider.status``
holds its terminal state back until then). **Residual risk**: an entry ingested more than
``settle`` seconds late, or a VM clock ahead of the worker's by more than that, can still be
missed (or, for a worker starting from stored offsets, shift one line); a job cancelled by
Jennah is read up to the cancel minus ``settle``.

**Cost.** A read of a running task answers from what is waiting in memory, and otherwise
lists one ``entries.list`` page (``page_size`` entries) when its job's turn comes (below);
a final read lists pages until every entry up to the task's end has been met. At most
``max_bytes`` of text is returned per call. Cloud Logging allows 60 ``entries.list``
calls per minute per project (Cloud Logging, "Quotas and limits"), so calls are rationed
(``reads_per_minute``): a running job is listed when its turn comes (each job about once
per ``jobs x 60 / reads_per_minute`` seconds); a final read waits for its token. Memory:
at most ``max_buffered`` characters wait per job; past that, the other tasks' waiting
lines are dropped and listed again when those tasks are read.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from google.api_core import exceptions as gexc

LOGGING_ENDPOINT = "https://logging.googleapis.com"
LOG_ID = "batch_task_logs"
READ_SCOPE = "https://www.googleapis.com/auth/logging.read"
MAX_PAGE_SIZE = 1000  # entries.list's own maximum
ALL = 1 << 62  # a timestamp (ns) after every entry: "the whole log"
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
    """Reads the tasks of jobs from one listing per job (see the module docstring)."""

    def __init__(self, logs: RestLogReader, *, page_size: int = MAX_PAGE_SIZE,
                 max_bytes: int = 1 << 20, max_buffered: int = 16 << 20) -> None:
        self.logs = logs
        self.page_size = min(page_size, MAX_PAGE_SIZE)
        self.max_bytes = max_bytes
        self.max_buffered = max_buffered
        self.log_name = f"projects/{logs.project}/logs/{LOG_ID}"
        self._jobs: OrderedDict[str, _JobLog] = OrderedDict()  # by job uid
        self._lock = threading.Lock()

    def read(self, uid: str, task_id: str, offsets: tuple[int, int], *, cutoff: int | None,
             need: int | None, turn: Callable[[], bool], wait: Callable[[], None]) -> Page:
        """Task ``task_id``'s entries of job ``uid`` after ``offsets``, at most ``max_bytes``.

        ``cutoff``: list entries up to this timestamp (ns; None: all). ``need`` (a final
        read): every entry up to this timestamp (``ALL``: the whole log) must have been met
        before answering, listing page after page, each after ``wait()`` (quota). None (a
        running read): answer from memory, else list one page if ``turn()`` allows."""
        with self._lock:
            log = self._jobs.get(uid) or _JobLog()
            remember(self._jobs, uid, log)
        with log.lock:
            task = log.task(task_id)
            if task.evicted or any(o < n for o, n in zip(offsets, task.next, strict=True)):
                log.restart()  # returned (or dropped) already: list the job again
                task.next = list(offsets)
            task.skip_to(offsets)
            bound = ALL if cutoff is None else cutoff
            filter_, token = self._filter(uid, log.cursor[0], cutoff), ""
            if need is None:
                if not task.pending and log.reached < bound and turn():
                    self._page(log, task, filter_, token, bound)
            else:
                while not task.pending and log.reached < min(need, bound):
                    wait()
                    token = self._page(log, task, filter_, token, bound)
            return log.take(task, offsets, self.max_bytes)

    def _page(self, log: _JobLog, asking: _Task, filter_: str, token: str, bound: int) -> str:
        """List one page and meet its entries; return the next page's token ("": the
        listing reached its end, so every entry up to ``bound`` has been met)."""
        entries, token = self.logs.list_entries(filter_, self.page_size, token)
        for entry in entries:
            log.meet(entry)
        if not token:
            log.reached = max(log.reached, bound)
        if log.size > self.max_buffered:
            log.evict(keep=asking)
        return token

    def _filter(self, uid: str, after: int, cutoff: int | None) -> str:
        parts = [f'logName="{self.log_name}"', f'labels.job_uid="{uid}"']
        if after >= 0:
            parts.append(f'timestamp>="{format_timestamp(after)}"')
        if cutoff is not None:
            parts.append(f'timestamp<="{format_timestamp(cutoff)}"')
        return " AND ".join(parts)


@dataclass
class _Task:
    """One task's two streams within its job's listing (index 0: stdout, 1: stderr)."""

    seen: list[int] = field(default_factory=lambda: [0, 0])  # entries met, per stream
    next: list[int] = field(default_factory=lambda: [0, 0])  # first not yet returned
    pending: deque[tuple[int, int, str]] = field(default_factory=deque)  # (stream, i, text)
    evicted: bool = False  # waiting lines were dropped (memory): list again when read

    def skip_to(self, offsets: tuple[int, int]) -> None:
        """Forget what lies before ``offsets`` (returned before, perhaps by another worker)."""
        self.next = [max(o, n) for o, n in zip(offsets, self.next, strict=True)]
        while self.pending and self.pending[0][1] < self.next[self.pending[0][0]]:
            self.pending.popleft()


@dataclass
class _JobLog:
    """A job's listing so far: the cursor, and what each task met and has waiting."""

    cursor: tuple[int, str] = (-1, "")  # the last entry met: (timestamp ns, insertId)
    reached: int = -1  # every entry up to this timestamp (ns) has been met
    size: int = 0  # characters waiting
    tasks: dict[str, _Task] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def task(self, task_id: str) -> _Task:
        return self.tasks.setdefault(task_id, _Task())

    def restart(self) -> None:
        """Back to before the first entry; each task keeps what it returned (``next``)."""
        self.cursor, self.reached, self.size = (-1, ""), -1, 0
        for t in self.tasks.values():
            t.seen, t.evicted = [0, 0], False
            t.pending.clear()

    def meet(self, entry: Mapping[str, Any]) -> None:
        """Count ``entry`` in its task's stream, and keep its text if not returned yet."""
        key = (parse_timestamp(str(entry["timestamp"])), str(entry.get("insertId", "")))
        if key <= self.cursor:
            return  # at or before the cursor (the filter's >= bound)
        self.cursor = key
        labels = entry.get("labels") or {}
        task = self.task(str(labels.get("task_id", "")))
        stream = int(is_stderr(entry))
        index = task.seen[stream]
        task.seen[stream] += 1
        if index >= task.next[stream] and not task.evicted:
            text = entry_text(entry)
            task.pending.append((stream, index, text))
            self.size += len(text)

    def evict(self, keep: _Task) -> None:
        """Drop every other task's waiting lines (each lists again when it is read)."""
        for t in self.tasks.values():
            if t is not keep and t.pending:
                self.size -= sum(len(text) for _, _, text in t.pending)
                t.pending.clear()
                t.evicted = True

    def take(self, task: _Task, offsets: tuple[int, int], max_bytes: int) -> Page:
        """Return ``task``'s waiting lines, in order, at most ``max_bytes`` (at least one)."""
        texts: tuple[list[str], list[str]] = ([], [])
        size = 0
        while task.pending:
            stream, index, text = task.pending[0]
            n = len(text.encode())
            if size and size + n > max_bytes:
                break
            task.pending.popleft()
            self.size -= len(text)
            texts[stream].append(text)
            size += n
            task.next[stream] = index + 1
        return Page("".join(texts[0]), "".join(texts[1]),
                    (max(offsets[0], task.next[0]), max(offsets[1], task.next[1])))
