"""OpenTelemetry: one SubmitJob through gateway + worker is one trace (jennah/tracing.py).

* In-process servers with an in-memory exporter: the gateway's SERVER span, the worker's
  SERVER span (its child, through the forwarded ``traceparent``) and the provider's
  CLIENT span share one trace id, and a caller's own ``traceparent`` is continued.
* Real ``jennah worker`` and ``jennah gateway`` processes exporting over OTLP/HTTP to a
  collector in this test: spans from both services arrive under one trace id.
* Not configured: ``configure_tracing`` installs nothing, spans do not record, and real
  processes print no spans.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

from gateway.app import create_app as create_gateway
from jennah import tracing
from jennah.errors import SettingsError
from jennah.settings import load_gateway_settings, load_worker_settings
from tests.helpers import REPO, ThreadServer, call, free_port, stop, wait_http, wait_until
from worker.app import create_app as create_worker

pytestmark = pytest.mark.timeout(60)

TENANT = {"X-Tenant-Id": "acme"}
SECRET = "tracing-secret-value-31337"
JOB = {"image_uri": "busybox", "commands": ["true"], "env_vars": {"A": SECRET}}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    old = tracing.use_provider(provider)
    try:
        yield exporter
    finally:
        tracing.use_provider(old)
        provider.shutdown()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[str]:
    """A dev-mode worker (dry provider) and a gateway in front of it; yields the gateway URL."""
    wenv = {"JENNAH_DEV_MODE": "1", "JENNAH_HOME": str(tmp_path), "WORKER_ID": "tw-1",
            "BATCH_PROVIDER": "dry", "WORKER_POLL_INTERVAL_SECONDS": "0.2"}
    worker_app = create_worker(load_worker_settings(wenv), registry=CollectorRegistry())
    with ThreadServer(worker_app) as worker:
        genv = {"JENNAH_DEV_MODE": "1", "WORKER_ENDPOINTS": worker.url,
                "GATEWAY_HEALTH_INTERVAL_SECONDS": "0.2"}
        gateway_app = create_gateway(load_gateway_settings(genv), registry=CollectorRegistry())
        with ThreadServer(gateway_app) as gateway:
            wait_http(f"{gateway.url}/ready", timeout=10)
            yield gateway.url


def _by_name(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


def test_submit_through_gateway_is_one_trace(
    spans: InMemorySpanExporter, servers: str
) -> None:
    status, body = call(servers, "SubmitJob", JOB, TENANT)
    assert status == 200, body
    # The worker's SERVER span ends before the gateway's: wait for both to be exported.
    name = "jennah.v1.DeploymentService/SubmitJob"
    finished = wait_until(lambda: (f := spans.get_finished_spans())
                          and len(_by_name(f, name)) == 2 and f, timeout=5)
    servers_spans = _by_name(finished, name)
    roles = {s.attributes["jennah.role"]: s for s in servers_spans if s.attributes}
    gw, wk = roles["gateway"], roles["worker"]
    assert gw.kind is SpanKind.SERVER and wk.kind is SpanKind.SERVER
    assert gw.parent is None  # the client sent no traceparent: the gateway starts the trace
    assert wk.parent is not None and wk.parent.span_id == gw.context.span_id
    # The poller may also submit the job (same provider id, deduped) if it sees it before
    # the RPC records the resource path: that span is its own trace. Ours is the child.
    submit = [s for s in _by_name(finished, "provider.submit")
              if s.attributes and s.attributes["jennah.job_id"] == body["jobId"]
              and s.parent is not None and s.parent.span_id == wk.context.span_id]
    assert len(submit) == 1
    assert submit[0].kind is SpanKind.CLIENT
    trace_ids = {gw.context.trace_id, wk.context.trace_id, submit[0].context.trace_id}
    assert len(trace_ids) == 1
    # No request body in span attributes: env var names or values never appear.
    for span in finished:
        values = " ".join(str(v) for v in (span.attributes or {}).values())
        assert SECRET not in values and "busybox" not in values


def test_callers_traceparent_is_continued(spans: InMemorySpanExporter, servers: str) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    headers = {**TENANT, "traceparent": f"00-{trace_id}-{parent}-01"}
    status, body = call(servers, "GetJob", {"job_id": "no-such-job"}, headers)
    assert status == 404 and body["code"] == "not_found"
    name = "jennah.v1.DeploymentService/GetJob"
    finished = wait_until(lambda: (f := spans.get_finished_spans())
                          and len(_by_name(f, name)) == 2 and f, timeout=5)
    got = _by_name(finished, name)
    assert {format(s.context.trace_id, "032x") for s in got} == {trace_id}
    gw = next(s for s in got if s.attributes and s.attributes["jennah.role"] == "gateway")
    assert gw.parent is not None and format(gw.parent.span_id, "016x") == parent
    assert all(s.attributes and s.attributes["rpc.connect_rpc.error_code"] == "not_found"
               for s in got)


def test_tracing_mode_from_env() -> None:
    assert tracing.tracing_mode({}) == "off"
    assert tracing.tracing_mode({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == "otlp"
    assert tracing.tracing_mode({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c/v1"}) == "otlp"
    assert tracing.tracing_mode({"JENNAH_OTEL": "console"}) == "console"
    assert tracing.tracing_mode({"JENNAH_OTEL": "off",
                                 "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == "off"
    with pytest.raises(SettingsError, match="JENNAH_OTEL"):
        tracing.tracing_mode({"JENNAH_OTEL": "jaeger"})


def test_not_configured_installs_nothing_and_records_nothing() -> None:
    # In a fresh interpreter: the process-global provider must stay the API default.
    code = (
        "from opentelemetry import trace\n"
        "from jennah import tracing\n"
        "assert tracing.configure_tracing('worker', {}) is None\n"
        "span = tracing.tracer().start_span('x')\n"
        "assert not span.is_recording(), 'span records without configuration'\n"
        "assert type(trace.get_tracer_provider()).__name__ == 'ProxyTracerProvider'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=30, env={**os.environ, "JENNAH_OTEL": ""})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


class _Collector:
    """A minimal OTLP/HTTP trace receiver: POST /v1/traces with a protobuf body."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, bytes, bytes]] = []  # service, name, trace, parent
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                with collector.lock:
                    for rs in req.resource_spans:
                        service = next((a.value.string_value for a in rs.resource.attributes
                                        if a.key == "service.name"), "")
                        for ss in rs.scope_spans:
                            for sp in ss.spans:
                                collector.spans.append(
                                    (service, sp.name, sp.trace_id, sp.parent_span_id))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Collector:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _start(role: str, env: dict[str, str], tmp: Path) -> subprocess.Popen[bytes]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "JENNAH_"))}
    full.pop("PORT", None)
    full.update(env)
    # The child keeps its own copies of the descriptors.
    with (tmp / f"{role}.out").open("wb") as out, (tmp / f"{role}.err").open("wb") as err:
        return subprocess.Popen([sys.executable, "-m", "jennah", role], env=full, cwd=REPO,
                                stdout=out, stderr=err)


