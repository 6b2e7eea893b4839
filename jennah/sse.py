"""Server-sent events for curl and scripts (docs/sse.md).

``GET /v1/jobs/{job_id}/events`` streams one job's events and ends after its terminal
event; ``GET /v1/notifications`` streams the tenant's notifications and never ends by
itself. The gateway (``gateway/sse.py``) and the workers (``worker/sse.py``) answer these
paths in the same way and differ only in where events come from (a :class:`Feeds`), so
everything else lives here: the routes, the wire format, the cursors, the error answers
and the loop that serves one stream.

**Plain ASGI, not Starlette's ``StreamingResponse``.** A stream waits for five things at
once: the next event, the keep-alive timer, the credentials re-check, the client leaving
and the server stopping. ``StreamingResponse`` sees only an iterator and watches for the
disconnect in a task group of its own, so the timers would need another layer of tasks
around it; and the status (401, 404, 204) must be chosen by checks made before the
response starts. One loop over plain ASGI messages, like the rest of the routing
(``jennah/asgi.py``), waits for all five and cancels everything it started when it
returns.

**One task drives a feed.** The feed runs in a task of its own (the gateway's Connect
client keeps per-task state), handing frames over one at a time through a queue of one;
the response loop never cancels a read in progress, so no event taken from the feed is
dropped. Ending the stream (terminal event, client gone, credentials revoked, server
stopping) cancels that task, and its ``aclosing`` closes the feed and the call beneath
it (the worker's watch, or the gateway's call to the worker).

**Stopping.** A stream that never ends by itself would hold the server's graceful drain
for its whole grace period. The stop signal (``jennah.lifecycle``, run before the
server drains) ends every stream at once with an ``unavailable`` error event, so clients
reconnect, with ``Last-Event-ID``, to a server that is staying.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import urllib.parse
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from connectrpc.code import Code
from connectrpc.compat import google_protobuf_json_codec
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from jennah.asgi import ASGIApp, Receive, Scope, Send
from jennah.errors import InvalidArgument, ShuttingDown, Unauthenticated, echoed
from jennah.lifecycle import on_stop_signal
from jennah.rpc import SafeDecodeCodec, retry_after_of, to_connect_error
from jennah.v1 import deployment_pb2 as pb

log = logging.getLogger("jennah.sse")

# A comment line at least this often, so that proxies and clients see a live connection.
# Read when a stream starts: tests shorten it.
HEARTBEAT_SECONDS = 15.0
# The credentials of a stream are checked again at least this often (docs/design.md §6).
RECHECK_SECONDS = 1.0
# How long closing a feed (and the call beneath it) may take before it is left behind.
CLOSE_SECONDS = 5.0
# Notifications are read in listings of the newest this many (ListNotifications' cap).
NOTIFICATIONS_LIMIT = 100

JOB_EVENTS_PATH = re.compile(r"/v1/jobs/(?P<job_id>[^/]+)/events")
NOTIFICATIONS_PATH = "/v1/notifications"
KEEP_ALIVE = b": keep-alive\n\n"
# Sent with the headers: some servers (pyvoy's Envoy) and proxies hold the headers back
# until the first body bytes, and a stream may have nothing to say for a long time.
OPENING = b": stream open\n\n"
TERMINAL_KINDS = frozenset(
    {pb.EVENT_KIND_COMPLETED, pb.EVENT_KIND_FAILED, pb.EVENT_KIND_CANCELLED})
TERMINAL_STATUSES = frozenset(
    {pb.JOB_STATUS_COMPLETED, pb.JOB_STATUS_FAILED, pb.JOB_STATUS_CANCELLED})
STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx and friends: pass each event on at once
]
# Connect's code -> HTTP status mapping (connectrpc.com/docs/protocol, "Error Codes").
HTTP_STATUS = {
    Code.CANCELED: 499, Code.UNKNOWN: 500, Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504, Code.NOT_FOUND: 404, Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403, Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400, Code.ABORTED: 409, Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501, Code.INTERNAL: 500, Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500, Code.UNAUTHENTICATED: 401,
}  # fmt: skip

# The JSON a Connect client gets for a message (compact protojson), so that ``data:``
# lines parse exactly like the RPCs' answers.
_JSON = SafeDecodeCodec(google_protobuf_json_codec(), json=True)


def to_json(message: Message) -> str:
    data: bytes = _JSON.encode(message)
    return data.decode()


# --- requests ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SseRequest:
    """What the feeds need of an HTTP request: headers (lower-case names), the TCP peer
    as ``"host:port"`` (as connectrpc reports it to the RPCs) and the query."""

    headers: Mapping[str, str]
    peer: str | None
    query: Mapping[str, list[str]]

    @classmethod
    def from_scope(cls, scope: Scope) -> SseRequest:
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(bytes(name).decode("latin-1").lower(),
                               bytes(value).decode("utf-8", "replace"))
        client = scope.get("client")
        query = urllib.parse.parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"),
                                      keep_blank_values=True)
        return cls(headers, f"{client[0]}:{client[1]}" if client else None, query)

    def cursor(self, parameter: str) -> str | None:
        """The resume point: ``Last-Event-ID`` (what an ``EventSource`` sends when it
        reconnects to the same URL, so it wins over the query), else the query
        ``parameter``; None for neither. Any other query parameter is refused, so that a
        misspelt cursor does not silently replay everything."""
        unknown = sorted(set(self.query) - {parameter})
        if unknown:
            raise InvalidArgument(f"unknown query parameter {echoed(unknown[0])!r}; this "
                                  f"stream takes only {parameter!r}")
        last = self.headers.get("last-event-id", "").strip()
        if last:
            return last
        values = self.query.get(parameter)
        if values is None:
            return None
        if len(values) != 1:
            raise InvalidArgument(f"{parameter} is given more than once")
        return values[0]


_SEQ = re.compile(r"[0-9]{1,19}")
MAX_SEQ = 2**63 - 1


def job_cursor(request: SseRequest) -> int:
    """The seq to resume after (0: from the first event)."""
    text = request.cursor("after_seq")
    if text is None:
        return 0
    if not _SEQ.fullmatch(text.strip()) or int(text) > MAX_SEQ:
        raise InvalidArgument(
            f"Last-Event-ID or after_seq must be an event's seq (a non-negative integer), "
            f"not {echoed(text)!r}")
    return int(text)


# --- notifications: ids and cursor --------------------------------------------------------

Key = tuple[int, str]  # (occurred_at in ns, id): the order ListNotifications sorts by


def notification_key(note: pb.Notification) -> Key:
    return note.occurred_at.ToNanoseconds(), note.id


def notification_event_id(note: pb.Notification) -> str:
    """``<occurredAt>/<id>``: the notification's time as its JSON prints it, and its id."""
    return f"{note.occurred_at.ToJsonString()}/{note.id}"


