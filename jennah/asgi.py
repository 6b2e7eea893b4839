"""A tiny ASGI router: the Connect app, with ``/health``, ``/ready`` and ``/metrics`` beside it.

Those three paths need no token or key (docs/design.md §11). Lifespan events go to the Connect
app, which drives the service's async-generator lifecycle (start-up and shutdown).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, make_asgi_app

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# A readiness probe returns (ok, detail).
Probe = Callable[[], Awaitable[tuple[bool, str]]]


async def send_text(send: Send, status: int, body: str, content_type: str = "text/plain") -> None:
    data = body.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", f"{content_type}; charset=utf-8".encode()),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


GRPC_NEEDS_TRAILERS = (
    "gRPC needs HTTP/2 with trailers; this server speaks Connect and gRPC-Web "
    "(JENNAH_SERVER=hypercorn adds gRPC)\n"
)


def _grpc_without_trailers(scope: Scope) -> bool:
    """A gRPC (not gRPC-Web) call on a server without the ASGI trailers extension
    (uvicorn, HTTP/1.1). connectrpc would raise, log a traceback and answer with
    grpc-status UNKNOWN and its internal message; refuse it cleanly instead."""
    if "http.response.trailers" in scope.get("extensions", {}):
        return False
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            ct = bytes(value).lower()
            return ct.startswith(b"application/grpc") and not ct.startswith(
                b"application/grpc-web")
    return False


def _headers_are_utf8(scope: Scope) -> bool:
    """connectrpc decodes every header as UTF-8 and fails with an unhandled exception
    (a 500 and a logged traceback) on anything else; such a request is the client's fault."""
    for _, value in scope.get("headers", ()):
        if not value.isascii():
            try:
                bytes(value).decode()
            except UnicodeDecodeError:
                return False
    return True


def compose(
    rpc_app: ASGIApp,
    *,
    ready: Probe,
    registry: CollectorRegistry | None = None,
    info: Callable[[], dict[str, Any]] | None = None,
) -> ASGIApp:
    """Route ``/health`` (liveness: the process serves), ``/ready`` (the probe, 503 when
    not ready), ``/metrics`` (Prometheus) and everything else to ``rpc_app``."""
    metrics_app: ASGIApp = make_asgi_app(registry) if registry else make_asgi_app()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await rpc_app(scope, receive, send)
            return
        path = scope["path"]
        if path == "/health":
            await send_text(send, 200, "ok\n")
        elif path == "/ready":
            ok, detail = await ready()
            word = "ready" if ok else "not ready"
            await send_text(send, 200 if ok else 503, f"{word}: {detail}\n")
        elif path == "/metrics":
            await metrics_app(scope, receive, send)
        elif path == "/info" and info is not None:
            await send_text(send, 200, json.dumps(info()), "application/json")
        elif _grpc_without_trailers(scope):
            await send_text(send, 415, GRPC_NEEDS_TRAILERS)
        elif not _headers_are_utf8(scope):
            await send_text(send, 400, json.dumps(
                {"code": "invalid_argument", "message": "request headers must be UTF-8"}
            ), "application/json")
        else:
            await rpc_app(scope, receive, send)

    return app


# CORS for browser clients (Connect and gRPC-Web, docs/design.md §11 "CORS"): what a
# preflight may ask for, and what a script may read back.
CORS_METHODS = ("POST", "GET")
CORS_REQUEST_HEADERS = (
    "content-type", "connect-protocol-version", "connect-timeout-ms", "authorization",
    "x-grpc-web", "x-user-agent", "grpc-timeout", "x-tenant-id",
    # SSE (docs/sse.md): a script's fetch resumes a stream with Last-Event-ID.
    "last-event-id",
)  # fmt: skip
CORS_EXPOSED_HEADERS = ("grpc-status", "grpc-message", "grpc-status-details-bin",
                        "retry-after")


def with_cors(app: ASGIApp, origins: tuple[str, ...]) -> ASGIApp:
    """``app`` answering CORS for exactly ``origins`` (Starlette's ``CORSMiddleware``): a
    preflight from a listed origin is answered, one from any other origin gets 400, and a
    request without an ``Origin`` header passes through untouched. No credentials mode:
    the API authenticates with the ``Authorization`` header, never with cookies."""
    from starlette.middleware.cors import CORSMiddleware

    # Starlette types scopes and messages as MutableMapping, ours as dict: the same thing.
    cors: ASGIApp = CORSMiddleware(  # type: ignore[assignment]
        app,  # type: ignore[arg-type]
        allow_origins=list(origins), allow_methods=list(CORS_METHODS),
        allow_headers=list(CORS_REQUEST_HEADERS), expose_headers=list(CORS_EXPOSED_HEADERS),
        allow_credentials=False, max_age=600,
    )  # fmt: skip
    return cors

