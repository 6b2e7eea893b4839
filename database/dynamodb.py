"""The DynamoDB job store (boto3): one table, conditional writes, transactions for atomicity.

Item design (table ``<DYNAMODB_TABLE_PREFIX>-jobs``, key ``pk``/``sk``, on-demand billing):

* job ``pk=JOB#<job_id> sk=JOB``, with ``event_seq`` (the last seq given to its events)
  and ``tr_count`` (how many transitions it has). Its item collection holds everything
  else about it, so one consistent Query reads any part of it in order:

  - transitions ``sk=TR#<idx:06>``;
  - events ``sk=EV#<seq:020>`` (the whole event, with its ``position``);
  - dedup keys ``sk=DK#<key>`` (a SHA-256 for keys over 512 bytes), one per stored
    event that has a key: how ``append_execution_events`` finds duplicates without
    reading the events;
  - output cursors ``sk=OUT#<attempt:06>#<task:06>#<stream>`` with ``delivered_end``;

* tenant ``pk=TENANT#<tenant> sk=TENANT`` with ``event_position`` (the last position
  given to the tenant's events);
* notifications, in the tenant's partition ``pk=NOTE#<tenant>``, keyed by time so that
  one consistent Query lists them newest first: the notification
  ``sk=N#<occurred_at µs:020>#<id>``; while it is unread, a copy ``sk=U#<same>``, so that
  the unread ones and their count are a Query of their own (a sparse index would be
  eventually consistent: an ack would not show at once); and ``sk=ID#<id>`` naming the
  time part, for an ack by id. All three are written in the transaction of the job's
  terminal update (the id is derived from the job id, ``_common.notification_id``, so a
  delete of the job finds them too);
* tenant event ``pk=TEV#<tenant> sk=<position:020>``: a second copy of every event, in
  the tenant's partition, so that ``list_tenant_events`` is one consistent Query;
* request-id guard ``pk=REQ#<tenant>#<request_id> sk=REQ`` holding the job id, written in
  the transaction that creates the job, so concurrent creates with one request id yield
  one job;
* worker membership ``pk=WORKER#<id> sk=WORKER``;
* ``pk=SCHEMA sk=events_v2``: written by ``migrate`` once the table is at event
  pipeline v2 (indexes added, v1 events renumbered), so later migrations skip the scan.

**Numbering.** Every write that stores events is one ``TransactWriteItems`` holding, with
the op's own items: an Update of the job item setting ``event_seq`` from E to E+n on the
condition that it is still E (so seqs are gapless and no other writer of the job slips
in between), the events and their tenant copies, and an Update of each tenant counter
from P to P+m on the condition that it is still P. A transaction that took positions
P+1..P+m therefore commits only if nothing else took any position of that tenant since
P was read: positions increase in commit order, and a watcher holding position P that
queries ``position > P`` never misses a later commit. (A global secondary index on the
events would not do: index reads are eventually consistent, a watcher could see P+2
before P+1 and skip it.) Positions are never handed out before the commit: taking
them with an atomic ADD first would let a later taker commit before an earlier one.

The price is that a tenant's writers are serialised on its counter, optimistically: a
writer that lost the race learns the counter's value from the cancellation
(``ReturnValuesOnConditionCheckFailure``, no read needed) and tries again, at once the
first time, then after a short random wait; one that keeps losing reserves the counter
for a moment (``_Race``), so busy writers cannot starve it. After 30 s and 50 lost
tries a write gives up with ``StoreUnavailable``. Every lost transaction is wasted work (on
DynamoDB, write capacity), so a tenant's event rate is bounded by the transactions its
counter admits per second, and grows with the events per transaction: see "What
DynamoDB can and cannot batch".

**Execution events** are placed by ``_common.place`` from one consistent snapshot (a
``TransactGetItems`` of the job item, the output cursors and the dedup keys of the
batch; if that takes several reads, they must all show the same ``event_seq``). Every
change that matters to placement (status, attempt, cursors, keys) writes an event, so
the ``event_seq`` condition of the write proves that the snapshot still holds; if it
fails, the job is read again and its events placed again.

**What DynamoDB can and cannot batch.** A transaction holds at most 100 items and 4 MB
(``_TX_MAX``, ``_TX_BYTES``), so ``write_batch`` cannot be one transaction of unbounded
size as in SQL. It packs consecutive ops that touch different jobs (and request ids)
into as few transactions as fit: each op is read and checked first (an op that fails
its checks, ``LeaseLost``, ``Conflict``, ``NotFound``, writes nothing and gets its error in
its slot), then the ops' items share a transaction. If an op's item condition fails
(a concurrent writer), that op alone is read and planned again while the others retry;
if the service refuses the transaction for an item (too large), each op is sent alone so
the error lands in its own slot. An op on a job that an earlier op of the batch also
touches waits for that op's commit. A large ``AppendEvents`` is split over several
transactions; each is atomic and a retry after a failure is idempotent (dedup keys and
output cursors), but an op that fails midway (the store went away) may have stored a
prefix of its events, which SQL never does. Claims are packed the same way.

Global secondary indexes (all sparse: only the items carrying the key attributes):
``by_tenant`` (``tenant_id``, ``created_key`` = zero-padded µs + job id) lists a tenant's
jobs newest first; ``active`` (``active_shard``, ``lease_expires_at``) holds only
non-terminal jobs, spread over a few shards, for claims; ``by_owner`` (``active_owner``,
``created_key``) lists a worker's active jobs; ``active_by_tenant`` (``active_tenant``,
keys only) holds a tenant's non-terminal jobs for ``has_active_jobs``; ``workers``
(``member``, ``heartbeat_at``). Times are stored as integer microseconds since the epoch.

Index reads are eventually consistent: a new job can take a moment to show in
``list_jobs``, and ``has_active_jobs`` can answer from a moment ago (it only decides when a
tenant-wide watch without ``follow`` ends, which a moment's delay does not harm).
Everything that decides ownership rereads the base item (consistent reads and
conditions), so a stale index can delay a claim or a renewal but never grant one.

**Deletes** remove the job item and its guard in one transaction (after which no write
of the job can commit: they are all conditional on the job item), then sweep its item
collection and its tenant copies (positions read from its events). The sweep is not
atomic: a tenant-wide reader can see the events of a job being deleted for a moment, and
if the sweep is cut short, deleting the job again finishes it (then says ``NotFound``).

**Upgrade from v1.** v1 tables had an ``events_by_tenant`` index (``event_tenant``,
``event_key``) and events without positions, numbered by the v1 worker (lease blocks:
seq 1, 2, 4294967297...). ``migrate`` adds the missing indexes to an existing table,
renumbers each job's v1 events with ``_common.renumber_v1`` (seq 1..n, dedup key
``v1:<old seq>``, positions per tenant in v1's order: time, job, seq, taking each job's
events in seq order), sets ``event_seq`` and the output cursors, and gives active jobs
``active_tenant``. Processes that migrate at once take turns on a lock item
(``pk=SCHEMA sk=upgrade_lock``: a token and an expiry, renewed by each transaction of the
upgrade, which is conditional on the token, so a holder that stalled past the expiry
cannot write any more). The upgrade is idempotent and can run again after a crash: each
transaction moves events (in seq order per job: new seq <= old seq, so a key is free
before it is reused) on the condition that they are still v1, and a partly upgraded job
is recognised by its ``v1:`` dedup keys. All v1 workers must be stopped first.

The old ``events_by_tenant`` index is left on an upgraded table: the upgrade rewrites
every v1 event without its keys, so it is empty and costs nothing; drop it by hand with
``aws dynamodb update-table --global-secondary-index-updates '[{"Delete":
{"IndexName": "events_by_tenant"}}]'``. New tables do not have it.

**Clock.** DynamoDB has no server clock, so leases use the worker clock (injected) with
a skew margin: a lease counts as expired only once ``lease_expires_at + skew <= now``.
The default skew is 2 s; worker clocks must agree to within it (NTP does far better).
Released leases are set to the epoch, so they are claimable at once whatever the skew.

**Limits.** An item holds at most 400 KB, so a spec larger than that (huge env values)
is refused with ``InvalidArgument``; so is an event whose text is that large. A job's
task states (a binary attribute ``tasks``, ``jennah.tasks.encode``) take about 40 KB for
10,000 finished tasks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import time
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from database import _common as c
from database.base import (
    AppendEvents,
    CreateJob,
    OutputOffsets,
    UpdateJob,
    WriteOp,
    WriteResult,
    unwrap,
)
from jennah.backoff import Backoff
from jennah.errors import (
    Conflict,
    InvalidArgument,
    JennahError,
    LeaseLost,
    NotFound,
    StoreError,
    StoreUnavailable,
)
from jennah.models import (
    EventKind,
    Job,
    JobEvent,
    JobFilter,
    JobPatch,
    Lease,
    Notification,
    Page,
    Placed,
    Transition,
    WorkerInfo,
)
from jennah.settings import Env, StoreSettings

Item = dict[str, Any]  # a low-level DynamoDB item ({"attr": {"S": "..."}})
TxItem = dict[str, Any]  # one action of a TransactWriteItems

DEFAULT_SKEW_SECONDS = 2.0
ACTIVE_SHARDS = 4
# Items per TransactWriteItems: the service limit (it was 25 until 2022). Every
# transaction that stores events of a tenant competes for that tenant's counter, so the
# fewer transactions a batch needs, the fewer conflicts and round trips.
_TX_MAX = 100
_TX_BYTES = 3_500_000  # the service limit is 4 MB per transaction; our sizes are estimates
_GET_MAX = 100  # items per TransactGetItems
# Contention: a write whose own conditions failed is read again and retried after a
# random wait, in units of the last transaction's round trip (the time a rival needs to
# commit), doubling with the losses in a row, at most _BACKOFF_MAX; one that lost only a
# tenant counter retries at once with the value it learned, and reserves the counter
# after _RESERVE_AFTER losses (``_Race``). Either gives up (StoreUnavailable) once it
# has been losing for _CONTENDED_SECONDS and _CONTENDED_LOSSES times (both: a slow
# store is not a livelock).
_CONTENDED_SECONDS = 30.0
_CONTENDED_LOSSES = 50
_BACKOFF_MAX = 0.2
_RESERVE_AFTER = 4
_RESERVE_SECONDS = 2.0
_INDEX_WAIT = 1800.0  # seconds to wait for a new index to be backfilled
_INDEX_POLL = 1.0  # seconds between looks at a new index (a fixed poll: it takes minutes)
_LOCK_POLL = 0.5  # seconds between tries of a held upgrade lock (a fixed poll, likewise)
# A call failing with TransactionConflictException (an item in another transaction) is
# tried _CONFLICT_TRIES times in all, with full-jitter backoff of this base and cap (the
# cap is what the last retry reaches: it never binds).
_CONFLICT_TRIES = 6
_CONFLICT_BASE = 0.02
_CONFLICT_CAP = 0.32
# Seams for the tests: every wait of the retry and poll loops here goes through _sleep,
# and every random choice of one through _random.
_sleep: Callable[[float], None] = time.sleep
_random: Callable[[], float] = random.random
_UNAVAILABLE = {
    "ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded",
    "InternalServerError", "ServiceUnavailable", "LimitExceededException",
    "TransactionInProgressException",
}  # fmt: skip
_UNAVAILABLE_REASONS = {"ThrottlingError", "ProvisionedThroughputExceeded", "RequestLimitExceeded"}
_FAILED = "ConditionalCheckFailed"
_TIME_ATTRS = c.JOB_TIME_COLUMNS | {"at", "heartbeat_at", "occurred_at"}
# Notification ids are UUIDs (36 characters): a longer one is nobody's, and is not put in
# a key (a sort key holds at most 1 KB).
_MAX_NOTIFICATION_ID = 128
_CHECK_ERRORS = (LeaseLost, Conflict, NotFound, InvalidArgument)


def _index(name: str, pk: str, sk: str | None = None, projection: str = "ALL") -> dict[str, Any]:
    schema = [{"AttributeName": pk, "KeyType": "HASH"}]
    if sk is not None:
        schema.append({"AttributeName": sk, "KeyType": "RANGE"})
    return {"IndexName": name, "KeySchema": schema, "Projection": {"ProjectionType": projection}}


ATTRIBUTE_TYPES = {
    "pk": "S", "sk": "S", "tenant_id": "S", "created_key": "S", "active_shard": "S",
    "lease_expires_at": "N", "active_owner": "S", "active_tenant": "S", "member": "S",
    "heartbeat_at": "N",
}  # fmt: skip
INDEXES = [
    _index("by_tenant", "tenant_id", "created_key"),
    _index("active", "active_shard", "lease_expires_at"),
    _index("by_owner", "active_owner", "created_key"),
    _index("active_by_tenant", "active_tenant", projection="KEYS_ONLY"),
    _index("workers", "member", "heartbeat_at"),
]


class _ConditionFailed(Exception):
    """A single-item write's condition did not hold."""