def notification_cursor(request: SseRequest) -> Key | None:
    """The key to resume after, from an event id of this stream; None: from now on."""
    text = request.cursor("after")
    if text is None:
        return None
    stamp, _, note_id = text.strip().partition("/")
    when = Timestamp()
    try:
        when.FromJsonString(stamp)
    except ValueError:
        note_id = ""
    if not note_id:
        raise InvalidArgument(
            f"Last-Event-ID or after must be a notification event id "
            f"(<occurredAt>/<id>, as this stream sends), not {echoed(text)!r}")
    return when.ToNanoseconds(), note_id


class NotificationCursor:
    """Which notifications of each listing of the newest ones are new to this stream.

    The listings have no cursor of their own (``ListNotifications`` returns the newest
    ``limit``), so the stream remembers the ids of the last listing and sends, in
    ascending order, those it has not seen. Two guards keep that exact:

    * without a resume point the first listing is what already happened: it is
      remembered, not sent; with one, it sends what is newer than the point;
    * when a listing is full, anything older than its oldest entry is never sent later:
      a deleted job's notification leaves the window and an older one slides back in,
      which is not news.

    What a listing cannot show is not sent: more than ``limit`` notifications between two
    listings (docs/sse.md says so). Memory stays at one listing's ids."""

    def __init__(self, after: Key | None) -> None:
        self._after = after
        self._floor = after
        self._seen: set[str] | None = None

    def fresh(self, newest_first: Sequence[pb.Notification], limit: int) -> list[pb.Notification]:
        first, seen, floor = self._seen is None, self._seen or set(), self._floor
        if first and self._after is None:
            fresh: list[pb.Notification] = []
        else:
            fresh = [n for n in newest_first if n.id not in seen
                     and (floor is None or notification_key(n) > floor)]
        self._seen = {n.id for n in newest_first}
        if newest_first and len(newest_first) >= limit:
            oldest = min(notification_key(n) for n in newest_first)
            self._floor = oldest if floor is None else max(floor, oldest)
        return sorted(fresh, key=notification_key)


# --- frames --------------------------------------------------------------------------------


