"""Hostile input over real HTTP: a gateway and a worker (in-process, uvicorn on
127.0.0.1, SQLite, ``BATCH_PROVIDER=dry``, dev mode) take thousands of malformed,
oversized and hostile requests in the JSON and binary encodings, on every RPC.

For every request:

* the answer is a client error (4xx, or a Connect/gRPC-Web error code a client caused),
  or a success for an input that is in fact valid: never a 5xx, ``internal``, ``unknown``
  or ``unavailable``, and nothing is logged at ERROR (no unhandled exception);
* no internal detail leaks: no traceback, Python exception class name or file path in
  the body (unless the request itself contained that text, which messages may quote);
* nothing is half-written: an unsuccessful call leaves every tenant's job count as it was,
  and a successful SubmitJob adds at most one job, which validates.

At the end both servers still answer ``/health`` and a valid SubmitJob. Hypothesis runs
derandomized without an example database, so CI sees the same inputs on every run.

Also here: env var values are write-only. A secret value submitted with a job never
appears in any response (GetJob, ListJobs, ListJobEvents, WatchJobEvents, errors) or in
any log record.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import re
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from database import create_store
from database.base import JobStore
from gateway.app import create_app as create_gateway
from jennah.errors import InvalidArgument
from jennah.models import JobFilter, validate_tenant
from jennah.settings import load_gateway_settings, load_worker_settings
from jennah.v1 import deployment_pb2 as pb
from tests.fixtures.postgres import fresh_database
from tests.helpers import SERVICE, ThreadServer, wait_until
from worker.app import build_runtime, create_app
from worker.convert import spec_from_request

pytestmark = pytest.mark.timeout(180)

TENANTS = ("fuzz-a", "fuzz-b")
METHODS = ("SubmitJob", "GetJob", "ListJobs", "CancelJob", "DeleteJob", "GetCurrentTenant",
           "ListJobEvents", "ListTasks", "ListNotifications", "AckNotification",
           "WatchJobEvents")
REQUEST_TYPES: dict[str, type[Message]] = {
    m: getattr(pb, f"{m}Request") for m in METHODS
}
# Codes a client can cause. Anything else (internal, unknown, unavailable, data_loss...)
# means the server failed.
CLIENT_CODES = {"invalid_argument", "not_found", "resource_exhausted", "failed_precondition",
                "unauthenticated", "unimplemented", "out_of_range", "permission_denied",
                "canceled", "aborted"}
GRPC_CLIENT_CODES = {"3", "5", "8", "9", "16", "12", "11", "7", "1", "10"}
LEAK_MARKERS = ("Traceback", 'File "', ".py", "/work/", "site-packages", "<frame", "0x7f")
CLASS_NAME = re.compile(rb"\b[A-Z][A-Za-z]+(?:Error|Exception)\b")

FUZZ = settings(max_examples=800, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck), print_blob=False)


# --- the stack ---------------------------------------------------------------------------


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        out = []
        for r in self.records:
            out.append(r.getMessage())
            if r.exc_info:
                out.append(logging.Formatter().formatException(r.exc_info))
        return "\n".join(out)


@dataclass
class Stack:
    gateway: str
    worker: str
    store: JobStore
    logs: Capture
    seen_jobs: set[str] = field(default_factory=set)

    def counts(self) -> dict[str, int]:
        return {t: count_jobs(self.store, t) for t in TENANTS}


def count_jobs(store: JobStore, tenant: str) -> int:
    total, token = 0, ""
    while True:
        page = store.list_jobs(tenant, JobFilter(), 500, token)
        total += len(page.jobs)
        token = page.next_page_token
        if not token:
            return total


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The stack on SQLite, then on PostgreSQL (where a NUL byte once reached the store
    and came back as ``internal``)."""
    home = Path(tempfile.mkdtemp(prefix="jennah-fuzz-"))
    with contextlib.ExitStack() as stores:
        if request.param == "postgres":
            url = stores.enter_context(fresh_database(request.getfixturevalue("postgres_url")))
            db = {"DB_PROVIDER": "postgres", "DATABASE_URL": url}
        else:
            db = {"DB_PROVIDER": "sqlite", "DB_PATH": str(home / "jennah.db")}
        yield from _stack(home, db)