class _Cancelled(Exception):
    """A transaction was cancelled: one reason code (and item, when the condition that
    failed asked for it) per action."""

    def __init__(self, codes: list[str], items: list[Item | None], messages: list[str]) -> None:
        super().__init__(codes)
        self.codes = codes
        self.items = items
        self.messages = messages


# --- values and keys ------------------------------------------------------------------------


def _av(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, bytes):
        return {"B": value}
    if isinstance(value, int):
        return {"N": str(value)}
    if isinstance(value, datetime):
        return {"N": str(c.to_micros(value))}
    if isinstance(value, dict):
        return {"M": {k: _av(v) for k, v in value.items()}}
    return {"S": str(value)}


def _from_av(attr: str, av: Mapping[str, Any]) -> Any:
    if "NULL" in av:
        return None
    if "BOOL" in av:
        return bool(av["BOOL"])
    if "N" in av:
        n = int(av["N"])
        return c.from_micros(n) if attr in _TIME_ATTRS else n
    if "M" in av:
        return {k: _from_av(k, v) for k, v in av["M"].items()}
    if "B" in av:
        return bytes(av["B"])
    return av["S"]


def _row(item: Mapping[str, Any], columns: Sequence[str]) -> c.Row:
    return {col: _from_av(col, item[col]) if col in item else None for col in columns}


def _int(item: Mapping[str, Any], attr: str) -> int:
    return int(item[attr]["N"]) if attr in item else 0


def _size(item: Mapping[str, Any]) -> int:
    """Roughly the bytes DynamoDB counts for ``item`` (a little more; a binary value
    counts its length)."""
    return len(json.dumps(item, separators=(",", ":"), default=_blob_stub).encode())


def _blob_stub(value: bytes) -> str:
    return "." * len(value)


def _key(pk: str, sk: str) -> Item:
    return {"pk": {"S": pk}, "sk": {"S": sk}}


def _job_key(job_id: str) -> Item:
    return _key(f"JOB#{job_id}", "JOB")


def _event_key(job_id: str, seq: int) -> Item:
    return _key(f"JOB#{job_id}", f"EV#{seq:020d}")


def _tenant_event_key(tenant_id: str, position: int) -> Item:
    return _key(f"TEV#{tenant_id}", f"{position:020d}")


def _counter_key(tenant_id: str) -> Item:
    return _key(f"TENANT#{tenant_id}", "TENANT")


def _guard_key(tenant_id: str, request_id: str) -> Item:
    return _key(f"REQ#{tenant_id}#{request_id}", "REQ")


def _dedup_key(job_id: str, key: str) -> Item:
    if len(key.encode()) > 512:  # a sort key holds 1 KB
        key = "~" + hashlib.sha256(key.encode()).hexdigest()
    return _key(f"JOB#{job_id}", f"DK#{key}")


def _cursor_key(job_id: str, out: c.OutputKey) -> Item:
    attempt, task, stream = out
    return _key(f"JOB#{job_id}", f"OUT#{attempt:06d}#{task:06d}#{stream}")


def _note_key(kind: str, tenant_id: str, suffix: str) -> Item:
    """A notification item: ``kind`` N (the notification), U (its unread copy) or ID."""
    return _key(f"NOTE#{tenant_id}", f"{kind}#{suffix}")


def _note_suffix(n: Notification) -> str:
    return f"{c.to_micros(n.occurred_at):020d}#{n.notification_id}"


def _note_item(n: Notification, kind: str) -> Item:
    row = c.notification_to_row(n)
    return {**{k: _av(v) for k, v in row.items()}, **_note_key(kind, n.tenant_id,
                                                                 _note_suffix(n))}


_MARKER_KEY = _key("SCHEMA", "events_v2")
_LOCK_KEY = _key("SCHEMA", "upgrade_lock")
_LOCK_TTL = 120.0  # seconds an upgrade lock lasts unless renewed


def _created_key(created_at: datetime, job_id: str) -> str:
    return f"{c.to_micros(created_at):020d}#{job_id}"


def _shard(job_id: str) -> str:
    return str(zlib.crc32(job_id.encode()) % ACTIVE_SHARDS)


def _job_item(job: Job) -> Item:
    row = c.job_to_row(job)
    row["spec"] = json.dumps(row["spec"], separators=(",", ":"))
    item: Item = {k: _av(v) for k, v in row.items() if v is not None}
    assert job.created_at is not None
    item.update(_job_key(job.job_id))
    item["created_key"] = {"S": _created_key(job.created_at, job.job_id)}
    item["job_name"] = {"S": job.spec.name}
    item["labels"] = {"M": {k: {"S": v} for k, v in job.spec.labels.items()}}
    if not job.status.terminal:
        item["active_shard"] = {"S": _shard(job.job_id)}
        item["active_owner"] = {"S": job.owner_worker_id or "-"}
        item["active_tenant"] = {"S": job.tenant_id}
    return item


def _job_from_item(item: Mapping[str, Any]) -> Job:
    return c.job_from_row(_row(item, c.JOB_COLUMNS))


def _transition_item(t: Transition, idx: int) -> Item:
    item: Item = {"pk": {"S": f"JOB#{t.job_id}"}, "sk": {"S": f"TR#{idx:06d}"}}
    item.update(job_id=_av(t.job_id), idx=_av(idx), to_status=_av(t.to_status.value),
                at=_av(t.at), reason=_av(t.reason), worker_id=_av(t.worker_id))  # fmt: skip
    if t.from_status is not None:
        item["from_status"] = _av(t.from_status.value)
    return item


def _event_item(e: JobEvent, key: Item) -> Item:
    row = c.event_to_row(e)
    item: Item = {k: _av(v) for k, v in row.items() if v is not None}
    item.update(key)
    return item


def _event_from_item(item: Mapping[str, Any]) -> JobEvent:
    return c.event_from_row(_row(item, c.EVENT_COLUMNS))


def _cursor_item(job_id: str, out: c.OutputKey, end: int) -> Item:
    attempt, task, stream = out
    return {**_cursor_key(job_id, out), "job_id": _av(job_id), "attempt": _av(attempt),
            "task_index": _av(task), "stream": _av(stream), "delivered_end": _av(end)}  # fmt: skip