def frame(event: str, data: str, event_id: str | None = None) -> bytes:
    """One event. ``data`` is one line of JSON (json.dumps escapes every line break)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n".encode()


def kind_name(kind: int) -> str:
    """``EVENT_KIND_STATUS_DETAIL`` -> ``status_detail`` (``unknown`` for a number this
    build does not know: a newer worker)."""
    try:
        name: str = pb.EventKind.Name(kind)
    except ValueError:
        return "unknown"
    return name.removeprefix("EVENT_KIND_").lower()


def job_event_frame(event: pb.JobEvent) -> bytes:
    return frame(kind_name(event.kind), to_json(event), str(event.seq))


def notification_frame(note: pb.Notification) -> bytes:
    return frame("notification", to_json(note), notification_event_id(note))


def error_json(code: str, message: str) -> str:
    """A Connect-style error, compact (one ``data:`` line in a stream)."""
    return json.dumps({"code": code, "message": message}, ensure_ascii=False,
                      separators=(",", ":"))


def error_body(exc: BaseException) -> tuple[int, str, float | None]:
    """``(HTTP status, Connect-style JSON body, retry-after seconds)`` for ``exc``; an
    unexpected exception is logged here and answered as a generic ``internal``."""
    err = to_connect_error(exc)
    wait = retry_after_of(err) if err.details else None
    return HTTP_STATUS.get(err.code, 500), error_json(err.code.value, err.message), wait


def error_frame(exc: BaseException) -> bytes:
    """The last event of a stream that failed after it started: ``event: error`` with the
    Connect-style error as data, and no id (a reconnect resumes after the last event)."""
    return frame("error", error_body(exc)[1])


# --- feeds ----------------------------------------------------------------------------------


class Feeds(Protocol):
    """Where a server's streams come from. Errors are Jennah errors or ``ConnectError``."""

    def identify(self, request: SseRequest) -> str:
        """The caller's tenant; also the periodic re-check of a live stream."""
        ...

    async def job_events(
        self, tenant: str, job_id: str, after_seq: int
    ) -> AsyncGenerator[pb.JobEvent] | None:
        """Check the job (``NotFound`` for an unknown or foreign one) and return its live
        events after ``after_seq``, ending with the terminal event; None when the job is
        terminal and nothing comes after ``after_seq``."""
        ...

    async def newest_notifications(self, tenant: str) -> Sequence[pb.Notification]:
        """The tenant's newest ``NOTIFICATIONS_LIMIT`` notifications, newest first."""
        ...

    async def notifications_changed(self, tenant: str) -> None:
        """Return when a new listing is worth making (a wake-up, or a poll interval)."""
        ...


async def job_frames(events: AsyncGenerator[pb.JobEvent]) -> AsyncGenerator[bytes]:
    async with contextlib.aclosing(events):
        async for event in events:
            yield job_event_frame(event)


async def notification_frames(
    feeds: Feeds, tenant: str, cursor: NotificationCursor, first: Sequence[pb.Notification]
) -> AsyncGenerator[bytes]:
    """Notifications as they happen, forever. A listing that fails with ``unavailable``
    (the store, or every worker, down for a moment) is skipped, not fatal."""
    listing: Sequence[pb.Notification] | None = first
    while True:
        if listing is not None:
            for note in cursor.fresh(listing, NOTIFICATIONS_LIMIT):
                yield notification_frame(note)
        await feeds.notifications_changed(tenant)
        try:
            listing = await feeds.newest_notifications(tenant)
        except Exception as exc:
            err = to_connect_error(exc)
            if err.code != Code.UNAVAILABLE:
                raise err from None
            log.warning("notifications stream: listing skipped: %s", err.message)
            listing = None


# --- HTTP ----------------------------------------------------------------------------------