def _stack(home: Path, db: dict[str, str]) -> Iterator[Stack]:
    env = {"JENNAH_HOME": str(home), "JENNAH_DEV_MODE": "1", "WORKER_ID": "w-fuzz",
           "BATCH_PROVIDER": "dry", "WORKER_POLL_INTERVAL_SECONDS": "0.05",
           # Admission limits have their own tests; here they would only add 429s.
           "TENANT_SUBMIT_RATE": "0", "TENANT_MAX_ACTIVE_JOBS": "0", **db}
    settings_ = load_worker_settings(env)
    store = create_store(settings_.store)
    registry = CollectorRegistry()
    capture = Capture()
    root, ours = logging.getLogger(), logging.getLogger("jennah")
    root.addHandler(capture)  # every logger propagates here (uvicorn's included)
    old_level = ours.level
    ours.setLevel(logging.DEBUG)  # our own records at every level, for the secret check
    try:
        rt = build_runtime(settings_, store=store, registry=registry)
        with ThreadServer(create_app(settings_, rt, registry)) as worker:
            gw_settings = load_gateway_settings({"JENNAH_DEV_MODE": "1",
                                                 "WORKER_ENDPOINTS": worker.url})
            with ThreadServer(create_gateway(gw_settings, registry=CollectorRegistry())) as gw:
                yield Stack(gw.url, worker.url, store, capture)
    finally:
        root.removeHandler(capture)
        ours.setLevel(old_level)
        store.close()


# --- talking to it ---------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def send(url: str, path: str, body: bytes, headers: dict[str, str], verb: str = "POST",
         timeout: float = 10) -> Answer:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.putrequest(verb, path, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v.encode("latin-1"))
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def stream_end_code(body: bytes) -> str | None:
    """The error code in a Connect streaming response's end message (None if none)."""
    pos = 0
    while pos + 5 <= len(body):
        flags, size = struct.unpack(">BI", body[pos:pos + 5])
        payload = body[pos + 5:pos + 5 + size]
        pos += 5 + size
        if flags & 0x02:
            end = json.loads(payload or b"{}")
            error = end.get("error")
            return None if not error else str(error.get("code"))
    return None


def error_code(ans: Answer) -> str | None:
    """``None`` for a success; otherwise the error code the response carries."""
    ctype = ans.headers.get("content-type", "")
    if ans.status != 200:
        if ans.body and ctype.startswith("application/json"):
            return str(json.loads(ans.body)["code"])
        return f"http-{ans.status}"
    if ctype.startswith("application/connect+"):
        return stream_end_code(ans.body)
    if ctype.startswith("application/grpc"):
        status = ans.headers.get("grpc-status")
        if status is None:
            found = re.search(rb"grpc-status: ?(\d+)", ans.body)
            status = found.group(1).decode() if found else "0"
        return None if status == "0" else f"grpc-{status}"
    return None


def check_answer(ans: Answer, request_body: bytes, request_headers: dict[str, str]) -> str | None:
    """Assert the server-side invariants on one answer; return its error code.

    Two 5xx are allowed, both statements about the request, not server failures:
    ``unimplemented`` (HTTP 501) for a compression the server does not support, which the
    Connect protocol prescribes so that clients can fall back, and ``deadline_exceeded``
    (HTTP 504) when the request itself set a deadline (``Connect-Timeout-Ms: 1``) that a
    slow machine missed."""
    if ans.status == 501 and any(k.lower().endswith("content-encoding")
                                 for k in request_headers):  # fmt: skip
        assert json.loads(ans.body)["code"] == "unimplemented", ans.body[:300]
        assert b"unknown compression" in ans.body
        return "unimplemented"
    if ans.status == 504 and any(k.lower() in ("connect-timeout-ms", "grpc-timeout")
                                 for k in request_headers):  # fmt: skip
        # The client set the deadline (1 ms, say): the Connect protocol answers a missed
        # deadline with HTTP 504 and deadline_exceeded. A statement about the request.
        assert json.loads(ans.body)["code"] == "deadline_exceeded", ans.body[:300]
        return "deadline_exceeded"
    assert ans.status < 500, (ans.status, ans.body[:300])
    code = error_code(ans)
    if code is not None:
        if code.startswith("http-"):
            assert 400 <= ans.status < 500, ans.status
        elif code.startswith("grpc-"):
            assert code.removeprefix("grpc-") in GRPC_CLIENT_CODES, (code, ans.body[:300])
        else:
            assert code in CLIENT_CODES, (code, ans.body[:300])
    sent = request_body + json.dumps(request_headers).encode()
    for marker in LEAK_MARKERS:
        if marker.encode() in ans.body:
            assert marker.encode() in sent, (marker, ans.body[:300])
    for name in CLASS_NAME.findall(ans.body):
        assert name in sent, (name, ans.body[:300])
    return code


def valid_submit(req: pb.SubmitJobRequest, tenant: str) -> bool:
    try:
        validate_tenant(tenant)
        spec_from_request(req)
    except InvalidArgument:
        return False
    return True


