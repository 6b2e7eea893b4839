"""The RPC boundary: the only place where Jennah errors become Connect codes.

``ErrorMapper`` is a Connect interceptor for both unary and server-streaming methods.
Domain errors map to their codes (DESIGN §11 table); any other exception becomes
``internal`` with a generic message, so internals never reach clients (connectrpc would
otherwise send the exception text).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from jennah import errors

log = logging.getLogger("jennah.rpc")

REQ = TypeVar("REQ")
RES = TypeVar("RES")

# Order matters: subclasses before their bases.
_CODES: tuple[tuple[type[errors.JennahError], Code], ...] = (
    (errors.InvalidArgument, Code.INVALID_ARGUMENT),
    (errors.Unauthenticated, Code.UNAUTHENTICATED),
    (errors.NotFound, Code.NOT_FOUND),
    (errors.FailedPrecondition, Code.FAILED_PRECONDITION),
    (errors.ResourceExhausted, Code.RESOURCE_EXHAUSTED),
    (errors.StoreUnavailable, Code.UNAVAILABLE),
    (errors.ProviderQuotaExceeded, Code.RESOURCE_EXHAUSTED),
    (errors.ProviderUnavailable, Code.UNAVAILABLE),
    (errors.ProviderRejected, Code.FAILED_PRECONDITION),
    (errors.Conflict, Code.ABORTED),
    (errors.LeaseLost, Code.ABORTED),
)

GENERIC_INTERNAL = "internal error"


def to_connect_error(exc: BaseException) -> ConnectError:
    """The ConnectError a client should see for ``exc``."""
    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, errors.JennahError):
        for cls, code in _CODES:
            if isinstance(exc, cls):
                message = str(exc)
                if isinstance(exc, errors.ResourceExhausted) and exc.retry_after_seconds:
                    message += f" (retry after {exc.retry_after_seconds:.1f}s)"
                return ConnectError(code, message)
    log.exception("unhandled error in RPC", exc_info=exc)
    return ConnectError(Code.INTERNAL, GENERIC_INTERNAL)


class ErrorMapper:
    """Connect interceptor mapping exceptions to Connect errors (unary and streaming)."""

    async def intercept_unary(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], Awaitable[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
        /,
    ) -> RES:
        try:
            return await call_next(request, ctx)
        except Exception as exc:
            raise to_connect_error(exc) from None

    async def intercept_server_stream(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], AsyncIterator[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
        /,
    ) -> AsyncIterator[RES]:
        try:
            async for item in call_next(request, ctx):
                yield item
        except Exception as exc:
            raise to_connect_error(exc) from None


# Headers shared by the gateway and the workers (DESIGN §7).
TENANT_HEADER = "x-tenant-id"
WORKER_TOKEN_HEADER = "x-jennah-worker-token"
WORKER_ID_HEADER = "x-jennah-worker-id"