class _Expr:
    """Collects ``#name``/``:value`` placeholders for one expression-based request."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.values: dict[str, Any] = {}

    def n(self, name: str) -> str:
        key = f"#a{len(self.names)}"
        self.names[key] = name
        return key

    def v(self, value: Any) -> str:
        return self.raw(_av(value))

    def raw(self, av: dict[str, Any]) -> str:
        key = f":v{len(self.values)}"
        self.values[key] = av
        return key

    def args(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.names:
            out["ExpressionAttributeNames"] = self.names
        if self.values:
            out["ExpressionAttributeValues"] = self.values
        return out


def _seq_condition(e: _Expr, item: Mapping[str, Any]) -> str:
    """The job item still exists and its ``event_seq`` is still what ``item`` shows
    (a job written by v1 may not have one yet)."""
    if "event_seq" in item:
        return f"attribute_exists(pk) AND {e.n('event_seq')} = {e.v(_int(item, 'event_seq'))}"
    return f"attribute_exists(pk) AND attribute_not_exists({e.n('event_seq')})"


# --- units of work ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Race:
    """One caller's state while its transactions compete for tenant counters.

    Whoever just won a counter knows its value and tends to win it again, so busy
    writers could starve another one. A writer that lost a counter ``_RESERVE_AFTER``
    times in a row reserves it: ``reserved_by`` (its ticket) and ``reserved_until`` on the
    counter item, which every counter update requires to be absent, its own or expired,
    and removes. Others then lose until it commits (or the reservation expires, after
    ``_RESERVE_SECONDS`` on the worker clock: a clock that is off only makes the
    reservation last longer or shorter, it never lets a position be taken twice; it lasts
    longer when transactions are slow)."""

    ticket: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    losses: int = 0  # transactions in a row that committed nothing
    counter_losses: int = 0  # of those, the last ones lost only to tenant counters
    since: float = 0.0  # when that run of losses began (monotonic)
    reserved: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class _Outcome:
    """What one transaction did: the events as stored per unit when it committed;
    otherwise, by unit index, the reason codes of the units whose own conditions failed,
    the tenants whose counters had moved (their new values are learned), and whether one
    of those is reserved by another writer."""

    numbered: list[list[JobEvent]] | None
    failed: dict[int, list[str]] = dataclasses.field(default_factory=dict)
    counters: set[str] = dataclasses.field(default_factory=set)
    blocked: bool = False


def _unreserved(e: _Expr, ticket: str, now: datetime) -> str:
    """The counter is not reserved by another writer (see ``_Race``)."""
    rb, ru = e.n("reserved_by"), e.n("reserved_until")
    return (f"(attribute_not_exists({rb}) OR {rb} = {e.v(ticket)} OR "
            f"{ru} < {e.v(now)})")  # fmt: skip


@dataclasses.dataclass
class _Unit:
    """What one op (or one job's share of an op) writes in one transaction: its own
    actions, plus its events numbered by seq (the transaction adds them, their tenant
    copies and the tenant counters). ``v1`` events overwrite a v1 event item in place."""

    items: list[TxItem]
    events: list[JobEvent] = dataclasses.field(default_factory=list)
    size: int = 0
    v1: bool = False

    @property
    def cost(self) -> int:
        return len(self.items) + 2 * len(self.events)


class _Work:
    """One job's share of a write: planned from fresh reads, committed in a transaction
    (maybe shared with other works), planned again when its own conditions fail."""

    def __init__(self, store: DynamoDBStore) -> None:
        self.store = store
        self.done = False
        self.result: WriteResult = None
        self.unit: _Unit | None = None
        self.failures = 0
        self.losing_since = 0.0

    def build(self, items: int, size: int) -> _Unit | None:
        """Read and check; return what to write (within ``items`` and ``size`` if the
        work can be cut), or None after ``finish`` (or when nothing fits yet)."""
        raise NotImplementedError

    def plan(self, items: int, size: int) -> _Unit | None:
        """The unit to commit now if it fits in ``items`` actions and ``size`` bytes."""
        if self.done:
            return None
        if self.unit is None:
            try:
                self.unit = self.build(items, size)
            except _CHECK_ERRORS as exc:
                self.finish(exc)
            if self.unit is None:
                return None
        u = self.unit
        return u if u.cost <= items and u.size <= size else None

    def finish(self, result: WriteResult) -> None:
        self.done, self.result, self.unit = True, result, None

    def committed(self, events: list[JobEvent]) -> None:
        raise NotImplementedError

    def conflicted(self, codes: list[str]) -> None:
        """A condition of the unit failed (``codes``: one per action of the unit, its
        items first): a concurrent write got in. Plan again from fresh reads."""
        self.failed()

    def failed(self) -> None:
        self.failures += 1
        now = time.monotonic()
        if self.failures == 1:
            self.losing_since = now
        elif now - self.losing_since > _CONTENDED_SECONDS and self.failures > _CONTENDED_LOSSES:
            raise StoreUnavailable("dynamodb: concurrent writes kept conflicting")
        self.unit = None


class _Create(_Work):
    def __init__(self, store: DynamoDBStore, job: Job, ttl: float) -> None:
        super().__init__(store)
        self.job, self.ttl = job, ttl
        self.stored: Job | None = None

    def build(self, items: int, size: int) -> _Unit | None:
        s, job = self.store, self.job
        if job.request_id:
            existing = s._by_guard(_guard_key(job.tenant_id, job.request_id))
            if existing is not None:
                self.finish((existing, False))
                return None
        now = s._now()
        stored = c.new_job(job, now, self.ttl)
        first, submitted = c.created(stored, now)
        item = _job_item(stored)
        item["tr_count"], item["event_seq"] = _av(1), _av(1)
        actions = [s._put(item, "attribute_not_exists(pk)"),
                   s._put(_transition_item(first, 0), "attribute_not_exists(pk)")]  # fmt: skip
        if job.request_id:
            guard = {**_guard_key(job.tenant_id, job.request_id), "job_id": _av(job.job_id)}
            actions.append(s._put(guard, "attribute_not_exists(pk)"))
        self.stored = stored
        event = dataclasses.replace(submitted, seq=1)
        return _Unit(actions, [event], _size(item) + 2 * _size(_event_item(event, {})))

    def committed(self, events: list[JobEvent]) -> None:
        self.finish((self.stored, True))

    def conflicted(self, codes: list[str]) -> None:
        guard_taken = bool(self.job.request_id) and len(codes) > 2 and codes[2] == _FAILED
        if codes and codes[0] == _FAILED and not guard_taken:
            self.finish(Conflict(f"job {self.job.job_id} already exists"))
        else:  # the request id was taken meanwhile (the next plan finds that job), or a race
            self.failed()


class _Update(_Work):
    def __init__(self, store: DynamoDBStore, op: UpdateJob) -> None:
        super().__init__(store)
        self.op = op
        self.updated: Job | None = None

    def build(self, items: int, size: int) -> _Unit | None:
        s, op = self.store, self.op
        item = s._get(_job_key(op.job_id))
        job = c.check_lease(_job_from_item(item) if item else None, op.lease)
        assert item is not None
        now = s._now()
        updated, transitions, events = c.apply_patch(job, op.lease, op.patch, now, op.reason)
        e = _Expr()
        extra: dict[str, Any] = {}
        cond = (f"attribute_exists(pk) AND {e.n('owner_worker_id')} = {e.v(op.lease.worker_id)} "
                f"AND {e.n('lease_version')} = {e.v(op.lease.version)} "
                f"AND {e.n('status')} = {e.v(job.status.value)}")  # fmt: skip
        seq = _int(item, "event_seq")
        if events:
            cond += " AND " + _seq_condition(e, item)
            extra["event_seq"] = seq + len(events)
        count = _int(item, "tr_count") if "tr_count" in item else 1
        if transitions:
            extra["tr_count"] = count + len(transitions)
        new_item = _job_item(updated)
        update = s._diff(e, job, updated, new_item, extra)
        actions: list[TxItem] = [{"Update": {
            "TableName": s.table, "Key": _job_key(op.job_id), "UpdateExpression": update,
            "ConditionExpression": cond, **e.args()}}]  # fmt: skip
        actions += [s._put(_transition_item(t, count + i), "attribute_not_exists(pk)")
                    for i, t in enumerate(transitions)]  # fmt: skip
        size_ = _size(new_item)
        # The condition on the job's status makes this the one move into a terminal
        # state; the id item's condition says so again.
        note = c.terminal_notification(job, updated, now)
        if note is not None:
            notes = [_note_item(note, "N"), _note_item(note, "U"),
                     {**_note_key("ID", note.tenant_id, note.notification_id),
                      "note_key": _av(_note_suffix(note))}]  # fmt: skip
            actions += [s._put(notes[0]), s._put(notes[1]),
                        s._put(notes[2], "attribute_not_exists(pk)")]  # fmt: skip
            size_ += sum(_size(n) for n in notes)
        numbered = [dataclasses.replace(ev, seq=seq + 1 + i) for i, ev in enumerate(events)]
        self.updated = updated
        size_ += sum(2 * _size(_event_item(ev, {})) for ev in numbered)
        return _Unit(actions, numbered, size_)

    def committed(self, events: list[JobEvent]) -> None:
        self.finish(self.updated)


class _Claim(_Work):
    def __init__(self, store: DynamoDBStore, job_id: str, worker_id: str, now: datetime,
                 cutoff: datetime, ttl: float) -> None:  # fmt: skip
        super().__init__(store)
        self.job_id, self.worker_id, self.now, self.cutoff, self.ttl = (
            job_id, worker_id, now, cutoff, ttl)
        self.claimed: Job | None = None

    def build(self, items: int, size: int) -> _Unit | None:
        s = self.store
        item = s._get(_job_key(self.job_id))
        job = _job_from_item(item) if item else None
        if (item is None or job is None or job.status.terminal or "active_shard" not in item
                or (job.lease_expires_at or c.EPOCH) > self.cutoff):  # fmt: skip
            self.finish(None)  # gone, finished, or renewed or claimed meanwhile
            return None
        now = self.now
        claimed = dataclasses.replace(
            job, owner_worker_id=self.worker_id, lease_version=job.lease_version + 1,
            lease_expires_at=now + timedelta(seconds=self.ttl), last_heartbeat_at=now,
            updated_at=now,
        )  # fmt: skip
        seq = _int(item, "event_seq") + 1
        event = dataclasses.replace(c.claimed_event(claimed, job.owner_worker_id, now), seq=seq)
        # The condition rereads the item itself: exactly one claimer sees it expired at
        # this version, so a stale index row cannot double-claim.
        e = _Expr()
        sets = {"owner_worker_id": self.worker_id, "active_owner": self.worker_id,
                "lease_version": claimed.lease_version, "lease_expires_at":
                claimed.lease_expires_at, "last_heartbeat_at": now, "updated_at": now,
                "event_seq": seq}  # fmt: skip
        update = "SET " + ", ".join(f"{e.n(k)} = {e.v(v)}" for k, v in sets.items())
        cond = (f"{_seq_condition(e, item)} AND attribute_exists({e.n('active_shard')}) AND "
                f"{e.n('lease_version')} = {e.v(job.lease_version)} AND "
                f"{e.n('lease_expires_at')} <= {e.v(self.cutoff)}")  # fmt: skip
        self.claimed = claimed
        action = {"Update": {"TableName": s.table, "Key": _job_key(self.job_id),
                             "UpdateExpression": update, "ConditionExpression": cond,
                             **e.args()}}  # fmt: skip
        return _Unit([action], [event], 2 * _size(_event_item(event, {})) + 500)

    def committed(self, events: list[JobEvent]) -> None:
        self.finish(self.claimed)


@dataclasses.dataclass
class _Snapshot:
    """One job's state for placing execution events, read consistently."""

    item: Item | None
    job: Job | None
    cursors: dict[c.OutputKey, int]
    seen: set[str]


class _Append(_Work):
    """The events of one job in one ``AppendEvents`` op, placed and stored chunk by chunk
    (each chunk one transaction's worth); results go to ``out`` at the events' slots."""

    def __init__(self, store: DynamoDBStore, job_id: str, entries: list[tuple[int, JobEvent]],
                 legacy: bool, out: list[tuple[Placed, JobEvent] | None]) -> None:  # fmt: skip
        super().__init__(store)
        self.job_id, self.entries, self.legacy, self.out = job_id, entries, legacy, out
        self.pos = 0  # entries before this are settled
        self.snap: _Snapshot | None = None
        self.chunk: tuple[int, list[tuple[int, Placed]], _Snapshot] | None = None

    def build(self, items: int, size: int) -> _Unit | None:
        while True:
            if self.snap is None:
                self.snap = self.store._snapshot(self.job_id, [ev for _, ev in
                                                               self.entries[self.pos :]])
            unit, end, placed, after = self._place(self.snap, items, size)
            if unit is not None:
                self.chunk = (end, placed, after)
                return unit
            # Nothing to store in this stretch: the placements hold as of the snapshot.
            for i, p in placed:
                self.out[self.entries[i][0]] = (p, self.entries[i][1])
            self.pos, self.snap = end, after
            if end == len(self.entries):
                self.finish(None)
                return None
            if not placed:
                return None  # the next event to store does not fit here

    def _place(
        self, snap: _Snapshot, items: int, size: int
    ) -> tuple[_Unit | None, int, list[tuple[int, Placed]], _Snapshot]:
        cursors, seen = dict(snap.cursors), set(snap.seen)
        changed: dict[c.OutputKey, int] = {}
        placed: list[tuple[int, Placed]] = []
        stored: list[JobEvent] = []
        cost, nbytes = 1, 300
        i = self.pos
        while i < len(self.entries):
            ev = self.entries[i][1]
            out = c.output_key(ev) if ev.kind is EventKind.OUTPUT else None
            had_end = cursors.get(out) if out is not None else None
            had_key = ev.dedup_key in seen
            p = c.place(snap.job, ev, cursors, seen, legacy=self.legacy)
            if p is Placed.STORED:
                more = 2 + bool(ev.dedup_key) + (out is not None and out not in changed)
                more_bytes = 2 * _size(_event_item(ev, {})) + 200
                if cost + more > items or nbytes + more_bytes > size:
                    if out is not None:  # undo this placement: it goes in the next chunk
                        if had_end is None:
                            cursors.pop(out, None)
                        else:
                            cursors[out] = had_end
                    if not had_key:
                        seen.discard(ev.dedup_key)
                    break
                cost, nbytes = cost + more, nbytes + more_bytes
                if out is not None:
                    changed[out] = cursors[out]
                stored.append(ev)
            placed.append((i, p))
            i += 1
        after = _Snapshot(snap.item, snap.job, cursors, seen)
        if not stored:
            return None, i, placed, after
        assert snap.item is not None
        s = self.store
        seq = _int(snap.item, "event_seq")
        numbered = [dataclasses.replace(ev, seq=seq + 1 + k) for k, ev in enumerate(stored)]
        e = _Expr()
        # event_seq covers status and retries (they write events); attempt can also
        # change without one (a patch without retry), so it is checked too.
        cond = (f"{_seq_condition(e, snap.item)} AND "
                f"{e.n('attempt')} = {e.raw(snap.item.get('attempt', _av(0)))}")  # fmt: skip
        actions: list[TxItem] = [{"Update": {
            "TableName": s.table, "Key": _job_key(self.job_id),
            "UpdateExpression": f"SET {e.n('event_seq')} = {e.v(seq + len(stored))}",
            "ConditionExpression": cond, **e.args()}}]  # fmt: skip
        actions += [s._put({**_dedup_key(self.job_id, ev.dedup_key), "seq": _av(ev.seq)},
                           "attribute_not_exists(pk)") for ev in numbered if ev.dedup_key]
        actions += [s._put(_cursor_item(self.job_id, k, end)) for k, end in changed.items()]
        item = {**snap.item, "event_seq": _av(seq + len(stored))}
        after.item = item
        return _Unit(actions, numbered, nbytes), i, placed, after

    def committed(self, events: list[JobEvent]) -> None:
        assert self.chunk is not None
        end, placed, after = self.chunk
        numbered = iter(events)
        for i, p in placed:
            slot, ev = self.entries[i]
            self.out[slot] = (p, next(numbered)) if p is Placed.STORED else (p, ev)
        self.pos, self.snap, self.chunk, self.unit = end, after, None, None
        if end == len(self.entries):
            self.finish(None)

    def failed(self) -> None:
        super().failed()
        self.snap = self.chunk = None


def _op_keys(op: WriteOp) -> set[tuple[str, ...]]:
    """What an op reads and writes: ops sharing one must not share a transaction."""
    if isinstance(op, CreateJob):
        keys: set[tuple[str, ...]] = {("job", op.job.job_id)}
        if op.job.request_id:
            keys.add(("req", op.job.tenant_id, op.job.request_id))
        return keys
    if isinstance(op, UpdateJob):
        return {("job", op.job_id)}
    return {("job", ev.job_id) for ev in op.events}


@dataclasses.dataclass(frozen=True)
class DynamoDBSettings:
    """``DB_PROVIDER=dynamodb``'s variables."""

    region: str
    table_prefix: str = "jennah"  # DYNAMODB_TABLE_PREFIX: the table is <prefix>-jobs
    endpoint_url: str = ""  # AWS_ENDPOINT_URL (moto, a VPC endpoint)

    @classmethod
    def from_env(cls, e: Env) -> DynamoDBSettings:
        e.require(("BATCH_REGION|AWS_REGION",), "DB_PROVIDER=dynamodb")
        return cls(e.region(), e.text("DYNAMODB_TABLE_PREFIX", "jennah"),
                   e.text("AWS_ENDPOINT_URL"))


class DynamoDBStore:
    """Jobs in one DynamoDB table; leases by conditional writes on the worker clock."""

    name = "dynamodb"
    settings_class = DynamoDBSettings

    def __init__(
        self,
        client: Any,
        table_prefix: str = "jennah",
        *,
        clock: Callable[[], datetime] = c.now_utc,
        skew_seconds: float = DEFAULT_SKEW_SECONDS,
    ) -> None:
        self._client = client
        self.table = f"{table_prefix}-jobs"
        self._clock = clock
        self.skew = timedelta(seconds=skew_seconds)
        # The last event_position seen per tenant: a guess for the next transaction (a
        # wrong one costs a retry, never a wrong position: the write is conditional).
        self._positions: dict[str, int] = {}
        self._tx_seconds = 0.01  # a moving average of transaction round trips

    @classmethod
    def from_settings(
        cls,
        settings: StoreSettings,
        *,
        session: Any = None,
        clock: Callable[[], datetime] = c.now_utc,
        skew_seconds: float = DEFAULT_SKEW_SECONDS,
    ) -> DynamoDBStore:
        """Build from settings; ``session`` (a ``boto3.Session``) carries credentials."""
        s = settings.read(DynamoDBSettings.from_env)  # before the SDK is imported
        import boto3
        from botocore.config import Config

        session = session or boto3.session.Session(region_name=s.region)
        config = Config(
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=2, read_timeout=10, max_pool_connections=64,
        )  # fmt: skip
        client = session.client(
            "dynamodb", endpoint_url=s.endpoint_url or None, region_name=s.region, config=config,
        )  # fmt: skip
        return cls(client, s.table_prefix, clock=clock, skew_seconds=skew_seconds)

    def _now(self) -> datetime:
        return c.utc(self._clock())

    # --- calls and error translation ---------------------------------------------------

    def _call(self, op: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

        for attempt in range(_CONFLICT_TRIES):
            try:
                return getattr(self._client, op)(**kwargs)
            except ClientError as exc:
                err = exc.response.get("Error", {})
                code = err.get("Code", "")
                if code == "ConditionalCheckFailedException":
                    raise _ConditionFailed() from None
                if code == "TransactionCanceledException":
                    reasons = exc.response.get("CancellationReasons") or []
                    raise _Cancelled([r.get("Code") or "None" for r in reasons],
                                     [r.get("Item") for r in reasons],
                                     [r.get("Message") or "" for r in reasons],
                                     ) from None  # fmt: skip
                if code == "TransactionConflictException" and attempt + 1 < _CONFLICT_TRIES:
                    _sleep(Backoff(_CONFLICT_BASE, _CONFLICT_CAP, _random).delay(attempt))
                    continue
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                message = f"dynamodb {op}: {code}: {err.get('Message', '')}"
                if code in _UNAVAILABLE or status >= 500:
                    raise StoreUnavailable(message) from exc
                if code == "ValidationException" and "size" in err.get("Message", ""):
                    raise InvalidArgument(f"too large for DynamoDB: {message}") from exc
                raise StoreError(message) from exc
            except (ConnectionError, HTTPClientError) as exc:
                raise StoreUnavailable(f"dynamodb {op}: {exc}") from exc
            except BotoCoreError as exc:
                raise StoreError(f"dynamodb {op}: {exc}") from exc
        raise StoreUnavailable(f"dynamodb {op}: transaction conflicts persisted")

    def _get(self, key: Item, projection: str | None = None) -> Item | None:
        kwargs: dict[str, Any] = {"TableName": self.table, "Key": key, "ConsistentRead": True}
        if projection is not None:
            kwargs["ProjectionExpression"] = projection
        item: Item | None = self._call("get_item", **kwargs).get("Item")
        return item

    def _pages(self, op: str, **kwargs: Any) -> Iterator[Item]:
        """Every item of a Query or Scan, following ``LastEvaluatedKey``."""
        kwargs["TableName"] = self.table
        while True:
            resp = self._call(op, **kwargs)
            yield from resp.get("Items", [])
            if "LastEvaluatedKey" not in resp:
                return
            kwargs["ExclusiveStartKey"] = resp["LastEvaluatedKey"]

    def _query(self, **kwargs: Any) -> Iterator[Item]:
        return self._pages("query", **kwargs)

    def _partition(self, pk: str, prefix: str, **kwargs: Any) -> Iterator[Item]:
        """The items of partition ``pk`` whose sort key starts with ``prefix``, in order."""
        return self._query(
            KeyConditionExpression="pk = :pk AND begins_with(sk, :pre)", ConsistentRead=True,
            ExpressionAttributeValues={":pk": {"S": pk}, ":pre": {"S": prefix}}, **kwargs)

    def _put(self, item: Item, cond: str | None = None) -> TxItem:
        put: dict[str, Any] = {"TableName": self.table, "Item": item}
        if cond is not None:
            put["ConditionExpression"] = cond
        return {"Put": put}

    def _job(self, job_id: str) -> Job | None:
        item = self._get(_job_key(job_id))
        return _job_from_item(item) if item else None

    def _tenant_job(self, tenant_id: str, job_id: str) -> Job:
        job = self._job(job_id)
        if job is None or job.tenant_id != tenant_id:
            raise NotFound.job(job_id)
        return job

    def _batch_delete(self, keys: Sequence[Item]) -> None:
        for i in range(0, len(keys), 25):
            pending = {self.table: [{"DeleteRequest": {"Key": k}} for k in keys[i : i + 25]]}
            while pending:
                resp = self._call("batch_write_item", RequestItems=pending)
                pending = resp.get("UnprocessedItems") or {}

    # --- schema ------------------------------------------------------------------------

    def migrate(self) -> list[str]:
        """Create the table (with every index), or bring an existing one to v2: add the
        missing indexes, renumber v1 events, mark active jobs for ``active_by_tenant``.
        Returns the table and the indexes this call created."""
        try:
            self._call(
                "create_table", TableName=self.table, BillingMode="PAY_PER_REQUEST",
                KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                           {"AttributeName": "sk", "KeyType": "RANGE"}],
                AttributeDefinitions=[{"AttributeName": k, "AttributeType": t}
                                      for k, t in ATTRIBUTE_TYPES.items()],
                GlobalSecondaryIndexes=INDEXES,
            )  # fmt: skip
            created = True
        except StoreError as exc:
            if "ResourceInUseException" not in str(exc):
                raise
            created = False
        waiter = self._client.get_waiter("table_exists")
        waiter.wait(TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": 120})
        if created:
            self._mark_v2()
            return [f"dynamodb:{self.table}"]
        if self._get(_MARKER_KEY) is not None:
            return []
        applied = self._add_indexes()
        self._upgrade_v1()
        self._backfill_active_tenant()
        self._mark_v2()
        return applied

    def _mark_v2(self) -> None:
        item = {**_MARKER_KEY, "applied_at": _av(self._now())}
        self._call("put_item", TableName=self.table, Item=item)

    def _describe(self) -> dict[str, Any]:
        table: dict[str, Any] = self._call("describe_table", TableName=self.table)["Table"]
        return table

    def _add_indexes(self) -> list[str]:
        """Create the indexes an existing table lacks (one at a time, as DynamoDB
        requires), waiting for each to be backfilled."""
        added: list[str] = []
        for index in INDEXES:
            table = self._describe()
            if index["IndexName"] in {g["IndexName"] for g in
                                      table.get("GlobalSecondaryIndexes", [])}:  # fmt: skip
                continue
            types = {d["AttributeName"]: d["AttributeType"] for d in table["AttributeDefinitions"]}
            types.update({k["AttributeName"]: ATTRIBUTE_TYPES[k["AttributeName"]]
                          for k in index["KeySchema"]})  # fmt: skip
            try:
                self._call("update_table", TableName=self.table,
                           AttributeDefinitions=[{"AttributeName": k, "AttributeType": t}
                                                 for k, t in types.items()],
                           GlobalSecondaryIndexUpdates=[{"Create": index}])  # fmt: skip
                added.append(f"dynamodb:{self.table}:{index['IndexName']}")
            except StoreError:
                indexes = self._describe().get("GlobalSecondaryIndexes", [])
                if index["IndexName"] not in {g["IndexName"] for g in indexes}:
                    raise
                # another process is adding it
            self._wait_for_indexes()
        return added

    def _wait_for_indexes(self) -> None:
        deadline = time.monotonic() + _INDEX_WAIT
        while True:
            table = self._describe()
            if table.get("TableStatus") == "ACTIVE" and all(
                g.get("IndexStatus", "ACTIVE") == "ACTIVE"
                for g in table.get("GlobalSecondaryIndexes", [])
            ):
                return
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"dynamodb: indexes of {self.table} are not active")
            _sleep(_INDEX_POLL)

    def _backfill_active_tenant(self) -> None:
        """Give every active job written by v1 its ``active_tenant`` (a consistent scan:
        the ``active`` index could lag)."""
        f = _Expr()
        filt = (f"sk = {f.v('JOB')} AND attribute_exists({f.n('active_shard')}) AND "
                f"attribute_not_exists({f.n('active_tenant')})")  # fmt: skip
        for it in list(self._pages("scan", FilterExpression=filt, ConsistentRead=True,
                                   ProjectionExpression=f"pk, {f.n('job_id')}, "
                                                        f"{f.n('tenant_id')}",
                                   **f.args())):  # fmt: skip
            e = _Expr()
            with contextlib.suppress(_ConditionFailed):  # finished meanwhile, or marked
                self._call(
                    "update_item", TableName=self.table, Key=_job_key(it["job_id"]["S"]),
                    UpdateExpression=f"SET {e.n('active_tenant')} = {e.raw(it['tenant_id'])}",
                    ConditionExpression=f"attribute_exists({e.n('active_shard')}) AND "
                                        f"attribute_not_exists({e.n('active_tenant')})",
                    **e.args())  # fmt: skip

    def _upgrade_v1(self) -> int:
        """Number the events a v1 store left (no position); see the module docstring.
        One process at a time (``_upgrade_lock``); returns how many events this call
        numbered."""
        token = self._upgrade_lock()
        if token is None:
            return 0  # another process finished the upgrade
        try:
            e = _Expr()
            filt = f"begins_with(sk, {e.v('EV#')}) AND attribute_not_exists({e.n('position')})"
            by_tenant: dict[str, list[JobEvent]] = defaultdict(list)
            for it in self._pages("scan", FilterExpression=filt, ConsistentRead=True,
                                  **e.args()):  # fmt: skip
                ev = _event_from_item(it)
                by_tenant[ev.tenant_id].append(ev)
            return sum(self._upgrade_tenant(by_tenant[t], token) for t in sorted(by_tenant))
        finally:
            e = _Expr()
            with contextlib.suppress(_ConditionFailed):
                self._call("delete_item", TableName=self.table, Key=_LOCK_KEY,
                           ConditionExpression=f"{e.n('token')} = {e.v(token)}",
                           **e.args())  # fmt: skip

    def _upgrade_lock(self) -> str | None:
        """Take the upgrade lock (an item with a token and an expiry, renewed by every
        transaction of the upgrade, which is conditional on the token: a holder that
        stalled past the expiry and lost it cannot write). Waits while another process
        holds it; None once the upgrade is marked done."""
        token = uuid.uuid4().hex
        while self._get(_MARKER_KEY) is None:
            now = self._now()
            e = _Expr()
            item = {**_LOCK_KEY, "token": _av(token),
                    "expires_at": _av(now + timedelta(seconds=_LOCK_TTL))}  # fmt: skip
            try:
                self._call("put_item", TableName=self.table, Item=item,
                           ConditionExpression=f"attribute_not_exists(pk) OR "
                                               f"{e.n('expires_at')} < {e.v(now)}",
                           **e.args())  # fmt: skip
                return token
            except _ConditionFailed:
                _sleep(_LOCK_POLL)
        return None

    def _upgrade_tenant(self, pending: list[JobEvent], token: str) -> int:
        by_job: dict[str, list[JobEvent]] = defaultdict(list)
        for ev in pending:
            by_job[ev.job_id].append(ev)
        queues: dict[str, list[tuple[int, JobEvent]]] = {}  # job -> (old seq, new event)
        finals: dict[str, tuple[int, dict[c.OutputKey, int], bool]] = {}
        for job_id, old in by_job.items():
            # Events of this job that an upgrade cut short already moved.
            done = [ev for ev in (_event_from_item(it) for it in self._partition(
                f"JOB#{job_id}", "EV#")) if ev.position]  # fmt: skip
            if any(not ev.dedup_key.startswith("v1:") for ev in done):
                raise StoreError(f"job {job_id} has both v1 events and events written by v2")
            whole = [dataclasses.replace(ev, seq=int(ev.dedup_key[3:])) for ev in done] + old
            new, cursors = c.renumber_v1(whole)
            todo = {ev.seq for ev in old}
            queues[job_id] = [(o.seq, n) for o, n in zip(sorted(whole, key=lambda x: x.seq),
                                                         new, strict=True) if o.seq in todo]
            exists = self._get(_job_key(job_id), projection="pk") is not None
            finals[job_id] = (len(new), cursors, exists)
        # v1's tenant order (time, job, seq) decides whose turn it is; each job's events
        # are taken in seq order, so a key is always vacated before it is reused.
        order = [ev.job_id for ev in sorted(pending, key=lambda x: (x.created_at, x.job_id,
                                                                     x.seq))]  # fmt: skip
        taken: dict[str, int] = defaultdict(int)
        sequence: list[tuple[str, int, JobEvent]] = []
        for job_id in order:
            old_seq, new_ev = queues[job_id][taken[job_id]]
            taken[job_id] += 1
            sequence.append((job_id, old_seq, new_ev))
        count = 0
        while sequence:
            unit, used = self._v1_unit(sequence, finals, token)
            if not self._commit_alone(unit):
                raise StoreUnavailable("dynamodb: a write of the v1 upgrade failed its "
                                       "condition (lost the lock?); migrate again")
            count += used
            sequence = sequence[used:]
        return count

    def _v1_unit(
        self,
        sequence: list[tuple[str, int, JobEvent]],
        finals: dict[str, tuple[int, dict[c.OutputKey, int], bool]],
        token: str,
    ) -> tuple[_Unit, int]:
        """The next transaction of the upgrade: as many events of ``sequence`` as fit,
        each moved to its new key (its old one deleted unless reused in the same
        transaction), with its tenant copy and dedup key; with a job's last event, its
        ``event_seq`` and output cursors; and the renewal of the upgrade lock."""
        left = Counter(job_id for job_id, _, _ in sequence)  # events still to move, per job
        events: list[JobEvent] = []
        moved: list[int] = []
        e = _Expr()
        actions: list[TxItem] = [{"Update": {
            "TableName": self.table, "Key": _LOCK_KEY,
            "UpdateExpression": f"SET {e.n('expires_at')} = "
                                f"{e.v(self._now() + timedelta(seconds=_LOCK_TTL))}",
            "ConditionExpression": f"{e.n('token')} = {e.v(token)}", **e.args()}}]  # fmt: skip
        cost = 2  # the lock and the tenant counter
        used = 0
        for job_id, old_seq, new_ev in sequence:
            n, cursors, exists = finals[job_id]
            last = left[job_id] == 1
            more = 4 + ((exists + len(cursors)) if last else 0)
            if used and cost + more > _TX_MAX:
                break
            cost += more
            used += 1
            left[job_id] -= 1
            events.append(new_ev)
            moved.append(old_seq)
            actions.append(self._put({**_dedup_key(job_id, new_ev.dedup_key),
                                      "seq": _av(new_ev.seq)}, "attribute_not_exists(pk)"))
            if last:
                if exists:
                    e = _Expr()
                    actions.append({"Update": {
                        "TableName": self.table, "Key": _job_key(job_id),
                        "UpdateExpression": f"SET {e.n('event_seq')} = {e.v(n)}",
                        "ConditionExpression": "attribute_exists(pk)", **e.args()}})
                actions += [self._put(_cursor_item(job_id, k, end)) for k, end in cursors.items()]
        new_keys = {(ev.job_id, ev.seq) for ev in events}
        for ev, old_seq in zip(events, moved, strict=True):
            if old_seq != ev.seq and (ev.job_id, old_seq) not in new_keys:
                e = _Expr()
                actions.append({"Delete": {
                    "TableName": self.table, "Key": _event_key(ev.job_id, old_seq),
                    "ConditionExpression": f"attribute_exists(pk) AND "
                                           f"attribute_not_exists({e.n('position')})",
                    **e.args()}})  # fmt: skip
        size = sum(2 * _size(_event_item(ev, {})) + 300 for ev in events)
        return _Unit(actions, events, size, v1=True), used

    def ping(self) -> None:
        self._get({"pk": {"S": "PING"}, "sk": {"S": "PING"}})

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            close()

    # --- transactions ----------------------------------------------------------------

    def _position(self, tenant_id: str) -> int:
        if tenant_id not in self._positions:
            item = self._get(_counter_key(tenant_id))
            self._positions[tenant_id] = _int(item or {}, "event_position")
        return self._positions[tenant_id]

    def _commit(self, units: Sequence[_Unit], race: _Race) -> _Outcome:
        """Try one ``TransactWriteItems`` of ``units``, their events (positions from the
        tenant counters) and the counters (see ``_Race`` for reservations)."""
        tx: list[TxItem] = []
        owner: list[int | str] = []  # per action: its unit, or the tenant of a counter
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        numbered: list[list[JobEvent]] = []
        for ui, unit in enumerate(units):
            tx += unit.items
            owner += [ui] * len(unit.items)
            out: list[JobEvent] = []
            for ev in unit.events:
                t = ev.tenant_id
                if t not in last:
                    first[t] = last[t] = self._position(t)
                last[t] += 1
                ev = dataclasses.replace(ev, position=last[t])
                out.append(ev)
                e = _Expr()
                cond = (f"attribute_not_exists({e.n('position')})" if unit.v1
                        else "attribute_not_exists(pk)")  # fmt: skip
                tx.append({"Put": {"TableName": self.table,
                                   "Item": _event_item(ev, _event_key(ev.job_id, ev.seq)),
                                   "ConditionExpression": cond, **e.args()}})  # fmt: skip
                tx.append(self._put(_event_item(ev, _tenant_event_key(t, last[t])),
                                    "attribute_not_exists(pk)"))  # fmt: skip
                owner += [ui, t]  # a tenant copy that exists means the counter was behind
            numbered.append(out)
        now = self._now()
        for t in first:
            e = _Expr()
            ep = e.n("event_position")
            cond = (f"(attribute_not_exists({ep}) OR {ep} = {e.v(0)})" if first[t] == 0
                    else f"{ep} = {e.v(first[t])}")  # fmt: skip
            cond += f" AND {_unreserved(e, race.ticket, now)}"
            tx.append({"Update": {
                "TableName": self.table, "Key": _counter_key(t),
                "UpdateExpression": f"SET {ep} = {e.v(last[t])}, {e.n('tenant_id')} = {e.v(t)}, "
                                    f"{e.n('created_at')} = if_not_exists({e.n('created_at')}, "
                                    f"{e.v(now)}) REMOVE {e.n('reserved_by')}, "
                                    f"{e.n('reserved_until')}",
                "ConditionExpression": cond, "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                **e.args()}})  # fmt: skip
            owner.append(t)
        if not tx:
            return _Outcome(numbered)
        start = time.monotonic()
        try:
            self._call("transact_write_items", TransactItems=tx)
        except _Cancelled as exc:
            return self._cancelled(exc, owner, race.ticket)
        finally:
            self._tx_seconds += (time.monotonic() - start - self._tx_seconds) / 8
        for t, p in last.items():
            self._positions[t] = p
        race.reserved -= set(last)
        return _Outcome(numbered)

    def _cancelled(self, exc: _Cancelled, owner: list[int | str], ticket: str) -> _Outcome:
        codes: dict[int, list[str]] = defaultdict(list)
        outcome = _Outcome(None)
        now = c.to_micros(self._now())
        for i, who in enumerate(owner):
            code = exc.codes[i] if i < len(exc.codes) else "None"
            if isinstance(who, int):
                codes[who].append(code)
            if code in ("None", ""):
                continue
            if code == "TransactionConflict":
                continue  # a concurrent transaction on one of the items: try again
            if code in _UNAVAILABLE_REASONS:
                raise StoreUnavailable(f"dynamodb transact_write_items: {code}")
            if code != _FAILED:
                message = exc.messages[i] if i < len(exc.messages) else ""
                if code == "ValidationError" and "size" in message:
                    raise InvalidArgument(f"too large for DynamoDB: {message}")
                raise StoreError(f"dynamodb transact_write_items: {code}: {message}")
            if isinstance(who, int):
                outcome.failed[who] = codes[who]
                continue
            # A counter (or a tenant copy) showed that the counter moved: learn its value.
            outcome.counters.add(who)
            item = exc.items[i] if i < len(exc.items) else None
            if item is None or "event_position" not in item:
                self._positions.pop(who, None)  # read it again
                continue
            self._positions[who] = _int(item, "event_position")
            holder = item.get("reserved_by", {}).get("S", ticket)
            if holder != ticket and _int(item, "reserved_until") >= now:
                outcome.blocked = True
        for ui in outcome.failed:
            outcome.failed[ui] = codes[ui]
        return outcome

    def _lost(self, race: _Race, outcome: _Outcome) -> None:
        """After a transaction that committed nothing: wait, or reserve the counters,
        before the next try. StoreUnavailable once losing for too long."""
        now = time.monotonic()
        if race.losses == 0:
            race.since = now
        race.losses += 1
        if now - race.since > _CONTENDED_SECONDS and race.losses > _CONTENDED_LOSSES:
            raise StoreUnavailable("dynamodb: concurrent writes kept conflicting")
        step = max(self._tx_seconds, 0.001)
        if outcome.failed or not outcome.counters:
            # A job changed under us (or a transaction conflict): back off, read again,
            # and let the others have the counters meanwhile.
            race.counter_losses = 0
            self._release(race)
            # Full jitter under step * 2**losses, at most _BACKOFF_MAX (a step above that
            # is a base of _BACKOFF_MAX: every ceiling is the cap then, as before).
            _sleep(Backoff(min(step, _BACKOFF_MAX), _BACKOFF_MAX, _random).delay(race.losses))
            return
        race.counter_losses += 1
        n = race.counter_losses
        if outcome.blocked or (n >= _RESERVE_AFTER and not self._reserve(outcome.counters,
                                                                           race)):  # fmt: skip
            self._await_unreserved(outcome.counters, race)
        elif n > 1:
            # The new value is known, but so it is to every other loser: spread them out.
            _sleep(Backoff(step, 4 * step, _random).delay(n - 2))
        # else: the first time, go again at once

    def _await_unreserved(self, tenants: set[str], race: _Race) -> None:
        """Wait until no other writer holds a reservation on the counters of
        ``tenants`` (reading them is cheaper than transactions bound to fail), and learn
        their values."""
        step = max(self._tx_seconds, 0.001)
        for t in sorted(tenants):
            while True:
                # Not a backoff: a poll every 0.5 to 1 round trips, jittered.
                _sleep((0.5 + 0.5 * _random()) * step)
                item = self._get(_counter_key(t)) or {}
                self._positions[t] = _int(item, "event_position")
                holder = item.get("reserved_by", {}).get("S", race.ticket)
                if holder == race.ticket or _int(item, "reserved_until") < c.to_micros(
                        self._now()):  # fmt: skip
                    break
                if time.monotonic() - race.since > 2 * _CONTENDED_SECONDS:
                    raise StoreUnavailable("dynamodb: concurrent writes kept conflicting")

    def _reserve(self, tenants: set[str], race: _Race) -> bool:
        """Reserve the counters of ``tenants`` for ``race`` (and learn their values);
        False if another writer holds one."""
        hold = max(_RESERVE_SECONDS, 5 * self._tx_seconds)  # time enough to commit
        for t in sorted(tenants):
            now = self._now()
            e = _Expr()
            try:
                resp = self._call(
                    "update_item", TableName=self.table, Key=_counter_key(t),
                    UpdateExpression=f"SET {e.n('reserved_by')} = {e.v(race.ticket)}, "
                                     f"{e.n('reserved_until')} = "
                                     f"{e.v(now + timedelta(seconds=hold))}",
                    ConditionExpression=_unreserved(e, race.ticket, now),
                    ReturnValues="ALL_NEW", **e.args())  # fmt: skip
            except _ConditionFailed:
                return False
            race.reserved.add(t)
            self._positions[t] = _int(resp["Attributes"], "event_position")
        return True

    def _release(self, race: _Race) -> None:
        """Drop the reservations ``race`` still holds (its writes failed or finished
        without them); best effort: they expire anyway."""
        for t in sorted(race.reserved):
            e = _Expr()
            with contextlib.suppress(StoreError, _ConditionFailed):
                self._call("update_item", TableName=self.table, Key=_counter_key(t),
                           UpdateExpression=f"REMOVE {e.n('reserved_by')}, "
                                            f"{e.n('reserved_until')}",
                           ConditionExpression=f"{e.n('reserved_by')} = {e.v(race.ticket)}",
                           **e.args())  # fmt: skip
        race.reserved.clear()

    def _commit_alone(self, unit: _Unit) -> bool:
        """Commit one unit, retrying while only a counter moved; False if its own
        conditions failed."""
        race = _Race()
        try:
            while True:
                outcome = self._commit([unit], race)
                if outcome.numbered is not None:
                    return True
                if outcome.failed:
                    return False
                self._lost(race, outcome)
        finally:
            self._release(race)

    def _run(self, works: Sequence[_Work]) -> None:
        """Commit every work, packing as many as fit into each transaction, in order."""
        race = _Race()
        try:
            self._run_race(works, race)
        finally:
            self._release(race)

    def _run_race(self, works: Sequence[_Work], race: _Race) -> None:
        solo = False
        while True:
            active = [w for w in works if not w.done]
            if not active:
                return
            units: list[_Unit] = []
            owners: list[_Work] = []
            items, size = _TX_MAX, _TX_BYTES
            tenants: set[str] = set()
            for w in active:
                # Room for one more tenant counter: a unit is one job's, so one tenant's.
                unit = w.plan(items - 1, size)
                if unit is None:
                    if w.done:
                        continue
                    if not units:
                        raise StoreError("dynamodb: a write does not fit in one transaction")
                    break  # it waits for the next transaction (keeping op order)
                units.append(unit)
                owners.append(w)
                new = {ev.tenant_id for ev in unit.events} - tenants
                items, size = items - unit.cost - len(new), size - unit.size
                tenants |= new
                if solo or items <= 2:
                    break
            if not units:
                continue  # every work left finished while planning
            try:
                outcome = self._commit(units, race)
            except StoreUnavailable:
                raise
            except JennahError as exc:  # the service refused an item (too large ...)
                if len(units) > 1:
                    solo = True  # find it: one op per transaction from now on
                else:
                    owners[0].finish(exc)
                continue
            if outcome.numbered is not None:
                for w, events in zip(owners, outcome.numbered, strict=True):
                    w.committed(events)
                race.losses = race.counter_losses = 0
                continue
            for i, codes in outcome.failed.items():
                owners[i].conflicted(codes)
            self._lost(race, outcome)

    # --- tenant-facing -----------------------------------------------------------------

    def write_batch(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        results: list[WriteResult] = [None] * len(ops)
        group: list[tuple[int, list[_Work], list[tuple[Placed, JobEvent] | None]]] = []
        keys: set[tuple[str, ...]] = set()

        def flush() -> None:
            self._run([w for _, works, _ in group for w in works])
            for i, works, out in group:
                if isinstance(ops[i], AppendEvents):
                    errors = [w.result for w in works if isinstance(w.result, JennahError)]
                    results[i] = errors[0] if errors else [o for o in out if o is not None]
                else:
                    results[i] = works[0].result
            group.clear()
            keys.clear()

        for i, op in enumerate(ops):
            op_keys = _op_keys(op)
            if op_keys & keys:
                flush()  # it depends on an op not committed yet
            keys.update(op_keys)
            out: list[tuple[Placed, JobEvent] | None] = []
            works: list[_Work]
            if isinstance(op, CreateJob):
                works = [_Create(self, op.job, op.lease_ttl)]
            elif isinstance(op, UpdateJob):
                works = [_Update(self, op)]
            else:
                out = [None] * len(op.events)
                by_job: dict[str, list[tuple[int, JobEvent]]] = defaultdict(list)
                for k, ev in enumerate(op.events):
                    by_job[ev.job_id].append((k, ev))
                works = [_Append(self, job_id, by_job[job_id], op.legacy, out)
                         for job_id in sorted(by_job)]  # fmt: skip
            group.append((i, works, out))
        flush()
        return results

    def create_job(self, job: Job, lease_ttl: float) -> tuple[Job, bool]:
        return cast(tuple[Job, bool], unwrap(self.write_batch([CreateJob(job, lease_ttl)])[0]))

    def _by_guard(self, guard: Item) -> Job | None:
        item = self._get(guard)
        return self._job(item["job_id"]["S"]) if item else None

    def get_job(self, tenant_id: str, job_id: str) -> Job:
        return self._tenant_job(tenant_id, job_id)

    def list_jobs(self, tenant_id: str, flt: JobFilter, page_size: int, page_token: str) -> Page:
        e = _Expr()
        key = f"{e.n('tenant_id')} = {e.v(tenant_id)}"
        if page_token:
            created_at, after_id = c.decode_page_token(page_token)
            key += f" AND {e.n('created_key')} < {e.v(_created_key(created_at, after_id))}"
        conds = []
        if flt.status is not None:
            conds.append(f"{e.n('status')} = {e.v(flt.status.value)}")
        if flt.name_prefix:
            conds.append(f"begins_with({e.n('job_name')}, {e.v(flt.name_prefix)})")
        for k, v in sorted(flt.labels.items()):
            conds.append(f"{e.n('labels')}.{e.n(k)} = {e.v(v)}")
        kwargs: dict[str, Any] = {"IndexName": "by_tenant", "KeyConditionExpression": key,
                                  "ScanIndexForward": False, **e.args()}  # fmt: skip
        if conds:
            kwargs["FilterExpression"] = " AND ".join(conds)
        # Filters apply after Limit, so keep reading until the page (plus one) is full.
        kwargs["Limit"] = max(page_size + 1, 100) if conds else page_size + 1
        jobs: list[Job] = []
        for item in self._query(**kwargs):
            jobs.append(_job_from_item(item))
            if len(jobs) > page_size:
                break
        page = jobs[:page_size]
        return Page(page, c.page_token_after(page) if len(jobs) > page_size else "")

    def request_cancel(self, tenant_id: str, job_id: str) -> Job:
        e = _Expr()
        try:
            resp = self._call(
                "update_item", TableName=self.table, Key=_job_key(job_id),
                UpdateExpression=f"SET {e.n('cancel_requested')} = {e.v(True)}, "
                                 f"{e.n('updated_at')} = {e.v(self._now())}",
                ConditionExpression=f"{e.n('tenant_id')} = {e.v(tenant_id)}",
                ReturnValues="ALL_NEW", **e.args(),
            )  # fmt: skip
        except _ConditionFailed:
            raise NotFound.job(job_id) from None
        return _job_from_item(resp["Attributes"])

    def delete_job(self, tenant_id: str, job_id: str) -> None:
        job = self._job(job_id)
        if job is None:
            self._sweep(tenant_id, job_id)  # what a delete cut short may have left
            raise NotFound.job(job_id)
        if job.tenant_id != tenant_id:
            raise NotFound.job(job_id)
        e = _Expr()
        ops: list[dict[str, Any]] = [{"Delete": {
            "TableName": self.table, "Key": _job_key(job_id),
            "ConditionExpression": f"{e.n('tenant_id')} = {e.v(tenant_id)}", **e.args()}}]
        if job.request_id:
            ops.append({"Delete": {"TableName": self.table,
                                   "Key": _guard_key(tenant_id, job.request_id)}})
        try:
            self._call("transact_write_items", TransactItems=ops)
        except _Cancelled:
            raise NotFound.job(job_id) from None
        # The job item is gone, so no write of the job can commit any more (they are all
        # conditional on it); now sweep its item collection and its tenant copies.
        self._sweep(tenant_id, job_id)

    def _sweep(self, tenant_id: str, job_id: str) -> None:
        self._delete_notification(tenant_id, c.notification_id(job_id))
        e = _Expr()
        items = list(self._query(
            KeyConditionExpression="pk = :pk", ConsistentRead=True,
            ExpressionAttributeValues={":pk": {"S": f"JOB#{job_id}"}},
            ProjectionExpression=f"pk, sk, {e.n('tenant_id')}, {e.n('position')}",
            ExpressionAttributeNames=e.names))  # fmt: skip
        if any(it.get("tenant_id", {}).get("S", tenant_id) != tenant_id for it in items):
            return  # not this tenant's
        copies = [_tenant_event_key(tenant_id, _int(it, "position")) for it in items
                  if it["sk"]["S"].startswith("EV#") and _int(it, "position")]  # fmt: skip
        # The copies first: the events name them, so a sweep cut short can be finished.
        self._batch_delete(copies)
        self._batch_delete([{"pk": it["pk"], "sk": it["sk"]} for it in items])

    def _delete_notification(self, tenant_id: str, notification_id: str) -> None:
        """Remove the notification and its copy, then its id item (which names them, so
        that a delete cut short can be finished)."""
        ref = self._get(_note_key("ID", tenant_id, notification_id))
        if ref is None:
            return
        suffix = ref["note_key"]["S"]
        self._batch_delete([_note_key("N", tenant_id, suffix), _note_key("U", tenant_id, suffix)])
        self._batch_delete([_note_key("ID", tenant_id, notification_id)])

    def list_transitions(self, tenant_id: str, job_id: str) -> list[Transition]:
        self._tenant_job(tenant_id, job_id)
        items = self._partition(f"JOB#{job_id}", "TR#")
        return [c.transition_from_row(_row(it, c.TRANSITION_COLUMNS)) for it in items]

    def list_events(
        self, tenant_id: str, job_id: str, after_seq: int, limit: int
    ) -> list[JobEvent]:
        if limit <= 0:
            return []
        items = self._query(
            KeyConditionExpression="pk = :pk AND sk BETWEEN :lo AND :hi", ConsistentRead=True,
            Limit=limit, ExpressionAttributeValues={
                ":pk": {"S": f"JOB#{job_id}"}, ":lo": {"S": f"EV#{max(after_seq + 1, 0):020d}"},
                ":hi": {"S": "EV#" + "9" * 20}})  # fmt: skip
        events: list[JobEvent] = []
        for item in items:
            ev = _event_from_item(item)
            if ev.tenant_id != tenant_id:
                return []  # every event of a job is its tenant's: a foreign job
            events.append(ev)
            if len(events) >= limit:
                break
        return events

    def list_tenant_events(
        self, tenant_id: str, after_position: int, limit: int
    ) -> list[JobEvent]:
        if limit <= 0:
            return []
        after = {"S": f"{max(after_position, 0):020d}"}
        items = self._query(
            KeyConditionExpression="pk = :pk AND sk > :after", ConsistentRead=True, Limit=limit,
            ExpressionAttributeValues={":pk": {"S": f"TEV#{tenant_id}"}, ":after": after})
        events: list[JobEvent] = []
        for item in items:
            events.append(_event_from_item(item))
            if len(events) >= limit:
                break
        return events

    def has_active_jobs(self, tenant_id: str) -> bool:
        resp = self._call("query", TableName=self.table, IndexName="active_by_tenant", Limit=1,
                          KeyConditionExpression="active_tenant = :t",
                          ExpressionAttributeValues={":t": {"S": tenant_id}})  # fmt: skip
        return bool(resp.get("Items"))

    def output_offsets(self, job_id: str) -> OutputOffsets:
        return {(_int(it, "attempt"), _int(it, "task_index"), it["stream"]["S"]):
                _int(it, "delivered_end") for it in self._partition(f"JOB#{job_id}", "OUT#")}

    def list_notifications(
        self, tenant_id: str, limit: int, unread_only: bool
    ) -> tuple[list[Notification], int]:
        notes: list[Notification] = []
        if limit > 0:
            for item in self._query(
                KeyConditionExpression="pk = :pk AND begins_with(sk, :pre)",
                ConsistentRead=True, ScanIndexForward=False, Limit=limit,
                ExpressionAttributeValues={":pk": {"S": f"NOTE#{tenant_id}"},
                                           ":pre": {"S": "U#" if unread_only else "N#"}},
            ):  # fmt: skip
                notes.append(c.notification_from_row(_row(item, c.NOTIFICATION_COLUMNS)))
                if len(notes) >= limit:
                    break
        unread = 0
        kwargs: dict[str, Any] = {
            "TableName": self.table, "Select": "COUNT", "ConsistentRead": True,
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :pre)",
            "ExpressionAttributeValues": {":pk": {"S": f"NOTE#{tenant_id}"},
                                          ":pre": {"S": "U#"}}}  # fmt: skip
        while True:
            resp = self._call("query", **kwargs)
            unread += int(resp.get("Count", 0))
            if "LastEvaluatedKey" not in resp:
                return notes, unread
            kwargs["ExclusiveStartKey"] = resp["LastEvaluatedKey"]

    def ack_notification(self, tenant_id: str, notification_id: str) -> None:
        """Set ``is_read`` and drop the unread copy, in one transaction conditional on the
        notification still being there (a delete of its job may be sweeping it)."""
        ref = None
        if len(notification_id) <= _MAX_NOTIFICATION_ID:
            ref = self._get(_note_key("ID", tenant_id, notification_id))
        if ref is None:
            raise c.notification_not_found(notification_id)
        suffix = ref["note_key"]["S"]
        e = _Expr()
        try:
            self._call("transact_write_items", TransactItems=[
                {"Update": {"TableName": self.table, "Key": _note_key("N", tenant_id, suffix),
                            "UpdateExpression": f"SET {e.n('is_read')} = {e.v(True)}",
                            "ConditionExpression": "attribute_exists(pk)", **e.args()}},
                {"Delete": {"TableName": self.table, "Key": _note_key("U", tenant_id, suffix)}},
            ])  # fmt: skip
        except _Cancelled:
            raise c.notification_not_found(notification_id) from None

    def append_execution_events(
        self, events: Sequence[JobEvent], legacy: bool = False
    ) -> list[tuple[Placed, JobEvent]]:
        result = unwrap(self.write_batch([AppendEvents(tuple(events), legacy)])[0])
        return cast(list[tuple[Placed, JobEvent]], result)

    def _snapshot(self, job_id: str, events: Sequence[JobEvent]) -> _Snapshot:
        """The job item, the cursors of the events' output streams and which of their
        dedup keys the job has, as of one moment (see the module docstring)."""
        outs = sorted({c.output_key(ev) for ev in events if ev.kind is EventKind.OUTPUT})
        dedup = sorted({ev.dedup_key for ev in events if ev.dedup_key})
        wanted: list[tuple[str, Any]] = [("out", o) for o in outs] + [("key", k) for k in dedup]
        race = _Race()
        while True:
            job_items: list[Item | None] = []
            found: list[tuple[tuple[str, Any], Item]] = []
            step = _GET_MAX - 1
            for i in range(0, max(len(wanted), 1), step):
                part = wanted[i : i + step]
                keys = [_job_key(job_id)] + [
                    _cursor_key(job_id, v) if kind == "out" else _dedup_key(job_id, v)
                    for kind, v in part]  # fmt: skip
                try:
                    resp = self._call("transact_get_items", TransactItems=[
                        {"Get": {"TableName": self.table, "Key": k}} for k in keys])
                except _Cancelled:  # a transaction was writing these items
                    break
                got = [r.get("Item") for r in resp.get("Responses", [])]
                job_items.append(got[0])
                if got[0] is None:
                    return _Snapshot(None, None, {}, set())
                found += [(w, it) for w, it in zip(part, got[1:], strict=True) if it]
            else:
                states = {(_int(it or {}, "event_seq"), _int(it or {}, "attempt"))
                          for it in job_items}  # fmt: skip
                if len(states) == 1:
                    item = job_items[0]
                    assert item is not None
                    cursors = {cast(c.OutputKey, v): _int(it, "delivered_end")
                               for (kind, v), it in found if kind == "out"}  # fmt: skip
                    seen = {cast(str, v) for (kind, v), _ in found if kind == "key"}
                    return _Snapshot(item, _job_from_item(item), cursors, seen)
            self._lost(race, _Outcome(None))

    # --- owner-facing, fenced ----------------------------------------------------------

    def update_job(self, job_id: str, lease: Lease, patch: JobPatch, reason: str = "") -> Job:
        op = UpdateJob(job_id, lease, patch, reason)
        return cast(Job, unwrap(self.write_batch([op])[0]))

    @staticmethod
    def _diff(e: _Expr, old: Job, new: Job, new_item: Item, extra: Mapping[str, Any]) -> str:
        """The UpdateExpression turning ``old`` into ``new`` (whose item is ``new_item``),
        plus ``extra`` SETs. Fields are compared on the jobs, not on their items: that
        spares encoding the old job's task states on every update."""
        sets = [f"{e.n(k)} = {e.v(v)}" for k, v in extra.items()]
        removes: list[str] = []
        for col in c.JOB_COLUMNS:
            if getattr(new, col) == getattr(old, col):
                continue
            if col in new_item:
                sets.append(f"{e.n(col)} = {e.raw(new_item[col])}")
            else:
                removes.append(e.n(col))
        if new.status.terminal and not old.status.terminal:
            removes += [e.n("active_shard"), e.n("active_owner"), e.n("active_tenant")]
        expr = "SET " + ", ".join(sets)
        return expr + (" REMOVE " + ", ".join(removes) if removes else "")

    def _fenced(self, job_id: str, lease: Lease, sets: Mapping[str, Any]) -> bool:
        e = _Expr()
        try:
            self._call(
                "update_item", TableName=self.table, Key=_job_key(job_id),
                UpdateExpression="SET " + ", ".join(f"{e.n(k)} = {e.v(v)}"
                                                    for k, v in sets.items()),
                ConditionExpression=f"attribute_exists(pk) AND "
                                    f"{e.n('owner_worker_id')} = {e.v(lease.worker_id)} AND "
                                    f"{e.n('lease_version')} = {e.v(lease.version)}",
                **e.args())  # fmt: skip
        except _ConditionFailed:
            return False
        return True

    def renew_leases(self, leases: Sequence[tuple[str, Lease]], ttl: float) -> set[str]:
        now = self._now()
        sets = {"lease_expires_at": now + timedelta(seconds=ttl), "last_heartbeat_at": now}
        return {job_id for job_id, lease in leases if self._fenced(job_id, lease, sets)}

    def release_leases(self, leases: Sequence[tuple[str, Lease]]) -> int:
        sets = {"lease_expires_at": c.EPOCH}
        return sum(self._fenced(job_id, lease, sets) for job_id, lease in leases)

    def claim_expired(self, worker_id: str, ttl: float, limit: int) -> list[Job]:
        if limit <= 0:
            return []
        now = self._now()
        cutoff = now - self.skew
        candidates: list[tuple[int, str]] = []
        for shard in range(ACTIVE_SHARDS):
            items = self._query(
                IndexName="active", Limit=limit,
                KeyConditionExpression="active_shard = :s AND lease_expires_at <= :cut",
                ExpressionAttributeValues={":s": {"S": str(shard)}, ":cut": _av(cutoff)},
                ProjectionExpression="job_id, lease_expires_at",
            )  # fmt: skip
            for _, it in zip(range(limit), items, strict=False):
                candidates.append((int(it["lease_expires_at"]["N"]), it["job_id"]["S"]))
        queue = [job_id for _, job_id in sorted(candidates)]
        claimed: list[Job] = []
        while queue and len(claimed) < limit:
            take, queue = queue[: limit - len(claimed)], queue[limit - len(claimed) :]
            works = [_Claim(self, job_id, worker_id, now, cutoff, ttl) for job_id in take]
            self._run(works)
            claimed += [w.result for w in works if isinstance(w.result, Job)]
        return claimed

    def list_owned_jobs(self, worker_id: str) -> list[Job]:
        keys = [_job_key(it["job_id"]["S"]) for it in self._query(
            IndexName="by_owner", KeyConditionExpression="active_owner = :w",
            ExpressionAttributeValues={":w": {"S": worker_id}},
            ProjectionExpression="job_id")]  # fmt: skip
        owned = [
            j for j in self._batch_get(keys)
            if j.owner_worker_id == worker_id and not j.status.terminal
        ]  # fmt: skip
        owned.sort(key=lambda j: (j.created_at or c.EPOCH, j.job_id))
        return owned

    def _batch_get(self, keys: list[Item]) -> list[Job]:
        """The current (consistent) items for ``keys``: index rows may be stale."""
        jobs = []
        for i in range(0, len(keys), 100):
            pending: dict[str, Any] = {self.table: {"Keys": keys[i : i + 100],
                                                    "ConsistentRead": True}}  # fmt: skip
            while pending:
                resp = self._call("batch_get_item", RequestItems=pending)
                jobs += [_job_from_item(it) for it in resp["Responses"].get(self.table, [])]
                pending = resp.get("UnprocessedKeys") or {}
        return jobs

    # --- membership --------------------------------------------------------------------

    def heartbeat_worker(self, worker_id: str, endpoint: str) -> None:
        item = {"pk": {"S": f"WORKER#{worker_id}"}, "sk": {"S": "WORKER"},
                "member": {"S": "W"}, "worker_id": {"S": worker_id},
                "endpoint": {"S": endpoint}, "heartbeat_at": _av(self._now())}  # fmt: skip
        self._call("put_item", TableName=self.table, Item=item)

    def list_workers(self, max_age_seconds: float) -> list[WorkerInfo]:
        oldest = self._now() - timedelta(seconds=max_age_seconds)
        items = self._query(
            IndexName="workers", KeyConditionExpression="#m = :w AND heartbeat_at >= :old",
            ExpressionAttributeNames={"#m": "member"},
            ExpressionAttributeValues={":w": {"S": "W"}, ":old": _av(oldest)})  # fmt: skip
        live = [c.worker_from_row(_row(it, c.WORKER_COLUMNS)) for it in items]
        return sorted(live, key=lambda w: w.worker_id)