def exchange(stack: Stack, *, target: str, method: str, body: bytes, ctype: str | None,
             tenant: str | None, verb: str = "POST", extra: dict[str, str] | None = None,
             parsed: Message | None = None) -> str | None:
    """Send one request and check every invariant; return the error code (None: success)."""
    headers = dict(extra or {})
    if ctype is not None:
        headers["Content-Type"] = ctype
    if tenant is not None:
        headers["X-Tenant-Id"] = tenant
    before = stack.counts()
    base = stack.gateway if target == "gateway" else stack.worker
    ans = send(base, f"{SERVICE}/{method}", body, headers, verb)
    code = check_answer(ans, body, headers)
    event(f"{method[:20]}: {code or 'ok'}")  # --hypothesis-show-statistics
    after = stack.counts()
    if code is not None or method != "SubmitJob":
        # Nothing half-written. (A successful Cancel/Delete of a fuzzed id never matches
        # a real job, and dry jobs are already terminal.)
        assert after == before, (method, code, ans.body[:200])
        return code
    # A successful SubmitJob: it must have been valid, and stored exactly one job.
    tenant = (tenant or "").strip(" \t")  # HTTP drops a header value's outer whitespace
    assert tenant in TENANTS
    if isinstance(parsed, pb.SubmitJobRequest):
        assert valid_submit(parsed, tenant), ans.body[:200]
    job_id = _job_id(ans)
    fresh = job_id not in stack.seen_jobs
    stack.seen_jobs.add(job_id)
    expected = dict(before)
    expected[tenant] += 1 if fresh else 0
    assert after == expected, (before, after)
    return code


def _job_id(ans: Answer) -> str:
    if ans.headers.get("content-type", "").startswith("application/proto"):
        return str(pb.SubmitJobResponse.FromString(ans.body).job_id)
    return str(json.loads(ans.body)["jobId"])


# --- strategies ----------------------------------------------------------------------------

SUBMIT_FIELDS = ("image_uri", "imageUri", "commands", "env_vars", "envVars", "name", "labels",
                 "resource_profile", "resourceProfile", "resource_override",
                 "resourceOverride", "machine_type", "boot_disk_size_gb", "use_spot_vms",
                 "service_account", "max_retries", "maxRetries", "request_id", "requestId")
OTHER_FIELDS = ("job_id", "jobId", "page_size", "pageSize", "page_token", "status", "labels",
                "name_prefix", "after_seq", "afterSeq", "limit", "unread_only",
                "notification_id")
UNKNOWN_FIELDS = ("bogus", "__proto__", "constructor", "envVarNames", "tenant_id", "", "a" * 300)

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False) | st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12,
)
huge = st.sampled_from([
    "x" * (33 * 1024),
    "y" * (1024 * 1024 + 16),  # over read_max_bytes once encoded
    ["a"] * 1001,
    ["a"] * 1000,
    {f"V{i}": "1" for i in range(101)},
    {f"V{i}": "1" for i in range(100)},
    {"A": "v" * (32 * 1024 + 1)},
    {"A": "v" * (32 * 1024)},
    {"1BAD": "x"},
    {"BAD-NAME": "x"},
    {"": "x"},
    {"A": "\x00"},
    ["\x00"],
    "\ud800",  # a lone surrogate (escaped in JSON)
    "JOB_STATUS_BOGUS",
    "JOB_STATUS_RUNNING",
    99,
    -1,
    2**31,
    2**63,
    1.5,
    "1e400",
    {"cpu_millis": -5},
    {"cpu_millis": 2**40},
    {"max_run_duration_seconds": "9" * 30},
    "busybox",
    "gcr.io/project/image:tag",
    "registry.example.com:5000/a/b@sha256:" + "a" * 64,
    "Not A Valid Image!",
    "UPPER/case",
    ["sh", "-c", "echo hi"],
    {"team": "ml"},
    {"Team": "ML"},
    "medium",
    "giant",
    "n1-standard-4",
])
field_values = st.one_of(json_values, huge)


@st.composite
def submit_json(draw: st.DrawFn) -> dict[str, Any]:
    """A valid SubmitJob body with up to four hostile mutations."""
    body: dict[str, Any] = {"image_uri": "busybox", "commands": ["true"]}
    if draw(st.booleans()):
        body["env_vars"] = {"A": "1"}
    for _ in range(draw(st.integers(0, 4))):
        action = draw(st.sampled_from(["set", "set", "drop", "unknown"]))
        if action == "set":
            body[draw(st.sampled_from(SUBMIT_FIELDS))] = draw(field_values)
        elif action == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        else:
            body[draw(st.sampled_from(UNKNOWN_FIELDS))] = draw(json_values)
    return body


