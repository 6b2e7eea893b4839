"""The RPC boundary: the only place where Jennah errors become Connect codes.

``ErrorMapper`` is a Connect interceptor for both unary and server-streaming methods.
Domain errors map to their codes (docs/design.md §11 table); any other exception becomes
``internal`` with a generic message, so internals never reach clients (connectrpc would
otherwise send the exception text).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from connectrpc.code import Code
from connectrpc.codec import Codec
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.errors import ConnectError, ErrorDetail
from connectrpc.request import RequestContext
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc.error_details_pb2 import (  # type: ignore[import-untyped]
    ErrorInfo,
    RetryInfo,
)
from protobuf.wkt import Any as AnyDetail

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
    (errors.ShuttingDown, Code.UNAVAILABLE),
    (errors.ProviderQuotaExceeded, Code.RESOURCE_EXHAUSTED),
    (errors.ProviderUnavailable, Code.UNAVAILABLE),
    (errors.ProviderRejected, Code.FAILED_PRECONDITION),
    (errors.Conflict, Code.ABORTED),
    (errors.LeaseLost, Code.ABORTED),
)

GENERIC_INTERNAL = "internal error"
RETRY_INFO_TYPE = "google.rpc.RetryInfo"
ERROR_INFO_TYPE = "google.rpc.ErrorInfo"
# The ``google.rpc.ErrorInfo`` a draining worker's ``unavailable`` carries (ShuttingDown):
# the gateway fails over on it exactly as on a worker it could not reach, because the
# worker did nothing. A typed marker, so that no one compares message text.
ERROR_DOMAIN = "jennah.dev"
DRAINING_REASON = "WORKER_DRAINING"


def _draining_detail() -> ErrorDetail:
    info = ErrorInfo(reason=DRAINING_REASON, domain=ERROR_DOMAIN)
    return ErrorDetail(AnyDetail(type_url=f"type.googleapis.com/{ERROR_INFO_TYPE}",
                                 value=info.SerializeToString()))


def is_draining(err: ConnectError) -> bool:
    """True when ``err`` is a worker's "shutting down, nothing done, retry elsewhere"."""
    for detail in err.details:
        if detail.type_name == ERROR_INFO_TYPE:
            info = ErrorInfo.FromString(detail.message_bytes)
            if info.domain == ERROR_DOMAIN and info.reason == DRAINING_REASON:
                return True
    return False


def retry_info_detail(seconds: float) -> ErrorDetail:
    """A ``google.rpc.RetryInfo`` error detail (what gRPC and Connect clients look for)."""
    whole = math.floor(seconds)
    info = RetryInfo(retry_delay=Duration(seconds=whole, nanos=int((seconds - whole) * 1e9)))
    return ErrorDetail(AnyDetail(type_url=f"type.googleapis.com/{RETRY_INFO_TYPE}",
                                 value=info.SerializeToString()))


def retry_after_of(err: ConnectError) -> float | None:
    """The retry delay carried by ``err``'s RetryInfo detail, if any (also for errors
    relayed from a worker through the gateway)."""
    for detail in err.details:
        if detail.type_name == RETRY_INFO_TYPE:
            info = RetryInfo.FromString(detail.message_bytes)
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


