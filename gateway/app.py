"""Assemble the gateway: auth + ring + health view + forwarder, served as an ASGI app.

The Connect app sits beside ``/health`` (the process serves), ``/ready`` (at least one
worker answers its ``/health``), ``/metrics`` and ``/info`` (the worker view, as JSON).
The health task starts in the Connect app's lifespan, after one inline round of checks
so that ``/ready`` and the first calls see real worker states, and stops on shutdown.

Metrics go to the registry passed in (a private one by default), so several gateways can
live in one process (tests):

* ``jennah_gateway_requests_total{method,code}`` and
  ``jennah_gateway_request_duration_seconds{method}``, from an interceptor outside the
  error mapper, so ``code`` is exactly what the client received;
* ``jennah_gateway_failovers_total``: attempts moved on to the next worker;
* ``jennah_gateway_worker_up{worker}``: read from the health view at scrape time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from connectrpc.request import RequestContext
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pyqwest import Client, HTTPTransport

from database.base import JobStore
from gateway.auth import TenantAuth
from gateway.console import Console
from gateway.forward import Forwarder
from gateway.health import Discover, HealthView, store_discovery
from gateway.keys import KeyStore
from gateway.ring import TenantRing
from gateway.service import GatewayService
from gateway.sse import with_sse
from jennah.asgi import ASGIApp, compose, with_cors
from jennah.rpc import ErrorMapper, RequestMetrics, safe_codecs
from jennah.settings import GatewaySettings
from jennah.tracing import TracingInterceptor
from jennah.v1.deployment_connect import DeploymentServiceASGIApplication

log = logging.getLogger("jennah.gateway")

REQ = TypeVar("REQ")
RES = TypeVar("RES")

HEALTH_TIMEOUT_SECONDS = 1.0
# Workers heartbeat every WORKER_CLAIM_INTERVAL_SECONDS (5 s by default): three missed
# beats and a worker leaves the discovered membership.
DISCOVERY_MAX_AGE_SECONDS = 15.0


class WorkerUpCollector(Collector):
    """``jennah_gateway_worker_up{worker}``: 1 if the health view has the worker up."""

    def __init__(self, health: HealthView) -> None:
        self.health = health

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "jennah_gateway_worker_up", "1 if the worker is considered healthy", labels=["worker"]
        )
        for url in self.health.members:
            gauge.add_metric([url], 1.0 if self.health.healthy(url) else 0.0)
        yield gauge


@dataclass
class GatewayMetrics:
    requests: Counter
    duration: Histogram
    failovers: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry, health: HealthView) -> GatewayMetrics:
        registry.register(WorkerUpCollector(health))
        return cls(
            requests=Counter(
                "jennah_gateway_requests_total", "RPCs served by the gateway",
                ["method", "code"], registry=registry,
            ),
            duration=Histogram(
                "jennah_gateway_request_duration_seconds", "RPC duration at the gateway",
                ["method"], registry=registry,
            ),
            failovers=Counter(
                "jennah_gateway_failovers_total", "attempts moved to the next worker",
                registry=registry,
            ),
        )

    def observe(self, ctx: RequestContext[Any, Any], code: str, started: float) -> None:
        method = ctx.method.name
        self.requests.labels(method=method, code=code).inc()
        self.duration.labels(method=method).observe(time.perf_counter() - started)


def create_app(
    settings: GatewaySettings,
    *,
    registry: CollectorRegistry | None = None,
    discover: Discover | None = None,
    store: JobStore | None = None,
) -> ASGIApp:
    """The gateway ASGI app. ``discover`` overrides store-based worker discovery; with
    ``settings.discover_from_store`` the given ``store`` (or one built from the settings,
    then closed on shutdown) lists the workers that heartbeat."""
    registry = registry if registry is not None else CollectorRegistry()
    keys: KeyStore | None = None
    if settings.api_keys_file:
        keys = KeyStore(settings.api_keys_file)
        keys.load()  # a missing or malformed file stops start-up (SettingsError, one line)
    owned_store: JobStore | None = None
    if discover is None and settings.discover_from_store:
        if store is None:
            from database import create_store

            store = owned_store = create_store(settings.store)
        discover = store_discovery(store, DISCOVERY_MAX_AGE_SECONDS)

    transport = HTTPTransport(connect_timeout=2.0, pool_max_idle_per_host=64)
    http_client = Client(transport)
    health = HealthView(
        settings.worker_endpoints, interval=settings.health_interval_seconds,
        timeout=HEALTH_TIMEOUT_SECONDS, client=http_client, discover=discover,
    )
    metrics = GatewayMetrics.create(registry, health)
    forwarder = Forwarder(
        TenantRing(), health,
        worker_token=settings.worker_token,
        forward_timeout_seconds=settings.forward_timeout_seconds,
        http_client=http_client,
        on_failover=lambda url: metrics.failovers.inc(),
    )
    auth = TenantAuth(dev_mode=settings.dev_mode, keys=keys,
                      trusted_proxies=settings.trusted_proxies)
    service = GatewayService(auth, forwarder)

    async def lifecycle() -> AsyncGenerator[GatewayService]:
        await health.start()
        log.info("gateway started: %d/%d workers healthy%s", health.healthy_count(),
                 len(health.members), " (dev mode)" if settings.dev_mode else "")
        try:
            yield service
        finally:
            log.info("gateway stopping")
            await health.stop()
            await transport.aclose()
            if owned_store is not None:
                owned_store.close()

    rpc = DeploymentServiceASGIApplication(
        lifecycle(),
        interceptors=[TracingInterceptor("gateway", tenant_from_header=False),
                      RequestMetrics(metrics.requests, metrics.duration), ErrorMapper()],
        read_max_bytes=settings.read_max_bytes, codecs=safe_codecs(),
    )

    async def ready() -> tuple[bool, str]:
        up = health.healthy_count()
        return up > 0, f"{up}/{len(health.members)} workers healthy"

    def info() -> dict[str, Any]:
        states = {True: "up", False: "down", None: "unknown"}
        return {
            "role": "gateway",
            "dev_mode": settings.dev_mode,
            "health_rounds": health.rounds,
            "workers": {url: states[health.known_state(url)] for url in health.members},
        }

    # SSE (GET /v1/...) beside the Connect paths, behind compose's header checks.
    app = compose(with_sse(rpc, auth, forwarder), ready=ready, registry=registry, info=info)
    app = Console(dev_mode=settings.dev_mode).mount(app)  # the web console at /ui/
    return with_cors(app, settings.cors_origins) if settings.cors_origins else app
