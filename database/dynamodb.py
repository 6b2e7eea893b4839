"""The DynamoDB job store (boto3): one table, conditional writes, transactions for atomicity.

Key design (table ``<DYNAMODB_TABLE_PREFIX>-jobs``, key ``pk``/``sk``, on-demand billing):

* job ``pk=JOB#<job_id> sk=JOB``; its transitions ``sk=TR#<idx:06>`` and events
  ``sk=EV#<seq:020>`` share the partition, so one Query reads them in order and a delete
  removes the whole item collection;
* request-id guard ``pk=REQ#<tenant>#<request_id> sk=REQ`` holding the job id: written in
  the same ``TransactWriteItems`` as the job and its first transition, so concurrent
  creates with one request id yield one job;
* worker membership ``pk=WORKER#<id> sk=WORKER``.

Global secondary indexes (all sparse: only the items carrying the key attributes):
``by_tenant`` (``tenant_id``, ``created_key`` = zero-padded µs + job id) lists a tenant's
jobs newest first; ``active`` (``active_shard``, ``lease_expires_at``) holds only
non-terminal jobs, spread over a few shards, for claims; ``by_owner`` (``active_owner``,
``created_key``) lists a worker's active jobs; ``events_by_tenant`` (``event_tenant``,
``event_key``) and ``workers`` (``member``, ``heartbeat_at``). Times are stored as
integer microseconds since the epoch.

Index reads are eventually consistent: a new job can take a moment to show in
``list_jobs``. Everything that decides ownership rereads the base item (consistent reads
and conditions), so a stale index can delay a claim or a renewal but never grant one.

**Clock.** DynamoDB has no server clock, so leases use the worker clock (injected) with
a skew margin: a lease counts as expired only once ``lease_expires_at + skew <= now``.
The default skew is 2 s; worker clocks must agree to within it (NTP does far better).
Released leases are set to the epoch, so they are claimable at once whatever the skew.

**Limits.** An item holds at most 400 KB, so a spec larger than that (huge env values)
is refused with ``InvalidArgument``.
"""

from __future__ import annotations

import json
import random
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from database import _common as c
from jennah.errors import Conflict, InvalidArgument, NotFound, StoreError, StoreUnavailable
from jennah.models import (
    Job,
    JobEvent,
    JobFilter,
    JobPatch,
    Lease,
    Page,
    Transition,
    WorkerInfo,
)
from jennah.settings import StoreSettings

Item = dict[str, Any]  # a low-level DynamoDB item ({"attr": {"S": "..."}})

DEFAULT_SKEW_SECONDS = 2.0
ACTIVE_SHARDS = 4
_TX_MAX = 25  # items per TransactWriteItems we send (well under the service limit)
_UNAVAILABLE = {
    "ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded",
    "InternalServerError", "ServiceUnavailable", "LimitExceededException",
    "TransactionInProgressException",
}  # fmt: skip
_TIME_ATTRS = c.JOB_TIME_COLUMNS | {"at", "heartbeat_at"}


def _index(name: str, pk: str, sk: str) -> dict[str, Any]:
    return {
        "IndexName": name,
        "KeySchema": [{"AttributeName": pk, "KeyType": "HASH"},
                      {"AttributeName": sk, "KeyType": "RANGE"}],
        "Projection": {"ProjectionType": "ALL"},
    }  # fmt: skip


ATTRIBUTE_TYPES = {
    "pk": "S", "sk": "S", "tenant_id": "S", "created_key": "S", "active_shard": "S",
    "lease_expires_at": "N", "active_owner": "S", "event_tenant": "S", "event_key": "S",
    "member": "S", "heartbeat_at": "N",
}  # fmt: skip
INDEXES = [
    _index("by_tenant", "tenant_id", "created_key"),
    _index("active", "active_shard", "lease_expires_at"),
    _index("by_owner", "active_owner", "created_key"),
    _index("events_by_tenant", "event_tenant", "event_key"),
    _index("workers", "member", "heartbeat_at"),
]


class _ConditionFailed(Exception):
    """A single-item write's condition did not hold."""


class _Cancelled(Exception):
    """A transaction was cancelled; ``codes`` has one reason code per item."""

    def __init__(self, codes: list[str]) -> None:
        super().__init__(codes)
        self.codes = codes


# --- values -------------------------------------------------------------------------------


def _av(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"BOOL": value}
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
    return av["S"]


def _row(item: Mapping[str, Any], columns: Sequence[str]) -> c.Row:
    return {col: _from_av(col, item[col]) if col in item else None for col in columns}


def _created_key(created_at: datetime, job_id: str) -> str:
    return f"{c.to_micros(created_at):020d}#{job_id}"


def _job_key(job_id: str) -> Item:
    return {"pk": {"S": f"JOB#{job_id}"}, "sk": {"S": "JOB"}}


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