def encodable(text: str) -> str:
    """``text`` with anything UTF-8 cannot carry (lone surrogates echoed from a request)
    escaped, so that the error body can be written at all."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def to_connect_error(exc: BaseException) -> ConnectError:
    """The ConnectError a client should see for ``exc``."""
    if isinstance(exc, ConnectError):
        clean = encodable(exc.message)
        return exc if clean == exc.message else ConnectError(exc.code, clean, exc.details)
    if isinstance(exc, errors.JennahError):
        for cls, code in _CODES:
            if isinstance(exc, cls):
                message = encodable(str(exc))
                if isinstance(exc, errors.ResourceExhausted) and exc.retry_after_seconds:
                    wait = math.ceil(exc.retry_after_seconds * 10) / 10
                    # The message ends "retry after N s", N whole seconds as in the
                    # retry-after header; RetryInfo keeps the tenths.
                    message += f"; retry after {max(1, math.ceil(wait))} s"
                    return ConnectError(code, message, [retry_info_detail(wait)])
                if isinstance(exc, errors.ShuttingDown):
                    return ConnectError(code, message, [_draining_detail()])
                return ConnectError(code, message)
    log.exception("unhandled error in RPC", exc_info=exc)
    return ConnectError(Code.INTERNAL, GENERIC_INTERNAL)


def _mapped(exc: Exception, ctx: RequestContext[Any, Any]) -> ConnectError:
    err = to_connect_error(exc)
    wait = retry_after_of(err) if err.details else None
    if wait is not None:
        # HTTP's Retry-After is whole seconds (RFC 9110); round up.
        ctx.response_headers["retry-after"] = str(max(1, math.ceil(wait)))
    return err


# Text that is Python's, not the client's: exception class names, object reprs, addresses,
# source files.
_INTERNAL_TEXT = re.compile(
    r"[A-Z][A-Za-z]+(?:Error|Exception)\b|<[^>]*>|0x[0-9a-fA-F]{6,}|\.py\b|Traceback"
)


class SafeDecodeCodec:
    """A codec whose decode failures never carry Python internals to the client, and that
    refuses what protobuf would otherwise let through silently (docs/design.md §8).

    connectrpc decodes a request before any interceptor runs and reports a failure as
    ``invalid_argument`` with the exception's text, which can be an internal error from the
    protobuf runtime (for example ``SystemError: <method 'get' of ... objects>`` for a lone
    surrogate in a JSON enum). Helpful parser messages ("Failed to parse max_retries
    field: ...") are kept; anything that looks like Python internals is replaced.

    A decoded message is then checked by :func:`refuse_hostile`: no NUL byte in any string
    and no enum number the schema does not define. With ``json=True`` the JSON codec is
    strict (unknown field names and enum names are errors, as protojson and connect-go do
    by default), and integer enum values are checked in the JSON text itself, because
    ``json_format`` drops one that does not fit in 32 bits without a word.
    """

    def __init__(self, inner: Codec, *, json: bool = False) -> None:
        self._inner = inner
        self._json = json

    def name(self) -> str:
        return self._inner.name()

    def encode(self, message: Any) -> bytes:
        if self._json:  # compact, as curl users read it (the stock codec indents by 2)
            return json.dumps(json_format.MessageToDict(message), separators=(",", ":"),
                              ensure_ascii=False).encode()
        return self._inner.encode(message)

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        try:
            message = self._inner.decode(data, message_class)
            if self._json and _has_enums(message.DESCRIPTOR):
                _refuse_json_enum_numbers(json.loads(data), message.DESCRIPTOR)
            refuse_hostile(message)
            return message
        except HostileValue as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, encodable(str(exc))) from None
        except RecursionError:
            text = "the request is nested too deeply"
        except UnicodeDecodeError:
            text = "the request is not valid UTF-8"
        except Exception as exc:
            text = str(exc)
            if "maximum recursion depth" in text:  # json_format wraps the RecursionError
                text = "the request is nested too deeply"
            elif _INTERNAL_TEXT.search(text):
                text = f"the request is not a valid {message_class.__name__}"
        raise ConnectError(Code.INVALID_ARGUMENT, f"unmarshal message: {encodable(text)}") from None


class HostileValue(ValueError):
    """A decoded request holds a value no handler should see."""


_STRING = FieldDescriptor.TYPE_STRING
_ENUM = FieldDescriptor.TYPE_ENUM
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def refuse_hostile(message: Message, path: str = "") -> None:
    """Raise :class:`HostileValue` if any string in ``message`` (map keys and values,
    nested messages included) holds a NUL byte, or any enum field holds a number its
    enum does not define. Only the fields that are set are visited."""
    for field, value in message.ListFields():
        name = path + field.name
        if field.type == _STRING:
            for text in (value if _repeated(field) else (value,)):
                if "\x00" in text:
                    raise HostileValue(f"{name}: must not contain a NUL byte")
        elif field.type == _ENUM:
            for number in (value if _repeated(field) else (value,)):
                if not _defined(field, number):
                    raise HostileValue(f"{name}: {number} is not a {field.enum_type.name}")
        elif field.type == _MESSAGE:
            if field.message_type.GetOptions().map_entry:
                _refuse_hostile_map(field, value, name)
            else:
                for item in (value if _repeated(field) else (value,)):
                    refuse_hostile(item, name + ".")


def _refuse_hostile_map(field: FieldDescriptor, entries: Any, name: str) -> None:
    key_field = field.message_type.fields_by_name["key"]
    value_field = field.message_type.fields_by_name["value"]
    for key in entries:
        if key_field.type == _STRING and "\x00" in key:
            raise HostileValue(f"{name}: a key must not contain a NUL byte")
        item = entries[key]
        if value_field.type == _STRING and "\x00" in item:
            raise HostileValue(f"{name}[{errors.echoed(key)!r}]: must not contain a NUL byte")
        if value_field.type == _MESSAGE:
            refuse_hostile(item, f"{name}[{errors.echoed(key)!r}].")


def _defined(field: FieldDescriptor, number: int) -> bool:
    # The range check first: upb looks a number up by its low 32 bits, so 2**40 "is" 0.
    return -(2**31) <= number < 2**31 and number in field.enum_type.values_by_number


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


@functools.cache
def _has_enums(descriptor: Descriptor) -> bool:
    return any(f.type == _ENUM or (f.type == _MESSAGE and _has_enums(f.message_type))
               for f in descriptor.fields)


def _refuse_json_enum_numbers(value: Any, descriptor: Descriptor) -> None:
    """Integer enum values in a JSON request must be defined (json_format keeps an
    undefined one that fits in 32 bits, which :func:`refuse_hostile` then sees, but drops a
    larger one silently)."""
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        field = descriptor.fields_by_camelcase_name.get(key) or descriptor.fields_by_name.get(key)
        if field is None:
            continue
        items = item if isinstance(item, list) else [item]
        if field.type == _ENUM:
            for number in items:
                if isinstance(number, int) and not _defined(field, number):
                    raise HostileValue(f"{field.name}: {number} is not a {field.enum_type.name}")
        elif field.type == _MESSAGE and not field.message_type.GetOptions().map_entry:
            for nested in items:
                _refuse_json_enum_numbers(nested, field.message_type)


def safe_codecs() -> list[Codec]:
    """Binary and strict JSON (google.protobuf), each wrapped in SafeDecodeCodec."""
    return [SafeDecodeCodec(google_protobuf_binary_codec()),
            SafeDecodeCodec(google_protobuf_json_codec(ignore_unknown_fields=False), json=True)]


class ErrorMapper:
    """Connect interceptor mapping exceptions to Connect errors (unary and streaming).

    A retry hint (``ResourceExhausted.retry_after_seconds``, or a RetryInfo detail on an
    error relayed from a worker) travels three ways: in the message ("retry after N s"),
    as a ``google.rpc.RetryInfo`` detail, and as a ``retry-after`` response header.
    """

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
            raise _mapped(exc, ctx) from None

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
            raise _mapped(exc, ctx) from None


# Headers shared by the gateway and the workers (docs/design.md §7).
TENANT_HEADER = "x-tenant-id"
WORKER_TOKEN_HEADER = "x-jennah-worker-token"


def final_code(exc: BaseException, ctx: RequestContext[Any, Any]) -> str:
    """The Connect code a call that raised ``exc`` ends with, for metrics."""
    if isinstance(exc, ConnectError):
        return exc.code.value
    if not isinstance(exc, Exception):  # cancelled: our deadline, or the client left
        remaining = ctx.timeout_ms
        return "deadline_exceeded" if remaining is not None and remaining <= 0 else "canceled"
    return "internal"


class RequestMetrics:
    """Counts and times every RPC by method and final code, into a ``{method, code}``
    counter and a ``{method}`` histogram (prometheus-client). Put it outside the
    ErrorMapper, so that ``code`` is exactly what the client receives."""

    def __init__(self, requests: Any, duration: Any) -> None:
        self.requests = requests
        self.duration = duration

    def observe(self, ctx: RequestContext[Any, Any], code: str, started: float) -> None:
        method = ctx.method.name
        self.requests.labels(method=method, code=code).inc()
        self.duration.labels(method=method).observe(time.perf_counter() - started)

    async def intercept_unary(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], Awaitable[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
        /,
    ) -> RES:
        started = time.perf_counter()
        try:
            result = await call_next(request, ctx)
        except BaseException as exc:
            self.observe(ctx, final_code(exc, ctx), started)
            raise
        self.observe(ctx, "ok", started)
        return result

    async def intercept_server_stream(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], AsyncIterator[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
        /,
    ) -> AsyncIterator[RES]:
        started = time.perf_counter()
        try:
            async for item in call_next(request, ctx):
                yield item
        except BaseException as exc:
            self.observe(ctx, final_code(exc, ctx), started)
            raise
        self.observe(ctx, "ok", started)
