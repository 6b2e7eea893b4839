"""A stateful fake of Cloud Logging's ``entries.list`` (REST v2), for the GCP provider's
output: ``POST /v2/entries:list`` served by ``tests.fakes.serve_http``.

What it models, as Cloud Logging documents it:

* a bearer token is required (``Authorization: Bearer …``), else 401;
* ``resourceNames`` must be the project; ``orderBy`` only ``timestamp asc``;
  ``pageSize`` at most 1,000; the filter is parsed clause by clause (``AND`` of
  ``logName="…"``, ``labels.K="…"``, ``severity="…"``, ``timestamp>=``/``<=``/``>``/``<``
  ``"RFC 3339"``), anything else is 400 INVALID_ARGUMENT;
* entries are listed by timestamp, then ``insertId``; pages carry ``nextPageToken``;
* the read quota: ``reads_per_minute`` (60) ``entries.list`` calls per minute of the
  fake's clock, then 429 RESOURCE_EXHAUSTED;
* **ingestion delay**: ``write(..., delay=s)`` makes an entry visible only ``s`` seconds
  (of the fake's clock) after its timestamp, so entries can appear late and out of order.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from providers.gcp_output import LOG_ID, format_timestamp, parse_timestamp, to_nanos
from tests.fakes import Request, Response

MAX_PAGE_SIZE = 1000
_CLAUSE = re.compile(r'^([A-Za-z_.]+)\s*(>=|<=|=|>|<)\s*"([^"]*)"$')


def _error(status: int, code: str, message: str) -> Response:
    return Response(status, {"error": {"code": status, "status": code, "message": message}})


@dataclass
class _Entry:
    nanos: int
    insert_id: str
    visible_at: datetime
    body: dict[str, Any]


@dataclass
class FakeCloudLogging:
    project: str = "proj-test"
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    reads_per_minute: int = 60
    calls: Counter[str] = field(default_factory=Counter)
    throttled: int = 0  # calls answered 429
    requests: list[dict[str, Any]] = field(default_factory=list)
    _entries: list[_Entry] = field(default_factory=list)
    _minute: tuple[int, int] = (0, 0)  # (minute, calls in it)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: int = 0

    @property
    def log_name(self) -> str:
        return f"projects/{self.project}/logs/{LOG_ID}"

    def write(self, job_uid: str, text: str, *, stream: str = "stdout",
              at: datetime | None = None, delay: float = 0.0, task_id: str = "") -> None:
        """What Batch's agent writes for one printed line of a task: labelled with the
        job's uid and the task's id, ``<uid>-group0-<index>`` (task 0 by default)."""
        when = at or self.clock()
        with self._lock:
            self._ids += 1
            insert_id = f"{self._ids:08x}"
            body = {"logName": self.log_name, "insertId": insert_id,
                    "timestamp": format_timestamp(to_nanos(when)),
                    "severity": "ERROR" if stream == "stderr" else "INFO",
                    "textPayload": text,
                    "labels": {"job_uid": job_uid, "task_id": task_id or f"{job_uid}-group0-0"},
                    "resource": {"type": "batch.googleapis.com/Job"}}
            self._entries.append(_Entry(to_nanos(when), insert_id,
                                        when + timedelta(seconds=delay), body))

    def handle(self, req: Request) -> Response:
        with self._lock:
            self.calls[f"{req.method} {req.path}"] += 1
            if (req.method, req.path) != ("POST", "/v2/entries:list"):
                return _error(404, "NOT_FOUND", f"no method {req.method} {req.path}")
            if not req.headers.get("authorization", "").startswith("Bearer "):
                return _error(401, "UNAUTHENTICATED", "request is missing a bearer token")
            now = self.clock()
            minute = int(now.timestamp() // 60)
            used = self._minute[1] if self._minute[0] == minute else 0
            if used >= self.reads_per_minute:
                self.throttled += 1
                return _error(429, "RESOURCE_EXHAUSTED", "Quota exceeded for quota metric "
                              "'Read requests' and limit 'Read requests per minute'")
            self._minute = (minute, used + 1)
            body = req.body or {}
            self.requests.append(body)
            return self._list(body, now)

    def _list(self, body: dict[str, Any], now: datetime) -> Response:
        if body.get("resourceNames") != [f"projects/{self.project}"]:
            return _error(400, "INVALID_ARGUMENT", "resourceNames must name the project")
        if body.get("orderBy", "timestamp asc") != "timestamp asc":
            return _error(400, "INVALID_ARGUMENT", f"unsupported orderBy {body['orderBy']!r}")
        size = int(body.get("pageSize", 50))
        if not 0 < size <= MAX_PAGE_SIZE:
            return _error(400, "INVALID_ARGUMENT", f"pageSize {size} is out of range")
        try:
            tests = [self._clause(c) for c in str(body.get("filter", "")).split(" AND ") if c]
        except ValueError as exc:
            return _error(400, "INVALID_ARGUMENT", str(exc))
        matched = sorted((e for e in self._entries if e.visible_at <= now
                          and all(t(e) for t in tests)), key=lambda e: (e.nanos, e.insert_id))
        start = int(body.get("pageToken") or 0)
        page = matched[start:start + size]
        out: dict[str, Any] = {"entries": [e.body for e in page]} if page else {}
        if start + size < len(matched):
            out["nextPageToken"] = str(start + size)
        return Response(200, out)

    @staticmethod
    def _clause(text: str) -> Callable[[_Entry], bool]:
        m = _CLAUSE.match(text.strip())
        if m is None:
            raise ValueError(f"unparsable filter clause {text!r}")
        name, op, value = m.groups()
        if name == "timestamp":
            bound = parse_timestamp(value)
            compare: dict[str, Callable[[int], bool]] = {
                ">=": lambda n: n >= bound, "<=": lambda n: n <= bound,
                ">": lambda n: n > bound, "<": lambda n: n < bound}
            return lambda e: compare[op](e.nanos)
        if op != "=":
            raise ValueError(f"{op} is not supported on {name}")
        if name in ("logName", "severity"):
            return lambda e: e.body[name] == value
        if name.startswith("labels."):
            return lambda e: e.body["labels"].get(name.removeprefix("labels.")) == value
        raise ValueError(f"unknown field {name!r}")