def _event_item(e: JobEvent) -> Item:
    row = c.event_to_row(e)
    item: Item = {k: _av(v) for k, v in row.items() if v is not None}
    item["pk"], item["sk"] = {"S": f"JOB#{e.job_id}"}, {"S": f"EV#{e.seq:020d}"}
    item["event_tenant"] = {"S": e.tenant_id}
    item["event_key"] = {"S": f"{c.to_micros(e.created_at):020d}#{e.job_id}#{e.seq:020d}"}
    return item


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


class DynamoDBStore:
    """Jobs in one DynamoDB table; leases by conditional writes on the worker clock."""

    name = "dynamodb"

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
        import boto3
        from botocore.config import Config

        session = session or boto3.session.Session(region_name=settings.region or None)
        config = Config(
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=2, read_timeout=10, max_pool_connections=64,
        )  # fmt: skip
        client = session.client(
            "dynamodb", endpoint_url=settings.aws_endpoint_url or None,
            region_name=settings.region or None, config=config,
        )  # fmt: skip
        return cls(client, settings.dynamodb_table_prefix, clock=clock, skew_seconds=skew_seconds)

    def _now(self) -> datetime:
        return c.utc(self._clock())

    # --- calls and error translation ---------------------------------------------------

    def _call(self, op: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

        for attempt in range(6):
            try:
                return getattr(self._client, op)(**kwargs)
            except ClientError as exc:
                err = exc.response.get("Error", {})
                code = err.get("Code", "")
                if code == "ConditionalCheckFailedException":
                    raise _ConditionFailed() from None
                if code == "TransactionCanceledException":
                    reasons = exc.response.get("CancellationReasons") or []
                    raise _Cancelled([r.get("Code", "None") for r in reasons]) from None
                if code == "TransactionConflictException" and attempt < 5:
                    time.sleep(random.uniform(0.005, 0.02) * 2**attempt)
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

    def _get(self, key: Item) -> Item | None:
        resp = self._call("get_item", TableName=self.table, Key=key, ConsistentRead=True)
        item: Item | None = resp.get("Item")
        return item

    def _query(self, **kwargs: Any) -> Iterator[Item]:
        """Every item of a Query, following ``LastEvaluatedKey``."""
        kwargs["TableName"] = self.table
        while True:
            resp = self._call("query", **kwargs)
            yield from resp.get("Items", [])
            if "LastEvaluatedKey" not in resp:
                return
            kwargs["ExclusiveStartKey"] = resp["LastEvaluatedKey"]

    def _job(self, job_id: str) -> Job | None:
        item = self._get(_job_key(job_id))
        return _job_from_item(item) if item else None

    def _tenant_job(self, tenant_id: str, job_id: str) -> Job:
        job = self._job(job_id)
        if job is None or job.tenant_id != tenant_id:
            raise NotFound(f"job {job_id} not found")
        return job

    # --- schema ------------------------------------------------------------------------

    def migrate(self) -> list[str]:
        try:
            self._call(
                "create_table", TableName=self.table, BillingMode="PAY_PER_REQUEST",
                KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                           {"AttributeName": "sk", "KeyType": "RANGE"}],
                AttributeDefinitions=[{"AttributeName": k, "AttributeType": t}
                                      for k, t in ATTRIBUTE_TYPES.items()],
                GlobalSecondaryIndexes=INDEXES,
            )  # fmt: skip
            created = [f"dynamodb:{self.table}"]
        except StoreError as exc:
            if "ResourceInUseException" not in str(exc):
                raise
            created = []
        waiter = self._client.get_waiter("table_exists")
        waiter.wait(TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": 120})
        return created

    def ping(self) -> None:
        self._get({"pk": {"S": "PING"}, "sk": {"S": "PING"}})

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            close()

    # --- tenant-facing -----------------------------------------------------------------

    def create_job(self, job: Job, lease_ttl: float) -> tuple[Job, bool]:
        guard = {"pk": {"S": f"REQ#{job.tenant_id}#{job.request_id}"}, "sk": {"S": "REQ"}}
        for _ in range(10):
            if job.request_id:
                existing = self._by_guard(guard)
                if existing is not None:
                    return existing, False
            now = self._now()
            stored = c.new_job(job, now, lease_ttl)
            first = Transition(job.job_id, None, stored.status, now, "created",
                               job.owner_worker_id)  # fmt: skip
            stored_item = _job_item(stored)
            stored_item["tr_count"] = {"N": "1"}
            items = [stored_item, _transition_item(first, 0)]
            if job.request_id:
                items.append({**guard, "job_id": {"S": job.job_id}})
            puts = [{"Put": {"TableName": self.table, "Item": it,
                             "ConditionExpression": "attribute_not_exists(pk)"}}
                    for it in items]  # fmt: skip
            try:
                self._call("transact_write_items", TransactItems=puts)
                return stored, True
            except _Cancelled as exc:
                if exc.codes and exc.codes[0] == "ConditionalCheckFailed":
                    raise Conflict(f"job {job.job_id} already exists") from None
                # The request id was taken meanwhile (or a conflict): look again.
        raise StoreUnavailable("create_job kept conflicting")

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
            raise NotFound(f"job {job_id} not found") from None
        return _job_from_item(resp["Attributes"])

    def delete_job(self, tenant_id: str, job_id: str) -> None:
        job = self._tenant_job(tenant_id, job_id)
        e = _Expr()
        ops: list[dict[str, Any]] = [{"Delete": {
            "TableName": self.table, "Key": _job_key(job_id),
            "ConditionExpression": f"{e.n('tenant_id')} = {e.v(tenant_id)}", **e.args()}}]
        if job.request_id:
            ops.append({"Delete": {"TableName": self.table, "Key": {
                "pk": {"S": f"REQ#{tenant_id}#{job.request_id}"}, "sk": {"S": "REQ"}}}})
        try:
            self._call("transact_write_items", TransactItems=ops)
        except _Cancelled:
            raise NotFound(f"job {job_id} not found") from None
        # The job item is gone, so no new event can be appended (append_events checks
        # it in its transaction); now sweep the rest of the item collection.
        keys = [{"pk": it["pk"], "sk": it["sk"]} for it in self._query(
            KeyConditionExpression="pk = :pk", ConsistentRead=True,
            ExpressionAttributeValues={":pk": {"S": f"JOB#{job_id}"}},
            ProjectionExpression="pk, sk")]  # fmt: skip
        for i in range(0, len(keys), 25):
            pending = {self.table: [{"DeleteRequest": {"Key": k}} for k in keys[i : i + 25]]}
            while pending:
                resp = self._call("batch_write_item", RequestItems=pending)
                pending = resp.get("UnprocessedItems") or {}

    def list_transitions(self, tenant_id: str, job_id: str) -> list[Transition]:
        self._tenant_job(tenant_id, job_id)
        items = self._query(
            KeyConditionExpression="pk = :pk AND begins_with(sk, :tr)", ConsistentRead=True,
            ExpressionAttributeValues={":pk": {"S": f"JOB#{job_id}"}, ":tr": {"S": "TR#"}},
        )  # fmt: skip
        return [c.transition_from_row(_row(it, c.TRANSITION_COLUMNS)) for it in items]

    def list_events(
        self, tenant_id: str, job_id: str | None, after_seq: int, limit: int
    ) -> list[JobEvent]:
        if limit <= 0:
            return []
        if job_id is None:
            kwargs: dict[str, Any] = {
                "IndexName": "events_by_tenant", "KeyConditionExpression": "event_tenant = :t",
                "ExpressionAttributeValues": {":t": {"S": tenant_id}}}  # fmt: skip
        else:
            job = self._job(job_id)
            if job is None or job.tenant_id != tenant_id:
                return []
            kwargs = {"KeyConditionExpression": "pk = :pk AND sk BETWEEN :lo AND :hi",
                      "ConsistentRead": True, "ExpressionAttributeValues": {
                          ":pk": {"S": f"JOB#{job_id}"},
                          ":lo": {"S": f"EV#{max(after_seq + 1, 0):020d}"},
                          ":hi": {"S": "EV#" + "9" * 20}}}  # fmt: skip
        events = []
        for item in self._query(Limit=limit, **kwargs):
            events.append(c.event_from_row(_row(item, c.EVENT_COLUMNS)))
            if len(events) >= limit:
                break
        return events

    def append_events(self, events: Sequence[JobEvent]) -> None:
        by_job: dict[tuple[str, str], dict[int, JobEvent]] = {}
        for ev in events:
            by_job.setdefault((ev.job_id, ev.tenant_id), {}).setdefault(ev.seq, ev)
        for (job_id, tenant_id), per_seq in by_job.items():
            todo = [per_seq[s] for s in sorted(per_seq)]
            while todo:
                todo = self._append_chunk(job_id, tenant_id, todo)

    def _append_chunk(self, job_id: str, tenant_id: str, todo: list[JobEvent]) -> list[JobEvent]:
        """Write up to one transaction of ``todo``; return what is left to write."""
        chunk, rest = todo[: _TX_MAX - 1], todo[_TX_MAX - 1 :]
        check = {"ConditionCheck": {
            "TableName": self.table, "Key": _job_key(job_id),
            "ConditionExpression": "tenant_id = :t", "ExpressionAttributeValues": {
                ":t": {"S": tenant_id}}}}  # fmt: skip
        puts = [{"Put": {"TableName": self.table, "Item": _event_item(ev),
                         "ConditionExpression": "attribute_not_exists(pk)"}}
                for ev in chunk]  # fmt: skip
        try:
            self._call("transact_write_items", TransactItems=[check, *puts])
        except _Cancelled as exc:
            codes = exc.codes + ["None"] * (len(puts) + 1 - len(exc.codes))
            if codes[0] == "ConditionalCheckFailed":
                return []  # the job is gone (or not this tenant's): drop its events
            # Events already stored are skipped; the others are tried again.
            chunk = [ev for ev, code in zip(chunk, codes[1:], strict=True)
                     if code != "ConditionalCheckFailed"]  # fmt: skip
            return chunk + rest
        return rest

    # --- owner-facing, fenced ----------------------------------------------------------

    def update_job(self, job_id: str, lease: Lease, patch: JobPatch, reason: str = "") -> Job:
        for _ in range(10):
            item = self._get(_job_key(job_id))
            job = c.check_lease(_job_from_item(item) if item else None, lease)
            assert item is not None
            updated, transition = c.apply_patch(job, lease, patch, self._now(), reason)
            e = _Expr()
            count = int(item.get("tr_count", {"N": "1"})["N"])
            extra = {} if transition is None else {"tr_count": count + 1}
            update = self._diff(e, job, updated, extra)
            cond = (f"{e.n('owner_worker_id')} = {e.v(lease.worker_id)} AND "
                    f"{e.n('lease_version')} = {e.v(lease.version)} AND "
                    f"{e.n('status')} = {e.v(job.status.value)}")  # fmt: skip
            try:
                if transition is None:
                    resp = self._call(
                        "update_item", TableName=self.table, Key=_job_key(job_id),
                        UpdateExpression=update, ConditionExpression=cond,
                        ReturnValues="ALL_NEW", **e.args())  # fmt: skip
                    return _job_from_item(resp["Attributes"])
                self._call("transact_write_items", TransactItems=[
                    {"Update": {"TableName": self.table, "Key": _job_key(job_id),
                                "UpdateExpression": update, "ConditionExpression": cond,
                                **e.args()}},
                    {"Put": {"TableName": self.table, "Item": _transition_item(transition, count),
                             "ConditionExpression": "attribute_not_exists(pk)"}},
                ])  # fmt: skip
                return updated
            except (_ConditionFailed, _Cancelled):
                continue  # reread: LeaseLost if the lease moved, else retry the race
        raise StoreUnavailable(f"update of job {job_id} kept conflicting")

    @staticmethod
    def _diff(e: _Expr, old: Job, new: Job, extra: Mapping[str, Any]) -> str:
        """The UpdateExpression turning ``old`` into ``new``, plus ``extra`` SETs."""
        sets = [f"{e.n(k)} = {e.v(v)}" for k, v in extra.items()]
        removes: list[str] = []
        new_item, old_item = _job_item(new), _job_item(old)
        for col in c.JOB_COLUMNS:
            if new_item.get(col) == old_item.get(col):
                continue
            if col in new_item:
                sets.append(f"{e.n(col)} = {e.raw(new_item[col])}")
            else:
                removes.append(e.n(col))
        if new.status.terminal and not old.status.terminal:
            removes += [e.n("active_shard"), e.n("active_owner")]
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
        claimed: list[Job] = []
        for _, job_id in sorted(candidates):
            if len(claimed) >= limit:
                break
            job = self._claim_one(job_id, worker_id, now, cutoff, ttl)
            if job is not None:
                claimed.append(job)
        return claimed

    def _claim_one(
        self, job_id: str, worker_id: str, now: datetime, cutoff: datetime, ttl: float
    ) -> Job | None:
        # The condition rereads the item itself: exactly one claimer sees it expired,
        # and the version is bumped in place, so a stale index row cannot double-claim.
        e = _Expr()
        try:
            resp = self._call(
                "update_item", TableName=self.table, Key=_job_key(job_id),
                UpdateExpression=(
                    f"SET {e.n('owner_worker_id')} = {e.v(worker_id)}, "
                    f"{e.n('active_owner')} = {e.v(worker_id)}, "
                    f"{e.n('lease_version')} = {e.n('lease_version')} + {e.v(1)}, "
                    f"{e.n('lease_expires_at')} = {e.v(now + timedelta(seconds=ttl))}, "
                    f"{e.n('last_heartbeat_at')} = {e.v(now)}, {e.n('updated_at')} = {e.v(now)}"),
                ConditionExpression=(f"attribute_exists({e.n('active_shard')}) AND "
                                     f"{e.n('lease_expires_at')} <= {e.v(cutoff)}"),
                ReturnValues="ALL_NEW", **e.args())  # fmt: skip
        except _ConditionFailed:
            return None
        return _job_from_item(resp["Attributes"])

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
