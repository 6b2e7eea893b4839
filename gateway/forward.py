"""Forward a call to the tenant's worker, failing over along the ring (docs/design.md §1).

Order of attempts: the ring's candidates for the tenant, minus the workers the health
view says are down; if every candidate is down, all of them anyway, in ring order (the
view may be stale, and trying beats refusing).

**What fails over.** Only a failure to reach the worker, never an answer from it:

* ``unavailable`` with **no HTTP response at all** (connection refused or reset, DNS,
  connect timeout: ``ResponseMetadata.http_status is None``);
* ``unavailable`` from HTTP 502/504 without a Connect error body: a proxy in front of
  the worker could not reach it (a worker itself answers ``unavailable`` with 503);
* ``unavailable`` carrying the ``WORKER_DRAINING`` ErrorInfo (``jennah.rpc.is_draining``):
  the worker is shutting down and refused the call before doing anything;
* ``unavailable`` that connectrpc raised *from* a non-Connect exception after the
  response began (the connection broke while reading it; connectrpc chains the
  transport exception as ``__cause__``, while a worker's own error has none).

A worker's own ``unavailable`` (its store or provider is down) arrives as a Connect
error body and is passed through unchanged: every worker shares that store, so trying
the next one would only multiply the load on something that is already failing. Every
other code (``not_found``, ``invalid_argument``, ``deadline_exceeded``...) is passed
through with its message and details.

A transport failure marks the worker down in the health view, so the following calls
skip it until its ``/health`` answers again.

**Retries after a lost response.** A unary call that failed after the worker received it
(reset mid-response) is retried on the next node. That is safe for reads; SubmitJob is
made safe by the gateway-assigned ``request_id`` (see ``gateway/service.py``); a retried
CancelJob or DeleteJob that had in fact succeeded reports ``failed_precondition`` or
``not_found``, which tells the truth about the job's final state.

**Deadlines.** A unary call's budget is the client's deadline (``connect-timeout-ms``),
capped by ``forward_timeout_seconds``, and is shared by all attempts: each attempt sends
the remaining time to the worker. A stream gets the client's deadline only (a watch may
legitimately last as long as its job) and fails over only before its first message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from connectrpc.client import ResponseMetadata
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from pyqwest import Client, HTTPTransport

from gateway.health import HealthView
from gateway.ring import TenantRing
from jennah.logging import bind
from jennah.rpc import TENANT_HEADER, WORKER_TOKEN_HEADER, is_draining
from jennah.tracing import inject_headers
from jennah.v1.deployment_connect import DeploymentServiceClient

log = logging.getLogger("jennah.gateway.forward")

RES = TypeVar("RES")
Headers = dict[str, str]
# (client, headers, timeout_ms) -> the call's result.
UnaryCall = Callable[[DeploymentServiceClient, Headers, int | None], Awaitable[RES]]
StreamCall = Callable[[DeploymentServiceClient, Headers, int | None], AsyncIterator[RES]]

PROXY_FAILURE_STATUSES = frozenset({502, 504})


def is_transport_failure(err: ConnectError, http_status: int | None) -> bool:
    """True when ``err`` means "the worker was not reached", not "the worker said so"."""
    if err.code != Code.UNAVAILABLE:
        return False
    if is_draining(err):  # the worker is shutting down: nothing was done
        return True
    if http_status is None or http_status in PROXY_FAILURE_STATUSES:
        return True
    cause = err.__cause__
    return cause is not None and not isinstance(cause, ConnectError)


def _reraise_cancellation(err: ConnectError) -> None:
    # connectrpc turns our task's cancellation (the gateway's own deadline expiring, or
    # its client going away) into ConnectError(CANCELED); put the cancellation back so
    # the server reports the deadline instead of "canceled".
    task = asyncio.current_task()
    if err.code == Code.CANCELED and task is not None and task.cancelling():
        raise asyncio.CancelledError() from err


async def _aclose(it: AsyncIterator[Any]) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        await aclose()


class Forwarder:
    """Per-worker Connect clients (binary proto, one shared HTTP pool) and the failover loop."""

    def __init__(
        self,
        ring: TenantRing,
        health: HealthView,
        *,
        worker_token: str,
        forward_timeout_seconds: float,
        http_client: Client | None = None,
        connect_timeout_seconds: float = 2.0,
        on_failover: Callable[[str], None] | None = None,
    ) -> None:
        self.ring = ring
        self.health = health
        self.forward_timeout_seconds = forward_timeout_seconds
        self._token = worker_token
        self._on_failover = on_failover
        self._transport: HTTPTransport | None = None
        if http_client is None:
            self._transport = HTTPTransport(
                connect_timeout=connect_timeout_seconds, pool_max_idle_per_host=64
            )
            http_client = Client(self._transport)
        self.http_client = http_client
        self._clients: dict[str, DeploymentServiceClient] = {}
        health.subscribe(self._set_workers)

    def _set_workers(self, urls: tuple[str, ...]) -> None:
        self.ring.set_nodes(urls)
        self._clients = {
            url: self._clients.get(url) or DeploymentServiceClient(
                url, http_client=self.http_client, send_compression=None, accept_compression=()
            )
            for url in urls
        }

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()

    def plan(self, tenant_id: str) -> list[str]:
        """The workers to try for ``tenant_id``, in order."""
        candidates = self.ring.candidates(tenant_id)
        return [u for u in candidates if self.health.healthy(u)] or candidates

    def headers(self, tenant_id: str) -> Headers:
        headers = {TENANT_HEADER: tenant_id}
        if self._token:
            headers[WORKER_TOKEN_HEADER] = self._token
        inject_headers(headers)  # W3C traceparent: the worker's span joins this trace
        bind(tenant_id=tenant_id)  # this call's log lines carry the authenticated tenant
        return headers

    def _deadline(self, client_timeout_ms: float | None, cap: bool) -> float | None:
        budgets = [client_timeout_ms / 1000] if client_timeout_ms is not None else []
        if cap:
            budgets.append(self.forward_timeout_seconds)
        return time.monotonic() + min(budgets) if budgets else None

    @staticmethod
    def _remaining_ms(deadline: float | None) -> int | None:
        if deadline is None:
            return None
        remaining = (deadline - time.monotonic()) * 1000
        if remaining <= 0:
            raise ConnectError(Code.DEADLINE_EXCEEDED, "deadline exceeded before forwarding")
        return max(1, int(remaining))

    def _failed(self, url: str, err: ConnectError, attempt: int, attempts: int) -> None:
        self.health.mark_down(url)
        log.warning("worker %s unreachable (%s); attempt %d/%d", url, err.message,
                    attempt + 1, attempts)
        if attempt + 1 < attempts and self._on_failover is not None:
            self._on_failover(url)

    @staticmethod
    def _exhausted(attempts: int) -> ConnectError:
        if attempts == 0:
            return ConnectError(Code.UNAVAILABLE, "no workers are configured")
        return ConnectError(Code.UNAVAILABLE, f"no worker is reachable (tried {attempts})")

    async def unary(
        self, tenant_id: str, client_timeout_ms: float | None, call: UnaryCall[RES]
    ) -> RES:
        """Run ``call`` against the tenant's workers until one answers."""
        deadline = self._deadline(client_timeout_ms, cap=True)
        plan = self.plan(tenant_id)
        headers = self.headers(tenant_id)
        for attempt, url in enumerate(plan):
            client = self._clients.get(url)
            if client is None:  # left the membership while we were trying others
                continue
            timeout_ms = self._remaining_ms(deadline)
            with ResponseMetadata() as meta:
                try:
                    return await call(client, headers, timeout_ms)
                except ConnectError as err:
                    _reraise_cancellation(err)
                    if not is_transport_failure(err, meta.http_status):
                        raise
                    failure = err
            self._failed(url, failure, attempt, len(plan))
        raise self._exhausted(len(plan))

    async def stream(
        self, tenant_id: str, client_timeout_ms: float | None, call: StreamCall[RES]
    ) -> AsyncGenerator[RES]:
        """Relay a server stream; fail over only until the first message arrives."""
        deadline = self._deadline(client_timeout_ms, cap=False)
        plan = self.plan(tenant_id)
        headers = self.headers(tenant_id)
        for attempt, url in enumerate(plan):
            client = self._clients.get(url)
            if client is None:
                continue
            upstream = call(client, headers, self._remaining_ms(deadline))
            try:
                with ResponseMetadata() as meta:
                    try:
                        first = await anext(upstream)
                    except StopAsyncIteration:
                        return
                    except ConnectError as err:
                        _reraise_cancellation(err)
                        if not is_transport_failure(err, meta.http_status):
                            raise
                        self._failed(url, err, attempt, len(plan))
                        continue
                yield first
                try:
                    async for item in upstream:
                        yield item
                except ConnectError as err:
                    _reraise_cancellation(err)
                    raise
                return
            finally:
                await _aclose(upstream)
        raise self._exhausted(len(plan))
