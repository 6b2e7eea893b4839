"""OpenTelemetry tracing: gateway -> worker -> provider call, exported only when asked.

**When spans are exported.** :func:`configure_tracing` installs an SDK tracer provider
only when

* ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set:
  spans go to that collector over OTLP/HTTP (protobuf), batched. The exporter reads the
  standard ``OTEL_EXPORTER_OTLP_*`` variables itself (headers, timeout, ...); or
* ``JENNAH_OTEL=console``: spans are printed to **stderr** as JSON, for debugging
  (stdout is kept for the structured log lines).

``JENNAH_OTEL=off`` disables tracing even with an endpoint set. Otherwise the OpenTelemetry
API stays at its no-op default: spans are non-recording, cost next to nothing, and
nothing is exported. The W3C ``traceparent`` a caller sent is still passed on, so a
traced client's trace continues through an untraced gateway.

**What is traced.**

* :class:`TracingInterceptor`: one SERVER span per RPC (``jennah.v1.DeploymentService/
  SubmitJob``), the parent taken from the request's ``traceparent``/``tracestate``
  headers. It also binds ``tenant_id`` and ``job_id`` for the log lines of the call.
* :func:`inject_headers`: the gateway's forwarded calls carry the current span as
  ``traceparent`` (``gateway/forward.py``), so the worker's span is its child.
* ``worker.metrics.InstrumentedProvider``: a CLIENT span around each provider
  ``submit``, ``status`` and ``cancel`` call (a child of the RPC span for a submit, a
  root span for the poller's background polls).

Span attributes never include request bodies: no env var values, no commands.
Sampling follows the SDK's standard variables (``OTEL_TRACES_SAMPLER=parentbased_traceidratio``
and ``OTEL_TRACES_SAMPLER_ARG=0.1`` keep a tenth of the traces; the default keeps all),
which matters because every poll cycle's ``provider.status`` call is a trace of its own.

**Tests.** :func:`use_provider` points Jennah's tracer at a given SDK provider (for an
in-memory exporter) without touching the process-global one.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from typing import Any, TypeVar

from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, TracerProvider

from jennah.errors import SettingsError
from jennah.logging import job_id_var, tenant_id_var, unbind
from jennah.rpc import TENANT_HEADER

REQ = TypeVar("REQ")
RES = TypeVar("RES")

TRACER_NAME = "jennah"
OTEL_MODES = ("", "otlp", "console", "off")

_provider: TracerProvider | None = None
TRACEPARENT = "traceparent"


def use_provider(provider: TracerProvider | None) -> TracerProvider | None:
    """Make Jennah's spans go to ``provider`` (None: the global one); return the old one."""
    global _provider
    old, _provider = _provider, provider
    return old


def tracer() -> Tracer:
    return trace.get_tracer(TRACER_NAME, tracer_provider=_provider)


def tracing_mode(env: Mapping[str, str]) -> str:
    """``otlp``, ``console`` or ``off`` for ``env``; SettingsError for a bad JENNAH_OTEL."""
    mode = env.get("JENNAH_OTEL", "").strip().lower()
    if mode not in OTEL_MODES:
        raise SettingsError(f"invalid tracing settings: JENNAH_OTEL={mode!r} "
                            "(expected console, otlp or off)")
    endpoint = (env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
                or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip())
    if mode == "console":
        return "console"
    if mode == "off" or not endpoint:
        return "off"
    return "otlp"


def configure_tracing(service: str, env: Mapping[str, str]) -> TracerProvider | None:
    """Install the global SDK tracer provider for ``service`` if tracing is configured
    (see the module docstring); return it, or None when nothing will be exported."""
    mode = tracing_mode(env)
    if mode == "off":
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": f"jennah-{service}"}
    provider = SdkTracerProvider(resource=Resource.create(attributes))
    if mode == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    trace.set_tracer_provider(provider)
    use_provider(provider)
    return provider


def inject_headers(headers: MutableMapping[str, str]) -> None:
    """Add the current span's W3C ``traceparent`` (and ``tracestate``) to ``headers``."""
    propagate.inject(headers)


def _span_name(ctx: RequestContext[Any, Any]) -> str:
    return f"{ctx.method.service_name}/{ctx.method.name}"


def _attributes(ctx: RequestContext[Any, Any], service: str) -> dict[str, str]:
    return {
        "rpc.system": "connect_rpc",
        "rpc.service": ctx.method.service_name,
        "rpc.method": ctx.method.name,
        "jennah.role": service,
    }


def _fail(span: trace.Span, exc: BaseException) -> None:
    code = exc.code.value if isinstance(exc, ConnectError) else type(exc).__name__
    span.set_attribute("rpc.connect_rpc.error_code", code)
    span.set_status(Status(StatusCode.ERROR, code))


class TracingInterceptor:
    """A SERVER span per RPC, continuing the caller's trace; binds log context.

    Put it first in the interceptor list, so the span covers the other interceptors and
    the error mapper's log line carries the trace id.
    """

    def __init__(self, service: str, *, tenant_from_header: bool = True) -> None:
        # The worker trusts X-Tenant-Id (the gateway set it after auth); the gateway must
        # not log a tenant the caller merely claimed: it binds the authenticated one in
        # ``Forwarder.headers``.
        self.service = service
        self.tenant_from_header = tenant_from_header

    def _bind(self, request: object, ctx: RequestContext[Any, Any]) -> Any:
        # Always set both (to None when unknown), so that whatever the call binds further
        # in (the gateway binds the authenticated tenant) is undone when the call ends.
        job_id = getattr(request, "job_id", "")
        tenant = None
        if self.tenant_from_header:
            tenant = ctx.request_headers.get(TENANT_HEADER, "")[:64] or None
        return [(tenant_id_var, tenant_id_var.set(tenant)),
                (job_id_var, job_id_var.set(job_id if isinstance(job_id, str) and job_id
                                            else None))]

    async def intercept_unary(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], Awaitable[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
        /,
    ) -> RES:
        tokens = self._bind(request, ctx)
        if _provider is None and TRACEPARENT not in ctx.request_headers:
            # Tracing off and no trace to pass on: no span, no context (a noticeable share
            # of a forwarded call's CPU at the gateway).
            try:
                return await call_next(request, ctx)
            finally:
                unbind(tokens)
        parent = propagate.extract(ctx.request_headers)
        try:
            with tracer().start_as_current_span(
                _span_name(ctx), context=parent, kind=SpanKind.SERVER,
                attributes=_attributes(ctx, self.service),
                record_exception=False, set_status_on_exception=False,
            ) as span:
                try:
                    return await call_next(request, ctx)
                except BaseException as exc:
                    _fail(span, exc)
                    raise
        finally:
            unbind(tokens)

    async def intercept_server_stream(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], AsyncIterator[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
        /,
    ) -> AsyncIterator[RES]:
        parent = propagate.extract(ctx.request_headers)
        tokens = self._bind(request, ctx)
        try:
            with tracer().start_as_current_span(
                _span_name(ctx), context=parent, kind=SpanKind.SERVER,
                attributes=_attributes(ctx, self.service),
                record_exception=False, set_status_on_exception=False,
            ) as span:
                try:
                    async for item in call_next(request, ctx):
                        yield item
                except BaseException as exc:
                    _fail(span, exc)
                    raise
        finally:
            unbind(tokens)