@st.composite
def other_json(draw: st.DrawFn) -> dict[str, Any]:
    return draw(st.dictionaries(st.sampled_from(OTHER_FIELDS + UNKNOWN_FIELDS), field_values,
                                max_size=4))


def corrupt_text(draw: Callable[[st.SearchStrategy[Any]], Any], data: bytes) -> bytes:
    kind = draw(st.sampled_from(["none", "none", "none", "truncate", "utf8", "nest", "wrap",
                                 "bytes"]))
    if kind == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "utf8":
        at: int = draw(st.integers(0, len(data)))
        bad: bytes = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80",
                                           b"\xf8\x88\x80\x80"]))
        return data[:at] + bad + data[at:]
    if kind == "nest":
        depth: int = draw(st.sampled_from([50, 1000, 100_000]))
        return b'{"image_uri": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "wrap":
        return b"[" + data + b"]"
    if kind == "bytes":
        return bytes(draw(st.binary(max_size=64)))
    return data


def tenant_headers() -> st.SearchStrategy[str | None]:
    return st.one_of(
        st.sampled_from(TENANTS), st.sampled_from(TENANTS), st.sampled_from(TENANTS),
        st.sampled_from([None, "", "Bad_Tenant", "a" * 64, "-lead", "ok-but-\xe9", " fuzz-a"]),
    )


def parse_json(method: str, data: bytes) -> Message | None:
    """The request as protojson reads it by default (strict: an unknown field or enum
    name is an error), or None if it is not one."""
    msg = REQUEST_TYPES[method]()
    try:
        json_format.Parse(data.decode("utf-8"), msg)
    except (json_format.ParseError, UnicodeDecodeError, RecursionError, ValueError):
        return None
    return msg


def acceptable_json(method: str, data: bytes) -> bool:
    """Whether a server may accept ``data``: strict protojson, no NUL byte in any string,
    and a numeric ``status`` only if JobStatus defines it (json_format itself drops a
    number over 32 bits without a word)."""
    if parse_json(method, data) is None or b"\\u0000" in data:
        return False
    status = json.loads(data).get("status") if data.lstrip().startswith(b"{") else None
    return not (isinstance(status, int) and status not in pb.JobStatus.values())


# --- the fuzz tests ---------------------------------------------------------------------


@FUZZ
@given(
    target=st.sampled_from(["gateway", "worker"]),
    method=st.sampled_from(METHODS[:-1]),  # unary; streams are fuzzed below
    submit=submit_json(),
    other=other_json(),
    tenant=tenant_headers(),
    ctype=st.sampled_from(["application/json", "application/json", "application/json",
                           "application/json; charset=utf-8"]),
    data=st.data(),
)
def test_fuzz_json(stack: Stack, target: str, method: str, submit: dict[str, Any],
                   other: dict[str, Any], tenant: str | None, ctype: str,
                   data: st.DataObject) -> None:
    body = submit if method == "SubmitJob" else other
    raw = corrupt_text(data.draw, json.dumps(body).encode())
    code = exchange(stack, target=target, method=method, body=raw, ctype=ctype, tenant=tenant,
                    parsed=parse_json(method, raw))
    if code is None:  # unknown fields, unknown enums and NUL bytes are never accepted
        assert acceptable_json(method, raw), (method, raw[:200])


texts = st.text(max_size=40) | st.sampled_from([
    "x" * (33 * 1024), "\x00", "busybox", "Not A Valid Image!", "1BAD", "A", "giant", "ml",
    "\u202e", "\ufeff", "a" * 200,
])


@st.composite
def submit_proto(draw: st.DrawFn) -> bytes:
    """A SubmitJobRequest built field by field, encoded, then possibly damaged."""
    req = pb.SubmitJobRequest(image_uri=draw(st.sampled_from(["busybox", "alpine:3"]) | texts))
    try:
        req.commands.extend(draw(st.lists(texts, max_size=4)))
        for k, v in draw(st.dictionaries(texts, texts, max_size=3)).items():
            req.env_vars[k] = v
            req.labels[k] = v
        req.name = draw(texts)
        req.resource_profile = draw(st.sampled_from(["", "small", "xlarge", "giant"]))
        req.max_retries = draw(st.integers(-(2**31), 2**31 - 1))
        req.boot_disk_size_gb = draw(st.integers(-(2**31), 2**31 - 1))
        req.resource_override.cpu_millis = draw(st.integers(-(2**31), 2**31 - 1))
        req.request_id = draw(texts)
    except ValueError:  # a lone surrogate cannot even be put in a message
        pass
    return bytes(req.SerializeToString())