async def respond(
    send: Send, status: int, body: str = "", headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    data = body.encode()
    head = [*headers]
    if status != 204:  # a 204 carries no Content-Length (RFC 9110 §8.6)
        head.append((b"content-length", str(len(data)).encode()))
    if data:
        head.append((b"content-type", b"application/json; charset=utf-8"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": data})


async def respond_error(send: Send, exc: BaseException) -> None:
    status, body, wait = error_body(exc)
    headers = []
    if wait is not None:  # HTTP's Retry-After is whole seconds (RFC 9110)
        headers.append((b"retry-after", str(max(1, math.ceil(wait))).encode()))
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await respond(send, status, body, headers)


def _accepts_event_stream(accept: str | None) -> bool:
    if accept is None or not accept.strip():
        return True
    ranges = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return bool(ranges & {"text/event-stream", "text/*", "*/*"})


class SseRoutes:
    """ASGI: the two SSE paths answered from ``feeds``; every other request goes to
    ``inner`` (the Connect app), lifespan included."""

    def __init__(self, inner: ASGIApp, feeds: Feeds) -> None:
        self.inner = inner
        self.feeds = feeds
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        on_stop_signal(self._on_stop_signal)

    def _on_stop_signal(self) -> None:  # in a signal handler: only schedule
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._stopping.set)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        path = scope["path"]
        route = JOB_EVENTS_PATH.fullmatch(path)
        if route is None and path != NOTIFICATIONS_PATH:
            await self.inner(scope, receive, send)
            return
        self._loop = asyncio.get_running_loop()
        if scope["method"] != "GET":
            await respond(send, 405, error_json("invalid_argument", "this stream is read with GET"),
                          [(b"allow", b"GET")])
            return
        request = SseRequest.from_scope(scope)
        if not _accepts_event_stream(request.headers.get("accept")):
            await respond(send, 406, error_json(
                "invalid_argument", "this stream is text/event-stream; send Accept: "
                "text/event-stream (or none)"))
            return
        try:
            if self._stopping.is_set():
                raise ShuttingDown("this server is shutting down; connect again")
            tenant = self.feeds.identify(request)
            if route is not None:
                job_id = route["job_id"]
                if "\x00" in job_id:  # as the RPCs refuse it, before it reaches a store
                    raise InvalidArgument("job_id: must not contain a NUL byte")
                events = await self.feeds.job_events(tenant, job_id, job_cursor(request))
                if events is None:  # an EventSource does not reconnect after a 204
                    await respond(send, 204)
                    return
                frames = job_frames(events)
            else:
                cursor = NotificationCursor(notification_cursor(request))
                first = await self.feeds.newest_notifications(tenant)
                frames = notification_frames(self.feeds, tenant, cursor, first)
        except Exception as exc:
            await respond_error(send, exc)
            return

        def recheck() -> None:
            if self.feeds.identify(request) != tenant:
                raise Unauthenticated("the credentials of this stream now belong to "
                                      "another tenant")

        await serve_stream(receive, send, frames, recheck=recheck, stopping=self._stopping)


async def serve_stream(
    receive: Receive,
    send: Send,
    frames: AsyncGenerator[bytes],
    *,
    recheck: Callable[[], None],
    stopping: asyncio.Event,
    heartbeat: float | None = None,
    recheck_every: float = RECHECK_SECONDS,
) -> None:
    """Send ``frames`` as a 200 event stream until they end, the client leaves,
    ``recheck`` raises (an error event, then the end) or ``stopping`` is set; a comment
    every ``heartbeat`` seconds (default ``HEARTBEAT_SECONDS``) without an event."""
    heartbeat = HEARTBEAT_SECONDS if heartbeat is None else heartbeat
    handoff: asyncio.Queue[bytes | Exception | None] = asyncio.Queue(maxsize=1)

    async def pump() -> None:
        try:
            async with contextlib.aclosing(frames):
                async for item in frames:
                    await handoff.put(item)
        except Exception as exc:
            await handoff.put(exc)
        else:
            await handoff.put(None)

    async def client_left() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    try:
        await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
        await send({"type": "http.response.body", "body": OPENING, "more_body": True})
    except OSError:  # gone already (a server that raises instead of dropping)
        await frames.aclose()
        return
    loop = asyncio.get_running_loop()
    pumping = asyncio.create_task(pump())
    left = asyncio.create_task(client_left())
    stopped = asyncio.create_task(stopping.wait())
    getter: asyncio.Task[bytes | Exception | None] | None = None
    beat_at, check_at = loop.time() + heartbeat, loop.time() + recheck_every

    async def body(data: bytes, more: bool = True) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": more})

    try:
        last = b""
        while True:
            getter = getter or asyncio.create_task(handoff.get())
            wait = max(0.0, min(beat_at, check_at) - loop.time())
            await asyncio.wait({getter, left, stopped}, timeout=wait,
                               return_when=asyncio.FIRST_COMPLETED)
            if left.done():
                return
            if stopped.done():
                last = error_frame(ShuttingDown(
                    "this server is shutting down; reconnect with Last-Event-ID"))
                break
            now = loop.time()
            if now >= check_at:
                try:
                    recheck()
                except Exception as exc:
                    last = error_frame(exc)
                    break
                check_at = now + recheck_every
            if not getter.done():
                if now >= beat_at:
                    await body(KEEP_ALIVE)
                    beat_at = now + heartbeat
                continue
            item, getter = getter.result(), None
            if item is None:
                break
            if isinstance(item, Exception):
                last = error_frame(item)
                break
            await body(item)
            beat_at = loop.time() + heartbeat
        await body(last, more=False)
    except OSError:  # the connection is gone (a server that raises instead of dropping)
        return
    finally:
        tasks = [t for t in (getter, pumping, left, stopped) if t is not None]
        for task in tasks:
            task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=CLOSE_SECONDS)
        if pending:
            log.warning("an event stream's feed did not close within %.0f s", CLOSE_SECONDS)