def _pair(tmp_path: Path, otel: dict[str, str]) -> tuple[subprocess.Popen[bytes],
                                                          subprocess.Popen[bytes], str]:
    wport, gport = free_port(), free_port()
    worker = _start("worker", {
        "JENNAH_DEV_MODE": "1", "JENNAH_HOME": str(tmp_path), "WORKER_PORT": str(wport),
        "WORKER_ID": "ot-1", "BATCH_PROVIDER": "dry", **otel}, tmp_path)
    wait_http(f"http://127.0.0.1:{wport}/health", proc=worker)
    gateway = _start("gateway", {
        "JENNAH_DEV_MODE": "1", "GATEWAY_PORT": str(gport), "GATEWAY_HEALTH_INTERVAL_SECONDS":
        "0.2", "WORKER_ENDPOINTS": f"http://127.0.0.1:{wport}", **otel}, tmp_path)
    url = f"http://127.0.0.1:{gport}"
    wait_http(f"{url}/ready", proc=gateway)
    return worker, gateway, url


@pytest.mark.e2e
def test_real_processes_export_one_trace_over_otlp(tmp_path: Path) -> None:
    with _Collector() as collector:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        worker, gateway, url = _pair(tmp_path, otel)
        try:
            status, body = call(url, "SubmitJob", JOB, TENANT)
            assert status == 200, body

            def submit_trace() -> set[str] | None:
                with collector.lock:
                    got = list(collector.spans)
                by_trace: dict[bytes, set[str]] = {}
                for service, name, trace_id, _ in got:
                    by_trace.setdefault(trace_id, set()).add(f"{service}:{name}")
                want = {"jennah-gateway:jennah.v1.DeploymentService/SubmitJob",
                        "jennah-worker:jennah.v1.DeploymentService/SubmitJob",
                        "jennah-worker:provider.submit"}
                return next((names for names in by_trace.values() if want <= names), None)

            assert wait_until(submit_trace, timeout=10)
        finally:
            stop(gateway)
            stop(worker)


@pytest.mark.e2e
def test_real_processes_export_nothing_when_off(tmp_path: Path) -> None:
    with _Collector() as collector:
        # An endpoint is set but JENNAH_OTEL=off wins; no console spans either.
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "100",
                "JENNAH_OTEL": "off"}
        worker, gateway, url = _pair(tmp_path, otel)
        try:
            status, _ = call(url, "SubmitJob", JOB, TENANT)
            assert status == 200
        finally:
            stop(gateway)
            stop(worker)
        assert collector.spans == []
    for role in ("worker", "gateway"):
        for stream in ("out", "err"):
            text = (tmp_path / f"{role}.{stream}").read_text()
            assert '"trace_id"' not in text and "traceparent" not in text, text[:2000]


def test_console_mode_prints_spans_to_stderr(tmp_path: Path) -> None:
    port = free_port()
    worker = _start("worker", {
        "JENNAH_DEV_MODE": "1", "JENNAH_HOME": str(tmp_path), "WORKER_PORT": str(port),
        "WORKER_ID": "oc-1", "BATCH_PROVIDER": "dry", "JENNAH_OTEL": "console",
        "JENNAH_LOG_FORMAT": "json"}, tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=worker)
        status, _ = call(f"http://127.0.0.1:{port}", "GetCurrentTenant", {}, TENANT)
        assert status == 200
    finally:
        stop(worker)
    err = (tmp_path / "worker.err").read_text()
    assert '"name": "jennah.v1.DeploymentService/GetCurrentTenant"' in err
    # stdout stays pure JSON lines (spans go to stderr).
    for line in (tmp_path / "worker.out").read_text().splitlines():
        json.loads(line)