@st.composite
def proto_body(draw: st.DrawFn, method: str) -> bytes:
    if method == "SubmitJob" and draw(st.booleans()):
        data = draw(submit_proto())
    else:
        data = draw(st.binary(max_size=80))
    kind = draw(st.sampled_from(["none", "none", "flip", "truncate", "unknown", "badutf8",
                                 "group", "bigvarint", "overlen"]))
    if kind == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    elif kind == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "unknown":  # field 1000, varint and length-delimited
        data += b"\xc0\x3e\x01" + b"\xc2\x3e\x03abc"
    elif kind == "badutf8":  # field 1 (a string in every request that has one)
        data += b"\x0a\x02\xff\xfe"
    elif kind == "group":  # deeply nested unknown groups
        depth = draw(st.sampled_from([10, 200, 5000]))
        data += b"\xcb\x3e" * depth + b"\xcc\x3e" * depth
    elif kind == "bigvarint":
        data += b"\x08" + b"\xff" * 11
    elif kind == "overlen":
        data += b"\x0a\xff\xff\xff\xff\x0f"
    return data


@FUZZ
@given(
    target=st.sampled_from(["gateway", "worker"]),
    method=st.sampled_from(METHODS[:-1]),
    tenant=tenant_headers(),
    data=st.data(),
)
def test_fuzz_binary(stack: Stack, target: str, method: str, tenant: str | None,
                     data: st.DataObject) -> None:
    raw = data.draw(proto_body(method))
    parsed: Message | None = REQUEST_TYPES[method]()
    try:
        assert parsed is not None
        parsed.ParseFromString(raw)
    except (DecodeError, RuntimeError):
        parsed = None
    exchange(stack, target=target, method=method, body=raw, ctype="application/proto",
             tenant=tenant, parsed=parsed)


CONTENT_TYPES = ("application/json", "application/proto", "application/connect+json",
                 "application/connect+proto", "application/grpc-web+proto",
                 "application/grpc-web+json", "application/grpc", "application/grpc+proto",
                 "text/plain", "", "application/x-www-form-urlencoded", "APPLICATION/JSON",
                 "application/json; charset=latin-1", "multipart/form-data; boundary=x")
HOSTILE_HEADERS = st.dictionaries(
    st.sampled_from(["Content-Encoding", "Connect-Content-Encoding", "Connect-Timeout-Ms",
                     "Connect-Protocol-Version", "Grpc-Timeout", "Accept-Encoding",
                     "Connect-Accept-Encoding", "Transfer-Encoding-Bogus", "X-Forwarded-For"]),
    st.sampled_from(["gzip", "br", "zstd", "deflate", "bogus", "identity", "abc", "-1", "0",
                     "99999999999999999999", "1", "2", "1S", "", "\xff"]),
    max_size=3,
)


@FUZZ
@given(
    target=st.sampled_from(["gateway", "worker"]),
    method=st.sampled_from((*METHODS, "Nope", "", "submitjob", "SubmitJob/extra", "..%2f..")),
    ctype=st.sampled_from(CONTENT_TYPES) | st.none(),
    verb=st.sampled_from(["POST"] * 8 + ["GET", "PUT", "DELETE", "PATCH"]),
    tenant=tenant_headers(),
    extra=HOSTILE_HEADERS,
    payload=st.binary(max_size=200) | other_json().map(lambda d: json.dumps(d).encode()),
    framed=st.sampled_from(["raw", "envelope", "end-flag", "short"]),
)
def test_fuzz_anything(stack: Stack, target: str, method: str, ctype: str | None, verb: str,
                       tenant: str | None, extra: dict[str, str], payload: bytes,
                       framed: str) -> None:
    if framed == "envelope":
        payload = envelope(payload)
    elif framed == "end-flag":
        payload = envelope(payload, flags=draw_flags(payload))
    elif framed == "short":
        payload = envelope(payload)[: max(0, len(payload) // 2)]
    if method == "WatchJobEvents" and ctype and "connect+json" in ctype and framed == "raw":
        # A well-formed watch of the whole tenant (it ends: dry jobs finish at once).
        payload = envelope(b"{}")
    exchange(stack, target=target, method=method, body=payload, ctype=ctype, tenant=tenant,
             verb=verb, extra=extra)


def draw_flags(payload: bytes) -> int:
    return (payload[0] if payload else 0x80) | 0x01  # compressed and other reserved bits


# --- after the storm ------------------------------------------------------------------------


def test_zz_still_serving_and_nothing_logged_at_error(stack: Stack) -> None:
    """Runs after the fuzz tests (file order): the stack is healthy and clean."""
    for base in (stack.gateway, stack.worker):
        ans = send(base, "/health", b"", {}, verb="GET")
        assert (ans.status, ans.body) == (200, b"ok\n")
    before = count_jobs(stack.store, "fuzz-a")
    ans = send(stack.gateway, f"{SERVICE}/SubmitJob",
               json.dumps({"image_uri": "busybox", "commands": ["true"]}).encode(),
               {"Content-Type": "application/json", "X-Tenant-Id": "fuzz-a"})
    assert ans.status == 200, ans.body
    assert count_jobs(stack.store, "fuzz-a") == before + 1
    errors = [r for r in stack.logs.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors][:5]


# --- env var values are write-only --------------------------------------------------------

SECRET = "s3cr3t-Value-9f7c2a"


def test_env_values_never_appear_in_responses_or_logs(stack: Stack) -> None:
    tenant = {"Content-Type": "application/json", "X-Tenant-Id": "fuzz-secret"}
    body = {"image_uri": "busybox", "commands": ["true"], "name": "secretive",
            "env_vars": {"API_TOKEN": SECRET, "OTHER": SECRET + "-2"}}
    answers: list[bytes] = []

    def rpc(method: str, payload: dict[str, Any], base: str = stack.gateway) -> bytes:
        ans = send(base, f"{SERVICE}/{method}", json.dumps(payload).encode(), tenant)
        answers.append(ans.body)
        return ans.body

    job_id = json.loads(rpc("SubmitJob", body))["jobId"]
    wait_until(lambda: b"JOB_STATUS_COMPLETED" in rpc("GetJob", {"job_id": job_id}), 10)
    got = json.loads(rpc("GetJob", {"job_id": job_id}, stack.worker))["job"]
    assert got["envVarNames"] == ["API_TOKEN", "OTHER"]  # names only
    rpc("ListJobs", {})
    rpc("ListJobs", {}, stack.worker)
    events = json.loads(rpc("ListJobEvents", {"job_id": job_id}))["events"]
    assert events
    watch = send(stack.gateway, f"{SERVICE}/WatchJobEvents",
                 envelope(json.dumps({"job_id": job_id}).encode()),
                 {**tenant, "Content-Type": "application/connect+json"})
    assert watch.status == 200 and stream_end_code(watch.body) is None
    answers.append(watch.body)
    # Error paths that name the variable must not echo its value either.
    for bad_env in ({"API_TOKEN": SECRET + "x" * (32 * 1024)}, {"API_TOKEN": SECRET + "\x00"},
                    {f"V{i}": SECRET for i in range(101)}):
        rpc("SubmitJob", {**body, "env_vars": bad_env})
    rpc("CancelJob", {"job_id": job_id})  # terminal: failed_precondition with the job state
    for data in answers:
        assert SECRET.encode() not in data
    assert SECRET not in stack.logs.text()


# --- docs/design.md §8 limits at their boundaries, on both apps ---------------------------

OK_BODY: dict[str, Any] = {"image_uri": "busybox", "commands": ["true"]}
LIMIT_CASES: list[tuple[str, dict[str, Any], str | None]] = [
    ("100 env vars", {**OK_BODY, "env_vars": {f"V{i}": "1" for i in range(100)}}, None),
    ("101 env vars", {**OK_BODY, "env_vars": {f"V{i}": "1" for i in range(101)}},
     "at most 100"),
    ("32 KiB value", {**OK_BODY, "env_vars": {"A": "v" * 32 * 1024}}, None),
    ("32 KiB + 1", {**OK_BODY, "env_vars": {"A": "v" * (32 * 1024 + 1)}}, "over 32768 bytes"),
    ("env name", {**OK_BODY, "env_vars": {"1BAD": "x"}}, "env var name"),
    ("env name dash", {**OK_BODY, "env_vars": {"BAD-NAME": "x"}}, "env var name"),
    ("1000 args", {**OK_BODY, "commands": ["a"] * 1000}, None),
    ("1001 args", {**OK_BODY, "commands": ["a"] * 1001}, "at most 1000"),
    ("image", {**OK_BODY, "image_uri": "Not A Valid Image!"}, "OCI image reference"),
    ("image upper", {**OK_BODY, "image_uri": "Busybox"}, "OCI image reference"),
    ("image digest", {**OK_BODY, "image_uri": "gcr.io/p/i@sha256:" + "a" * 64}, None),
    ("10000 tasks", {**OK_BODY, "task_count": 10_000, "parallelism": 10_000}, None),
    ("10001 tasks", {**OK_BODY, "task_count": 10_001}, "task_count=10001 is out of range"),
    ("negative tasks", {**OK_BODY, "task_count": -1}, "task_count=-1"),
    ("parallelism over count", {**OK_BODY, "task_count": 4, "parallelism": 5},
     "at most task_count"),
    ("task env", {**OK_BODY, "env_vars": {"JENNAH_TASK_COUNT": "1"}}, "set by Jennah"),
]


@pytest.mark.parametrize("target", ["gateway", "worker"])
@pytest.mark.parametrize(("case", "body", "fragment"), LIMIT_CASES,
                         ids=[c[0] for c in LIMIT_CASES])
def test_design_limits_are_enforced(stack: Stack, target: str, case: str, body: dict[str, Any],
                                    fragment: str | None) -> None:
    base = stack.gateway if target == "gateway" else stack.worker
    before = count_jobs(stack.store, "fuzz-limits")
    ans = send(base, f"{SERVICE}/SubmitJob", json.dumps(body).encode(),
               {"Content-Type": "application/json", "X-Tenant-Id": "fuzz-limits"})
    if fragment is None:
        assert ans.status == 200, ans.body[:300]
        assert count_jobs(stack.store, "fuzz-limits") == before + 1
    else:
        resp = json.loads(ans.body)
        assert (ans.status, resp["code"]) == (400, "invalid_argument")
        assert fragment in resp["message"]
        assert count_jobs(stack.store, "fuzz-limits") == before


@pytest.mark.parametrize("target", ["gateway", "worker"])
def test_request_size_limit_on_both_apps(stack: Stack, target: str) -> None:
    base = stack.gateway if target == "gateway" else stack.worker
    body = json.dumps({**OK_BODY, "name": "n" * (1024 * 1024)}).encode()
    for ctype, data in (("application/json", body),
                        ("application/proto", pb.SubmitJobRequest(
                            image_uri="busybox", commands=["x" * (1024 * 1024)]
                        ).SerializeToString())):
        ans = send(base, f"{SERVICE}/SubmitJob", data,
                   {"Content-Type": ctype, "X-Tenant-Id": "fuzz-limits"})
        resp = json.loads(ans.body)
        assert (ans.status, resp["code"]) == (429, "resource_exhausted")
        assert "larger than configured max 1048576" in resp["message"]


@pytest.mark.parametrize("target", ["gateway", "worker"])
def test_tenant_id_format(stack: Stack, target: str) -> None:
    base = stack.gateway if target == "gateway" else stack.worker
    for tenant in ("Bad_Tenant", "-lead", "a" * 64, "x.y"):
        ans = send(base, f"{SERVICE}/SubmitJob", json.dumps(OK_BODY).encode(),
                   {"Content-Type": "application/json", "X-Tenant-Id": tenant})
        resp = json.loads(ans.body)
        assert (ans.status, resp["code"]) == (400, "invalid_argument"), tenant
    ans = send(base, f"{SERVICE}/GetCurrentTenant", b"{}",
               {"Content-Type": "application/json", "X-Tenant-Id": "a" * 63})
    assert ans.status == 200


# --- regressions the fuzzing found ---------------------------------------------------------


@pytest.mark.parametrize("target", ["gateway", "worker"])
def test_regressions(stack: Stack, target: str) -> None:
    base = stack.gateway if target == "gateway" else stack.worker
    errors_before = sum(r.levelno >= logging.ERROR for r in stack.logs.records)
    # A lone surrogate in a JSON enum made protobuf raise SystemError, whose text
    # ("<method 'get' of 'google._upb._message._ByNameMap' objects>") reached the client.
    ans = send(base, f"{SERVICE}/ListJobs", b'{"status": "\\ud800"}',
               {"Content-Type": "application/json", "X-Tenant-Id": "fuzz-a"})
    resp = json.loads(ans.body)
    assert (ans.status, resp["code"]) == (400, "invalid_argument")
    assert "Error" not in resp["message"] and "<" not in resp["message"]
    # A header that is not UTF-8 was a 500 with a traceback in the log.
    ans = send(base, f"{SERVICE}/ListJobs", b"{}",
               {"Content-Type": "application/json", "X-Tenant-Id": "fuzz-\xe9"})
    assert (ans.status, json.loads(ans.body)["code"]) == (400, "invalid_argument")
    # gRPC on uvicorn (no trailers) was grpc-status UNKNOWN with connectrpc's internal
    # message, and a logged traceback.
    ans = send(base, f"{SERVICE}/ListJobs", b"", {"Content-Type": "application/grpc",
                                                   "X-Tenant-Id": "fuzz-a"})
    assert ans.status == 415 and b"HTTP/2" in ans.body
    # Deeply nested JSON is refused without the word "recursion".
    ans = send(base, f"{SERVICE}/SubmitJob", b'{"image_uri":' + b"[" * 100_000 + b"]" * 100_000
               + b"}", {"Content-Type": "application/json", "X-Tenant-Id": "fuzz-a"})
    resp = json.loads(ans.body)
    assert (ans.status, resp["code"]) == (400, "invalid_argument")
    assert "recursion" not in resp["message"] and "nested too deeply" in resp["message"]
    assert sum(r.levelno >= logging.ERROR for r in stack.logs.records) == errors_before


def _token(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


HOSTILE = [
    ("GetJob", {"job_id": "j\u0000x"}),
    ("CancelJob", {"job_id": "\u0000"}),
    ("ListJobs", {"name_prefix": "a\u0000"}),
    ("ListJobs", {"labels": {"team": "a\u0000"}}),
    ("ListJobs", {"page_token": _token([1, "x\u0000y"])}),
    ("ListJobs", {"page_token": _token([1, "x" * 10_000])}),
    # A page token of JSON nested 5,000 deep was RecursionError → internal on every store.
    ("ListJobs", {"page_token": base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).decode()}),
    ("ListJobs", {"page_token": _token([2**80, "x"])}),
    ("ListJobs", {"status": "JOB_STATUS_BOGUS"}),
    ("ListJobs", {"status": 1099511627776}),
    ("ListJobs", {"status": 99}),
    ("SubmitJob", {"image_uri": "busybox", "comands": ["true"]}),
    ("SubmitJob", {"image_uri": "busybox", "commands": ["true"], "env_vars": {"A": "\u0000"}}),
    ("SubmitJob", {"image_uri": "busybox", "commands": ["true"], "name": "n\u0000"}),
    ("SubmitJob", {"image_uri": "busybox", "commands": ["true"], "request_id": "r\u0000"}),
    ("ListJobEvents", {"job_id": "j\u0000"}),
]


@pytest.mark.parametrize("target", ["gateway", "worker"])
@pytest.mark.parametrize(("method", "body"), HOSTILE, ids=[f"{m}-{i}" for i, (m, _) in
                                                          enumerate(HOSTILE)])
def test_hostile_values_are_invalid_argument(stack: Stack, target: str, method: str,
                                             body: dict[str, Any]) -> None:
    """NUL bytes, hostile page tokens, unknown fields and unknown enum values: each is
    ``invalid_argument`` on both apps and both stores, nothing is stored, nothing is logged
    at ERROR, and no raw NUL byte reaches the log."""
    base = stack.gateway if target == "gateway" else stack.worker
    errors_before = sum(r.levelno >= logging.ERROR for r in stack.logs.records)
    before = stack.counts()
    ans = send(base, f"{SERVICE}/{method}", json.dumps(body).encode(),
               {"Content-Type": "application/json", "X-Tenant-Id": "fuzz-a"})
    resp = json.loads(ans.body)
    assert (ans.status, resp["code"]) == (400, "invalid_argument"), resp
    assert stack.counts() == before
    assert sum(r.levelno >= logging.ERROR for r in stack.logs.records) == errors_before
    assert "\x00" not in stack.logs.text()


@pytest.mark.parametrize("target", ["gateway", "worker"])
def test_binary_enum_numbers_are_checked(stack: Stack, target: str) -> None:
    base = stack.gateway if target == "gateway" else stack.worker
    body = pb.ListJobsRequest(status=99).SerializeToString()  # type: ignore[arg-type]
    ans = send(base, f"{SERVICE}/ListJobs", body,
               {"Content-Type": "application/proto", "X-Tenant-Id": "fuzz-a"})
    assert ans.status == 400 and b"99 is not a JobStatus" in ans.body


@pytest.mark.parametrize("target", ["gateway", "worker"])
def test_echoed_ids_are_cut(stack: Stack, target: str) -> None:
    base = stack.gateway if target == "gateway" else stack.worker
    ans = send(base, f"{SERVICE}/GetJob", json.dumps({"job_id": "k" * 500_000}).encode(),
               {"Content-Type": "application/json", "X-Tenant-Id": "fuzz-a"})
    resp = json.loads(ans.body)
    assert resp["code"] == "not_found"
    assert "k" * 128 in resp["message"] and len(resp["message"]) < 200
